/* v4tmpl.c: typed attribute templates of protocol version 4.
 *
 * Each attribute travels as its type, a value kind and the value in a form
 * that does not depend on the peers' CK_ULONG (wire/templates.py):
 * CK_ULONG attributes as hypers, CKA_ALLOWED_MECHANISMS as a hyper array,
 * CKA_WRAP/UNWRAP/DERIVE_TEMPLATE (and vendor CKF_ARRAY_ATTRIBUTE types) as a
 * nested template, anything else as bytes.  The attribute lists come from
 * pkcs11/attributes.py through p11g_procs.h.
 *
 * GetAttributeValue sends only the types; the server answers every value
 * whole and this file fills the caller's structures the way a module would:
 * length queries, CKR_BUFFER_TOO_SMALL and CK_UNAVAILABLE_INFORMATION are
 * decided here, against the caller's own buffer sizes. */
#include <string.h>

#include "v4.h"
#include "p11g_procs.h"

#define MAX_ATTRS 4096u        /* per template (the v3 path's bound) */
#define MAX_TOTAL_ATTRS 65536u /* over all nesting levels of one reply */
#define MAX_VALUE ((CK_ULONG)16 * 1024 * 1024)

static int in_list(const unsigned long *list, size_t n, CK_ATTRIBUTE_TYPE t)
{
    for (size_t i = 0; i < n; i++)
        if (list[i] == t)
            return 1;
    return 0;
}

static int kind_of(CK_ATTRIBUTE_TYPE t)
{
    if (in_list(p11g_attrs_ulong, P11G_ATTRS_ULONG_COUNT, t))
        return P11G_VK_ULONG;
    if (in_list(p11g_attrs_ulong_array, P11G_ATTRS_ULONG_ARRAY_COUNT, t))
        return P11G_VK_ULONG_ARRAY;
    if (in_list(p11g_attrs_template, P11G_ATTRS_TEMPLATE_COUNT, t) ||
        (t & CKF_ARRAY_ATTRIBUTE) != 0)
        return P11G_VK_TEMPLATE;
    return P11G_VK_BYTES;
}

/* The kind an input attribute is sent as: a value that does not have the
 * size of its kind goes as bytes, and the module judges it as it would
 * directly (CKR_ATTRIBUTE_VALUE_INVALID). */
static int send_kind(const CK_ATTRIBUTE *a)
{
    int k = kind_of(a->type);
    if (a->pValue == NULL || a->ulValueLen == 0)
        return P11G_VK_BYTES;
    if (k == P11G_VK_ULONG && a->ulValueLen != sizeof(CK_ULONG))
        return P11G_VK_BYTES;
    if (k == P11G_VK_ULONG_ARRAY && a->ulValueLen % sizeof(CK_ULONG) != 0)
        return P11G_VK_BYTES;
    return k;
}

static CK_RV check_level(const CK_ATTRIBUTE *t, CK_ULONG n, int depth, CK_ULONG *total)
{
    if (t == NULL && n != 0)
        return CKR_ARGUMENTS_BAD;
    if (n > MAX_ATTRS || n > MAX_TOTAL_ATTRS - *total)
        return CKR_ARGUMENTS_BAD;
    *total += n;
    for (CK_ULONG i = 0; i < n; i++) {
        const CK_ATTRIBUTE *a = &t[i];
        if (a->pValue == NULL && a->ulValueLen != 0)
            return CKR_ATTRIBUTE_VALUE_INVALID;
        if (a->ulValueLen > MAX_VALUE)
            return CKR_ATTRIBUTE_VALUE_INVALID;
        if (send_kind(a) == P11G_VK_TEMPLATE) {
            /* PKCS#11 nests templates one level deep, never more. */
            if (depth > 0 || a->ulValueLen % sizeof(CK_ATTRIBUTE) != 0)
                return CKR_ATTRIBUTE_VALUE_INVALID;
            CK_RV rv = check_level(a->pValue, a->ulValueLen / sizeof(CK_ATTRIBUTE), depth + 1,
                                   total);
            if (rv != CKR_OK)
                return rv == CKR_ARGUMENTS_BAD ? CKR_ATTRIBUTE_VALUE_INVALID : rv;
        }
    }
    return CKR_OK;
}

CK_RV p11g_v4_tmpl_check(const CK_ATTRIBUTE *t, CK_ULONG n)
{
    CK_ULONG total = 0;
    return check_level(t, n, 0, &total);
}

static void enc_level(struct p11g_enc *e, const CK_ATTRIBUTE *t, CK_ULONG n, int depth)
{
    p11g_enc_u32(e, (uint32_t)n);
    for (CK_ULONG i = 0; i < n && e->err == P11G_OK; i++) {
        const CK_ATTRIBUTE *a = &t[i];
        int k = send_kind(a);
        if (k == P11G_VK_TEMPLATE && (depth > 0 || a->ulValueLen % sizeof(CK_ATTRIBUTE))) {
            /* Refused by the check; if the caller changed its template since,
             * fail rather than send what would be our addresses. */
            e->err = P11G_E_PROTO;
            return;
        }
        p11g_enc_u64(e, a->type);
        p11g_enc_u32(e, (uint32_t)k);
        switch (k) {
        case P11G_VK_ULONG: {
            CK_ULONG v;
            memcpy(&v, a->pValue, sizeof v);
            p11g_enc_u64(e, v);
            break;
        }
        case P11G_VK_ULONG_ARRAY: {
            CK_ULONG m = a->ulValueLen / sizeof(CK_ULONG);
            p11g_enc_u32(e, (uint32_t)m);
            for (CK_ULONG j = 0; j < m; j++) {
                CK_ULONG v;
                memcpy(&v, (const uint8_t *)a->pValue + j * sizeof v, sizeof v);
                p11g_enc_u64(e, v);
            }
            break;
        }
        case P11G_VK_TEMPLATE:
            enc_level(e, a->pValue, a->ulValueLen / sizeof(CK_ATTRIBUTE), depth + 1);
            break;
        default:
            p11g_enc_opaque(e, a->pValue, a->pValue != NULL ? a->ulValueLen : 0);
        }
    }
}

void p11g_v4_enc_tmpl(struct p11g_enc *e, const CK_ATTRIBUTE *t, CK_ULONG n)
{
    enc_level(e, t, t != NULL ? n : 0, 0);
}

void p11g_v4_enc_types(struct p11g_enc *e, const CK_ATTRIBUTE *t, CK_ULONG n)
{
    if (t == NULL)
        n = 0;
    p11g_enc_u32(e, (uint32_t)n);
    for (CK_ULONG i = 0; i < n; i++)
        p11g_enc_u64(e, t[i].type);
}

/* ---- replies ---------------------------------------------------------------- */
static int skip_level(struct p11g_dec *d, int depth, uint32_t *budget)
{
    uint32_t n;
    /* An attribute takes at least 12 bytes: bound the count by what is there. */
    if (p11g_dec_u32(d, &n) != 0 || n > (d->end - d->pos) / 12 || n > *budget)
        return -1;
    *budget -= n;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t type, h;
        uint32_t kind, m;
        const uint8_t *p;
        if (p11g_dec_u64(d, &type) != 0 || p11g_dec_u32(d, &kind) != 0)
            return -1;
        switch (kind) {
        case P11G_VK_BYTES:
            if (p11g_dec_opaque(d, &p, &m, 0xFFFFFFFFu) != 0)
                return -1;
            break;
        case P11G_VK_ULONG:
            if (p11g_dec_u64(d, &h) != 0)
                return -1;
            break;
        case P11G_VK_TEMPLATE:
            if (depth > 0 || skip_level(d, depth + 1, budget) != 0)
                return -1;
            break;
        case P11G_VK_ULONG_ARRAY:
            if (p11g_dec_u32(d, &m) != 0 || m > (d->end - d->pos) / 8)
                return -1;
            d->pos += (size_t)m * 8;
            break;
        case P11G_VK_UNAVAILABLE:
            break;
        default:
            return -1;
        }
    }
    return 0;
}

int p11g_v4_skip_tmpl(struct p11g_dec *d)
{
    uint32_t budget = MAX_TOTAL_ATTRS;
    return skip_level(d, 0, &budget);
}

/* One typed value, as read from a validated reply. */
struct tval {
    uint64_t type;
    uint32_t kind;
    uint64_t h;          /* ULONG */
    const uint8_t *p;    /* BYTES: bytes; ULONG_ARRAY: hypers; TEMPLATE: its entries */
    uint32_t n;          /* BYTES: bytes; ULONG_ARRAY, TEMPLATE: elements */
    size_t avail;        /* TEMPLATE: bytes from p to the end of the reply */
};

/* Reads the next value of a level that skip_level() has validated. */
static void next_val(struct p11g_dec *d, struct tval *v)
{
    uint32_t budget = MAX_TOTAL_ATTRS;
    memset(v, 0, sizeof *v);
    p11g_dec_u64(d, &v->type);
    p11g_dec_u32(d, &v->kind);
    switch (v->kind) {
    case P11G_VK_BYTES:
        p11g_dec_opaque(d, &v->p, &v->n, 0xFFFFFFFFu);
        break;
    case P11G_VK_ULONG:
        p11g_dec_u64(d, &v->h);
        break;
    case P11G_VK_ULONG_ARRAY:
        p11g_dec_u32(d, &v->n);
        v->p = d->p + d->pos;
        d->pos += (size_t)v->n * 8;
        break;
    case P11G_VK_TEMPLATE: {
        size_t start = d->pos;
        p11g_dec_u32(d, &v->n);
        d->pos = start;
        skip_level(d, 1, &budget);
        v->p = d->p + start + 4;
        v->avail = d->end - (start + 4);
        break;
    }
    default:
        break;
    }
}

/* The size of a value in the caller's layout; 0 with *ok = 0 when it cannot
 * be represented (a CK_ULONG beyond this platform's range). */
static CK_ULONG c_size(const struct tval *v, int *ok)
{
    *ok = 1;
    switch (v->kind) {
    case P11G_VK_BYTES:
        return v->n;
    case P11G_VK_ULONG:
        if (v->h > (uint64_t)(CK_ULONG)-1)
            *ok = 0;
        return sizeof(CK_ULONG);
    case P11G_VK_ULONG_ARRAY:
        return (CK_ULONG)v->n * sizeof(CK_ULONG);
    case P11G_VK_TEMPLATE:
        return (CK_ULONG)v->n * sizeof(CK_ATTRIBUTE);
    default:
        *ok = 0;
        return 0;
    }
}

static void put_ulong(void *dst, uint64_t v)
{
    CK_ULONG u = (CK_ULONG)v;
    memcpy(dst, &u, sizeof u);
}

/* Fills one caller attribute from v; depth 0 may hold a template.  *rv gets
 * CKR_BUFFER_TOO_SMALL when a buffer is too small and nothing worse is set. */
static void fill_one(CK_ATTRIBUTE *a, const struct tval *v, int depth, CK_RV *tooSmall)
{
    int ok;
    CK_ULONG need = c_size(v, &ok);
    if (!ok || (v->kind == P11G_VK_TEMPLATE && depth > 0)) {
        a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return;
    }
    if (a->pValue == NULL) {
        a->ulValueLen = need;
        return;
    }
    if (a->ulValueLen < need) {
        a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
        *tooSmall = CKR_BUFFER_TOO_SMALL;
        return;
    }
    switch (v->kind) {
    case P11G_VK_BYTES:
        if (v->n)
            memcpy(a->pValue, v->p, v->n);
        break;
    case P11G_VK_ULONG:
        put_ulong(a->pValue, v->h);
        break;
    case P11G_VK_ULONG_ARRAY:
        for (uint32_t j = 0; j < v->n; j++)
            put_ulong((uint8_t *)a->pValue + (size_t)j * sizeof(CK_ULONG),
                      p11g_list_get(v->p, j));
        break;
    case P11G_VK_TEMPLATE: {
        struct p11g_dec d;
        CK_ATTRIBUTE *inner = a->pValue;
        p11g_dec_init(&d, v->p, v->avail); /* validated by skip_level() */
        for (uint32_t j = 0; j < v->n; j++) {
            struct tval iv;
            next_val(&d, &iv);
            inner[j].type = (CK_ATTRIBUTE_TYPE)iv.type;
            if (iv.kind == P11G_VK_UNAVAILABLE)
                inner[j].ulValueLen = CK_UNAVAILABLE_INFORMATION;
            else
                fill_one(&inner[j], &iv, depth + 1, tooSmall);
        }
        break;
    }
    default:
        break;
    }
    a->ulValueLen = need;
}

CK_RV p11g_v4_tmpl_fill(CK_ATTRIBUTE *t, CK_ULONG n, const uint8_t *wire, uint32_t wire_len,
                        CK_RV mrv)
{
    struct p11g_dec d;
    uint32_t count;
    p11g_dec_init(&d, wire, wire_len);
    if (p11g_dec_u32(&d, &count) != 0)
        return CKR_DEVICE_ERROR;
    if (count == 0 && n != 0 && mrv != CKR_OK)
        return mrv; /* nothing came back: nothing to fill in */
    if (count != n)
        return CKR_DEVICE_ERROR;
    /* Pass 1: the reply answers our types, in order. */
    for (uint32_t i = 0; i < count; i++) {
        struct tval v;
        next_val(&d, &v);
        if (v.type != t[i].type)
            return CKR_DEVICE_ERROR;
    }
    /* Pass 2: fill in. */
    CK_RV tooSmall = CKR_OK;
    p11g_dec_init(&d, wire, wire_len);
    p11g_dec_u32(&d, &count);
    for (uint32_t i = 0; i < count; i++) {
        struct tval v;
        next_val(&d, &v);
        if (v.kind == P11G_VK_UNAVAILABLE)
            t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
        else
            fill_one(&t[i], &v, 0, &tooSmall);
    }
    return mrv != CKR_OK ? mrv : tooSmall;
}
