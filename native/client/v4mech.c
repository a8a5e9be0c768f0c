/* v4mech.c: typed mechanism parameters of protocol version 4.
 *
 * The tables come from p11g_procs.h, generated from the server's own sources:
 * which tags a mechanism takes (pkcs11/paramtable.py), the wire fields of each
 * tag (wire/mechanisms.py) and where each field sits in the C structure
 * (pkcs11/cparams.py).  So this file only walks descriptors: it reads the
 * caller's structure field by field, every CK_ULONG as a hyper and every
 * pointer + length as an opaque, and never sends an address.
 *
 * Which structure a parameter is: the mechanism says (a listed mechanism takes
 * its structure(s) and nothing else; the size must be that structure's).  A
 * mechanism we do not know goes as RAW bytes, which the server forwards only
 * when configured to (same architecture, unknown mechanism).  Anything else is
 * CKR_MECHANISM_PARAM_INVALID here, before a byte is sent. */
#include <string.h>

#include "v4.h"
#include "p11g_procs.h"

/* Bounds on what we read from the caller's memory: far beyond real use. */
#define MAX_BUFFER ((CK_ULONG)16 * 1024 * 1024)
#define MAX_BITS_BUFFER 4096u

_Static_assert(sizeof(p11g_CK_GCM_MESSAGE_PARAMS) != sizeof(p11g_CK_CCM_MESSAGE_PARAMS) &&
                   sizeof(p11g_CK_GCM_MESSAGE_PARAMS) !=
                       sizeof(p11g_CK_SALSA20_CHACHA20_POLY1305_MSG_PARAMS) &&
                   sizeof(p11g_CK_CCM_MESSAGE_PARAMS) !=
                       sizeof(p11g_CK_SALSA20_CHACHA20_POLY1305_MSG_PARAMS),
               "per-message parameters are told apart by their size");

static unsigned long mech_tags(CK_MECHANISM_TYPE m, int *known)
{
    size_t lo = 0, hi = P11G_MECH_TAGS_COUNT;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (p11g_mech_tags[mid].mech == m) {
            *known = 1;
            return p11g_mech_tags[mid].tags;
        }
        if (p11g_mech_tags[mid].mech < m)
            lo = mid + 1;
        else
            hi = mid;
    }
    *known = 0;
    return 0;
}

static uint64_t read_uint(const uint8_t *at, size_t size)
{
    if (size == sizeof(CK_ULONG)) {
        CK_ULONG v;
        memcpy(&v, at, sizeof v);
        return v;
    }
    if (size == sizeof(CK_BBOOL)) {
        CK_BBOOL v;
        memcpy(&v, at, sizeof v);
        return v;
    }
    return 0; /* no such member in the tables */
}

static const void *read_ptr(const uint8_t *at)
{
    const void *p;
    memcpy(&p, at, sizeof p);
    return p;
}

static CK_ULONG read_ulong(const uint8_t *at)
{
    CK_ULONG v;
    memcpy(&v, at, sizeof v);
    return v;
}

/* One buffer field of a structure: where the caller's bytes are and how many. */
struct buf {
    const uint8_t *p;
    CK_ULONG n;
};

/* Resolves field i of shape s in the structure at base.  CKR_OK or
 * CKR_MECHANISM_PARAM_INVALID. */
static CK_RV field_buffer(const struct p11g_pshape *s, unsigned i, const uint8_t *base,
                          struct buf *b)
{
    const struct p11g_pfield *f = &s->fields[i];
    b->p = NULL;
    b->n = 0;
    switch (f->target) {
    case P11G_FT_ARRAY:
        b->p = base + f->off;
        b->n = f->size;
        return f->size == f->fixed ? CKR_OK : CKR_MECHANISM_PARAM_INVALID;
    case P11G_FT_PTRLEN:
        b->p = read_ptr(base + f->off);
        b->n = read_ulong(base + f->len_off);
        break;
    case P11G_FT_PTRPLEN: {
        b->p = read_ptr(base + f->off);
        const CK_ULONG *plen = read_ptr(base + f->len_off);
        if (plen == NULL && b->p != NULL)
            return CKR_MECHANISM_PARAM_INVALID;
        b->n = plen != NULL ? *plen : 0;
        break;
    }
    case P11G_FT_PTR:
        b->p = read_ptr(base + f->off);
        if (f->fixed) {
            b->n = f->fixed;
        } else if (f->bits >= 0 && (unsigned)f->bits < s->nfields) {
            uint64_t bits = read_uint(base + s->fields[f->bits].off, s->fields[f->bits].size);
            if (bits > 8ull * MAX_BITS_BUFFER)
                return CKR_MECHANISM_PARAM_INVALID;
            b->n = (CK_ULONG)((bits + 7) / 8);
        }
        if (b->p == NULL) {
            if (f->code == 'f')
                return CKR_MECHANISM_PARAM_INVALID; /* exactly N bytes on the wire */
            b->n = 0;
        }
        return CKR_OK;
    default:
        return CKR_MECHANISM_PARAM_INVALID;
    }
    if (b->p == NULL && b->n != 0)
        return CKR_MECHANISM_PARAM_INVALID;
    if (b->n > MAX_BUFFER)
        return CKR_MECHANISM_PARAM_INVALID;
    return CKR_OK;
}

/* The index of the buffer a message operation writes (the GCM tag, the CCM
 * MAC, the ChaCha20-Poly1305 tag): the last buffer of a message tag. */
static int output_field(const struct p11g_pshape *s)
{
    if (!((P11G_MESSAGE_TAGS >> s->tag) & 1))
        return -1;
    int last = -1;
    for (unsigned i = 0; i < s->nfields; i++)
        if (s->fields[i].code != 'h')
            last = (int)i;
    return last;
}

/* Walks a structure: checks it (e == NULL) or encodes its fields. */
static CK_RV walk_struct(struct p11g_enc *e, const struct p11g_pshape *s, const uint8_t *base,
                         int zero_out)
{
    int out_field = zero_out ? output_field(s) : -1;
    for (unsigned i = 0; i < s->nfields; i++) {
        const struct p11g_pfield *f = &s->fields[i];
        if (f->code == 'h') {
            if (e != NULL)
                p11g_enc_u64(e, read_uint(base + f->off, f->size));
            continue;
        }
        struct buf b;
        CK_RV rv = field_buffer(s, i, base, &b);
        if (rv != CKR_OK)
            return rv;
        if (e != NULL)
            p11g_enc_opaque(e, (int)i == out_field ? NULL : b.p, b.n);
    }
    return CKR_OK;
}

/* CK_RSA_AES_KEY_WRAP_PARAMS holds a pointer to an OAEP structure: its wire
 * form is the AES key size followed by the OAEP fields. */
static CK_RV walk_rsa_aes(struct p11g_enc *e, const uint8_t *base)
{
    p11g_CK_RSA_AES_KEY_WRAP_PARAMS w;
    memcpy(&w, base, sizeof w);
    if (w.pOAEPParams == NULL)
        return CKR_MECHANISM_PARAM_INVALID;
    if (e != NULL)
        p11g_enc_u64(e, w.ulAESKeyBits);
    return walk_struct(e, &p11g_pshapes[P11G_TAG_RSA_PKCS_OAEP],
                       (const uint8_t *)w.pOAEPParams, 0);
}

static CK_RV walk(struct p11g_enc *e, unsigned tag, const void *p, CK_ULONG len, int zero_out)
{
    if (tag >= P11G_TAG_COUNT)
        return CKR_MECHANISM_PARAM_INVALID;
    const struct p11g_pshape *s = &p11g_pshapes[tag];
    if (e != NULL)
        p11g_enc_u32(e, tag);
    switch (tag) {
    case P11G_TAG_NONE:
        return CKR_OK;
    case P11G_TAG_BYTES:
    case P11G_TAG_RAW:
        if (len > P11G_MAX_MECH_PARAM)
            return CKR_MECHANISM_PARAM_INVALID;
        if (e != NULL)
            p11g_enc_opaque(e, p, len);
        return CKR_OK;
    case P11G_TAG_ULONG:
        if (len != sizeof(CK_ULONG))
            return CKR_MECHANISM_PARAM_INVALID;
        if (e != NULL)
            p11g_enc_u64(e, read_ulong(p));
        return CKR_OK;
    case P11G_TAG_RSA_AES_KEY_WRAP:
        if (len != s->struct_size)
            return CKR_MECHANISM_PARAM_INVALID;
        return walk_rsa_aes(e, p);
    default:
        if (len != s->struct_size || s->fields == NULL)
            return CKR_MECHANISM_PARAM_INVALID;
        return walk_struct(e, s, p, zero_out);
    }
}

/* CK_PKCS5_PBKD2_PARAMS (2.40: a pointer to the password length) and
 * CK_PKCS5_PBKD2_PARAMS2 (3.0: the length itself) have the same size.  A
 * valid pointer is never below 4096; a password length always is. */
static unsigned pbkdf2_tag(const void *p)
{
    p11g_CK_PKCS5_PBKD2_PARAMS2 v;
    memcpy(&v, p, sizeof v);
    return v.ulPasswordLen < 4096 ? P11G_TAG_PKCS5_PBKD2_2 : P11G_TAG_PKCS5_PBKD2;
}

/* Picks the tag for (m, p, len) among `allowed` (a tag mask). */
static CK_RV pick_tag(unsigned long allowed, const void *p, CK_ULONG len, unsigned *tag)
{
    unsigned long both = (1ul << P11G_TAG_PKCS5_PBKD2) | (1ul << P11G_TAG_PKCS5_PBKD2_2);
    if ((allowed & both) == both && len == sizeof(p11g_CK_PKCS5_PBKD2_PARAMS2)) {
        *tag = pbkdf2_tag(p);
        return CKR_OK;
    }
    for (unsigned t = P11G_TAG_ULONG; t < P11G_TAG_COUNT; t++) {
        if (((allowed >> t) & 1) && p11g_pshapes[t].struct_size == len) {
            *tag = t;
            return CKR_OK;
        }
    }
    if ((allowed >> P11G_TAG_BYTES) & 1) {
        *tag = P11G_TAG_BYTES;
        return CKR_OK;
    }
    return CKR_MECHANISM_PARAM_INVALID;
}

static CK_RV mech_tag(const CK_MECHANISM *m, unsigned *tag)
{
    if (m->pParameter == NULL) {
        *tag = P11G_TAG_NONE;
        return m->ulParameterLen == 0 ? CKR_OK : CKR_MECHANISM_PARAM_INVALID;
    }
    int known;
    unsigned long tags = mech_tags(m->mechanism, &known) & ~P11G_MESSAGE_TAGS;
    if (!known) {
        *tag = P11G_TAG_RAW; /* the server decides whether it may pass */
        return m->ulParameterLen <= P11G_MAX_MECH_PARAM ? CKR_OK : CKR_MECHANISM_PARAM_INVALID;
    }
    return pick_tag(tags, m->pParameter, m->ulParameterLen, tag);
}

CK_RV p11g_v4_mech_check(const CK_MECHANISM *m)
{
    unsigned tag;
    if (m == NULL)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = mech_tag(m, &tag);
    if (rv == CKR_OK)
        rv = walk(NULL, tag, m->pParameter, m->ulParameterLen, 0);
    return rv;
}

void p11g_v4_enc_mech(struct p11g_enc *e, const CK_MECHANISM *m)
{
    unsigned tag;
    if (m == NULL) {
        p11g_enc_u64(e, 0);
        p11g_enc_u32(e, P11G_TAG_NONE);
        return;
    }
    p11g_enc_u64(e, m->mechanism);
    /* Checked by the caller; a failure here is a bug, not a crash. */
    if (mech_tag(m, &tag) != CKR_OK ||
        walk(e, tag, m->pParameter, m->ulParameterLen, 0) != CKR_OK) {
        if (e->err == P11G_OK)
            e->err = P11G_E_PROTO;
    }
}

CK_RV p11g_v4_param_tag(const void *p, CK_ULONG len, unsigned *tag)
{
    if (p == NULL) {
        *tag = P11G_TAG_NONE;
        return len == 0 ? CKR_OK : CKR_ARGUMENTS_BAD;
    }
    /* The server checks the tag against the session's Message*Init mechanism;
     * here the size tells the three per-message structures apart. */
    CK_RV rv = pick_tag(P11G_MESSAGE_TAGS, p, len, tag);
    if (rv != CKR_OK)
        return CKR_MECHANISM_PARAM_INVALID;
    return walk(NULL, *tag, p, len, 0);
}

void p11g_v4_enc_param(struct p11g_enc *e, unsigned tag, const void *p, CK_ULONG len,
                       int zero_out)
{
    if (walk(e, tag, p, len, zero_out) != CKR_OK && e->err == P11G_OK)
        e->err = P11G_E_PROTO;
}

/* The wire codes of a tag: 'h', 'o' or 'f' (with its size) per field. */
static unsigned tag_codes(unsigned tag, char codes[P11G_MAX_FIELDS], unsigned fixed[P11G_MAX_FIELDS])
{
    const struct p11g_pshape *s = &p11g_pshapes[tag];
    switch (tag) {
    case P11G_TAG_NONE:
        return 0;
    case P11G_TAG_BYTES:
    case P11G_TAG_RAW:
        codes[0] = 'o';
        return 1;
    case P11G_TAG_ULONG:
        codes[0] = 'h';
        return 1;
    case P11G_TAG_RSA_AES_KEY_WRAP:
        memcpy(codes, "hhhho", 5);
        return 5;
    default:
        if (s->nfields > P11G_MAX_FIELDS)
            return 0;
        for (unsigned i = 0; i < s->nfields; i++) {
            codes[i] = s->fields[i].code;
            fixed[i] = s->fields[i].fixed;
        }
        return s->nfields;
    }
}

int p11g_v4_skip_param(struct p11g_dec *d)
{
    uint32_t tag;
    char codes[P11G_MAX_FIELDS];
    unsigned fixed[P11G_MAX_FIELDS];
    if (p11g_dec_u32(d, &tag) != 0 || tag >= P11G_TAG_COUNT)
        return -1;
    unsigned n = tag_codes(tag, codes, fixed);
    for (unsigned i = 0; i < n; i++) {
        uint64_t h;
        const uint8_t *p;
        uint32_t len;
        if (codes[i] == 'h') {
            if (p11g_dec_u64(d, &h) != 0)
                return -1;
        } else if (p11g_dec_opaque(d, &p, &len, 0xFFFFFFFFu) != 0 ||
                   (codes[i] == 'f' && len != fixed[i])) {
            return -1;
        }
    }
    return 0;
}

/* Pass 0 checks that the reply matches what was sent, pass 1 copies. */
static CK_RV param_back_pass(unsigned tag, void *p, CK_ULONG len, const uint8_t *wire,
                             uint32_t wire_len, int copy)
{
    struct p11g_dec d;
    uint32_t got_tag;
    p11g_dec_init(&d, wire, wire_len);
    if (p11g_dec_u32(&d, &got_tag) != 0 || got_tag != tag)
        return CKR_DEVICE_ERROR;
    if (tag == P11G_TAG_NONE)
        return CKR_OK;
    const struct p11g_pshape *s = &p11g_pshapes[tag];
    if (s->fields == NULL || len != s->struct_size)
        return CKR_OK; /* only structures have buffers to give back */
    for (unsigned i = 0; i < s->nfields; i++) {
        const struct p11g_pfield *f = &s->fields[i];
        uint64_t h;
        const uint8_t *bp;
        uint32_t bn;
        if (f->code == 'h') {
            if (p11g_dec_u64(&d, &h) != 0)
                return CKR_DEVICE_ERROR;
            continue;
        }
        if (p11g_dec_opaque(&d, &bp, &bn, 0xFFFFFFFFu) != 0)
            return CKR_DEVICE_ERROR;
        struct buf b;
        if (field_buffer(s, i, p, &b) != CKR_OK || bn != b.n)
            return CKR_DEVICE_ERROR; /* never more than the caller's buffer */
        if (copy && bn > 0 && b.p != NULL && f->target != P11G_FT_ARRAY)
            memcpy((void *)(uintptr_t)b.p, bp, bn);
    }
    return CKR_OK;
}

CK_RV p11g_v4_param_back(unsigned tag, void *p, CK_ULONG len, const uint8_t *wire,
                         uint32_t wire_len)
{
    CK_RV rv = param_back_pass(tag, p, len, wire, wire_len, 0);
    if (rv == CKR_OK)
        rv = param_back_pass(tag, p, len, wire, wire_len, 1);
    return rv;
}
