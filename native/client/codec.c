/* codec.c: a small interpreter that encodes calls and decodes replies from the
 * kind strings of p11g_procs.h (generated from src/p11guard/wire/procedures.py).
 * Decoding validates the whole reply, with every count and length bounded by
 * the bytes present, before anything is handed to the caller; results are
 * views into the reply buffer.
 *
 * Each connection speaks protocol version 3 or 4, negotiated on its first
 * call (v4.h): the table and the encodings follow the connection's version. */
#include <stdlib.h>
#include <string.h>

#include "p11g.h"
#include "p11g_procs.h"
#include "v4.h"

_Static_assert(P11G_TOKEN_INFO_NFIELDS <= P11G_MAX_FIELDS, "struct too large");
_Static_assert(P11G_SLOT_INFO_NFIELDS <= P11G_MAX_FIELDS, "struct too large");
_Static_assert(P11G_INFO_NFIELDS <= P11G_MAX_FIELDS, "struct too large");

#define RPC_CALL 0
#define RPC_REPLY 1
#define MSG_ACCEPTED 0
#define ACCEPT_SUCCESS 0
#define ACCEPT_PROG_MISMATCH 2
#define ACCEPT_PROC_UNAVAIL 3
#define E_MISMATCH 100 /* internal: PROG_MISMATCH, versions in *low / *high */
#define UNBOUNDED_TEXT 4096u /* slot texts have no bound in the .x file */

static const struct p11g_proc_desc *find_proc(unsigned proc, unsigned version)
{
    const struct p11g_proc_desc *d;
    if (version == P11G_RPC_VERSION4) {
        if (proc < P11G_PROC4_MIN || proc > P11G_PROC4_MAX)
            return NULL;
        d = &p11g_procs4[proc - P11G_PROC4_MIN];
    } else {
        if (proc < P11G_PROC_MIN || proc > P11G_PROC_MAX)
            return NULL;
        d = &p11g_procs[proc - P11G_PROC_MIN];
    }
    return d->number == proc ? d : NULL;
}

const char *p11g_proc_name(unsigned proc)
{
    const struct p11g_proc_desc *d = find_proc(proc, P11G_RPC_VERSION4);
    return d != NULL ? d->name : "?";
}

static void enc_template(struct p11g_enc *e, const struct p11g_arg *a)
{
    p11g_enc_u32(e, (uint32_t)a->count);
    for (CK_ULONG i = 0; i < a->count && e->err == P11G_OK; i++) {
        const CK_ATTRIBUTE *at = &a->tmpl[i];
        p11g_enc_u64(e, at->type);
        if (a->tmpl_mode == P11G_T_OUT) {
            /* An output buffer travels as that many zero bytes (the server
             * allocates a buffer that size); never the caller's memory. */
            if (at->pValue != NULL) {
                p11g_enc_opaque(e, NULL, at->ulValueLen);
                p11g_enc_u64(e, at->ulValueLen);
            } else {
                p11g_enc_opaque(e, NULL, 0);
                p11g_enc_u64(e, 0);
            }
        } else {
            size_t n = at->pValue != NULL ? at->ulValueLen : 0;
            p11g_enc_opaque(e, at->pValue, n);
            p11g_enc_u64(e, at->ulValueLen);
        }
    }
}

static int encode_args(struct p11g_enc *e, const char *kinds, const struct p11g_arg *args)
{
    for (size_t i = 0; kinds[i] != '\0'; i++) {
        const struct p11g_arg *a = &args[i];
        switch (kinds[i]) {
        case 'H':
            p11g_enc_u64(e, a->h);
            break;
        case 'O':
            p11g_enc_opaque(e, a->ptr, a->len);
            break;
        case 'M':
            if (a->mech == NULL) {
                p11g_enc_u64(e, 0);
                p11g_enc_opaque(e, NULL, 0);
            } else {
                p11g_enc_u64(e, a->mech->mechanism);
                p11g_enc_opaque(e, a->mech->pParameter,
                                a->mech->pParameter != NULL ? a->mech->ulParameterLen : 0);
            }
            break;
        case 'T':
            enc_template(e, a);
            break;
        case 'X':
            p11g_v4_enc_mech(e, a->mech);
            break;
        case 'Y':
            p11g_v4_enc_param(e, (unsigned)a->h, a->ptr, a->len,
                              a->tmpl_mode == P11G_V4_ZERO_OUT);
            break;
        case 'Z':
            p11g_v4_enc_tmpl(e, a->tmpl, a->count);
            break;
        case 'L':
            p11g_v4_enc_types(e, a->tmpl, a->count);
            break;
        default:
            return P11G_E_PROTO; /* no procedure takes a struct argument */
        }
    }
    return e->err;
}

static int dec_version(struct p11g_dec *d, uint8_t *major, uint8_t *minor)
{
    const uint8_t *p;
    uint32_t n;
    if (p11g_dec_opaque(d, &p, &n, 1) != 0)
        return -1;
    *major = n ? p[0] : 0;
    if (p11g_dec_opaque(d, &p, &n, 1) != 0)
        return -1;
    *minor = n ? p[0] : 0;
    return 0;
}

static int dec_struct(struct p11g_dec *d, char code, struct p11g_res *r)
{
    const struct p11g_struct_desc *sd = NULL;
    for (unsigned i = 0; i < P11G_STRUCT_COUNT; i++)
        if (p11g_structs[i].code == code)
            sd = &p11g_structs[i];
    if (sd == NULL || sd->nfields > P11G_MAX_FIELDS)
        return -1;
    for (unsigned i = 0; i < sd->nfields; i++) {
        struct p11g_field *f = &r->f[i];
        switch (sd->fields[i].kind) {
        case 'h':
            if (p11g_dec_u64(d, &f->h) != 0)
                return -1;
            break;
        case 'v':
            if (dec_version(d, &f->major, &f->minor) != 0)
                return -1;
            break;
        case 't':
            if (p11g_dec_opaque(d, &f->ptr, &f->len,
                                sd->fields[i].max ? sd->fields[i].max : UNBOUNDED_TEXT) != 0)
                return -1;
            break;
        default:
            return -1;
        }
    }
    return 0;
}

void p11g_tmpl_next(struct p11g_dec *d, uint64_t *type, const uint8_t **p, uint32_t *n,
                    uint64_t *value_len)
{
    /* Only called on templates that decode_results() has validated. */
    p11g_dec_u64(d, type);
    p11g_dec_opaque(d, p, n, 0xFFFFFFFFu);
    p11g_dec_u64(d, value_len);
}

uint64_t p11g_list_get(const uint8_t *p, uint32_t i)
{
    struct p11g_dec d;
    uint64_t v = 0;
    p11g_dec_init(&d, p + (size_t)i * 8, 8);
    p11g_dec_u64(&d, &v);
    return v;
}

static int decode_results(struct p11g_dec *d, const char *kinds, struct p11g_res *res)
{
    for (size_t i = 0; kinds[i] != '\0'; i++) {
        struct p11g_res *r = &res[i];
        uint32_t n;
        switch (kinds[i]) {
        case 'H':
            if (p11g_dec_u64(d, &r->h) != 0)
                return -1;
            break;
        case 'O':
            if (p11g_dec_opaque(d, &r->ptr, &r->len, 0xFFFFFFFFu) != 0)
                return -1;
            break;
        case 'L':
            if (p11g_dec_u32(d, &n) != 0 || n > (d->end - d->pos) / 8)
                return -1;
            r->ptr = d->p + d->pos;
            r->len = n;
            d->pos += (size_t)n * 8;
            break;
        case 'T': {
            /* Each element takes at least 20 bytes: bound the count first. */
            if (p11g_dec_u32(d, &n) != 0 || n > (d->end - d->pos) / 20)
                return -1;
            r->ptr = d->p + d->pos;
            r->len = n;
            for (uint32_t k = 0; k < n; k++) {
                uint64_t t, vl;
                const uint8_t *p;
                uint32_t l;
                if (p11g_dec_u64(d, &t) != 0 || p11g_dec_opaque(d, &p, &l, 0xFFFFFFFFu) != 0 ||
                    p11g_dec_u64(d, &vl) != 0)
                    return -1;
            }
            break;
        }
        case 'Y':
        case 'Z': {
            /* Validated whole here; the caller reads it from ptr/len. */
            size_t start = d->pos;
            if ((kinds[i] == 'Y' ? p11g_v4_skip_param(d) : p11g_v4_skip_tmpl(d)) != 0)
                return -1;
            r->ptr = d->p + start;
            r->len = (uint32_t)(d->pos - start);
            break;
        }
        default:
            if (dec_struct(d, kinds[i], r) != 0)
                return -1;
        }
    }
    return d->pos == d->end ? 0 : -1; /* trailing garbage is an error too */
}

void p11g_reply_free(struct p11g_reply *rep)
{
    if (rep->buf != NULL) {
        memset(rep->buf, 0, rep->len); /* replies carry key material */
        __asm__ __volatile__("" : : "r"(rep->buf) : "memory");
        free(rep->buf);
    }
    rep->buf = NULL;
    rep->len = 0;
}

/* One call with one version.  E_MISMATCH: the server does not speak it. */
static int rpc_once(struct p11g_conn *c, unsigned version, unsigned proc,
                    const struct p11g_arg *args, struct p11g_res *res, struct p11g_reply *rep,
                    size_t max_record, uint32_t *low, uint32_t *high)
{
    const struct p11g_proc_desc *pd = find_proc(proc, version);
    struct p11g_enc e;
    rep->buf = NULL;
    rep->len = 0;
    rep->version = version;
    if (pd == NULL)
        return P11G_E_PROC;

    p11g_enc_init(&e, max_record + 4);
    p11g_enc_u32(&e, 0); /* record mark, filled by the transport */
    p11g_enc_u32(&e, 0); /* xid, filled by the transport */
    p11g_enc_u32(&e, RPC_CALL);
    p11g_enc_u32(&e, 2);
    p11g_enc_u32(&e, P11G_RPC_PROGRAM);
    p11g_enc_u32(&e, version);
    p11g_enc_u32(&e, proc);
    p11g_enc_u32(&e, 0); /* AUTH_NONE credential */
    p11g_enc_u32(&e, 0);
    p11g_enc_u32(&e, 0); /* AUTH_NONE verifier */
    p11g_enc_u32(&e, 0);
    int r = encode_args(&e, pd->args, args);
    if (r != P11G_OK) {
        p11g_enc_free(&e);
        return r;
    }
    uint8_t *buf = NULL;
    size_t len = 0;
    r = p11g_conn_call(c, e.p, e.len, &buf, &len);
    p11g_enc_free(&e);
    if (r != P11G_OK)
        return r;
    rep->buf = buf;
    rep->len = len;

    struct p11g_dec d;
    uint32_t xid, mtype, stat, flavor, accept;
    const uint8_t *vp;
    uint32_t vn;
    p11g_dec_init(&d, buf, len);
    if (p11g_dec_u32(&d, &xid) != 0 || p11g_dec_u32(&d, &mtype) != 0 || mtype != RPC_REPLY ||
        p11g_dec_u32(&d, &stat) != 0 || stat != MSG_ACCEPTED ||
        p11g_dec_u32(&d, &flavor) != 0 || p11g_dec_opaque(&d, &vp, &vn, 400) != 0 ||
        p11g_dec_u32(&d, &accept) != 0)
        r = P11G_E_PROTO;
    else if (accept == ACCEPT_PROC_UNAVAIL)
        r = P11G_E_PROC;
    else if (accept == ACCEPT_PROG_MISMATCH)
        r = (p11g_dec_u32(&d, low) == 0 && p11g_dec_u32(&d, high) == 0) ? E_MISMATCH
                                                                          : P11G_E_PROTO;
    else if (accept != ACCEPT_SUCCESS)
        r = P11G_E_PROTO;
    else {
        memset(res, 0, sizeof(struct p11g_res) * strlen(pd->result));
        if (decode_results(&d, pd->result, res) != 0)
            r = P11G_E_PROTO;
    }
    if (r != P11G_OK)
        p11g_reply_free(rep); /* callers only free after success */
    return r;
}

int p11g_rpc(struct p11g_conn *c, unsigned proc, const struct p11g_arg *args,
             struct p11g_res *res, struct p11g_reply *rep, size_t max_record)
{
    uint32_t low = 0, high = 0;
    unsigned version = p11g_conn_version(c);
    if (version != 0 && proc != P11G_PROC_SetupArch)
        return rpc_once(c, version, proc, args, res, rep, max_record, &low, &high);

    /* A connection's first call (the handshake starts with SetupArch, which
     * has the same shape in both versions): version 4 first.  Caml Crush
     * answers PROG_MISMATCH (3..3) without running anything, and the call is
     * sent again as version 3: one extra round trip, once per connection. */
    if (!p11g_v3_forced()) {
        int r = rpc_once(c, P11G_RPC_VERSION4, proc, args, res, rep, max_record, &low, &high);
        if (r == P11G_OK)
            p11g_conn_set_version(c, P11G_RPC_VERSION4);
        if (r != E_MISMATCH)
            return r;
        if (low > P11G_RPC_VERSION || high < P11G_RPC_VERSION)
            return P11G_E_PROTO; /* neither version we speak */
    }
    int r = rpc_once(c, P11G_RPC_VERSION, proc, args, res, rep, max_record, &low, &high);
    if (r == P11G_OK)
        p11g_conn_set_version(c, P11G_RPC_VERSION);
    return r == E_MISMATCH ? P11G_E_PROTO : r;
}
