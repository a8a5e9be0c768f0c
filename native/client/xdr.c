/* xdr.c: the XDR subset of the protocol (RFC 4506 words, hypers, opaques).
 * The encoder grows up to a hard maximum; the decoder never reads past its end
 * and checks every length against both the bytes present and a caller bound. */
#include <stdlib.h>
#include <string.h>

#include "p11g.h"

void p11g_enc_init(struct p11g_enc *e, size_t max)
{
    e->p = NULL;
    e->len = e->cap = 0;
    e->max = max;
    e->err = P11G_OK;
}

void p11g_enc_free(struct p11g_enc *e)
{
    if (e->p != NULL) {
        /* Calls carry PINs and key material: wipe before freeing. */
        memset(e->p, 0, e->cap);
        __asm__ __volatile__("" : : "r"(e->p) : "memory");
        free(e->p);
    }
    e->p = NULL;
    e->len = e->cap = 0;
}

static uint8_t *enc_space(struct p11g_enc *e, size_t n)
{
    if (e->err != P11G_OK)
        return NULL;
    if (n > e->max || e->len > e->max - n) {
        e->err = P11G_E_TOOBIG;
        return NULL;
    }
    if (e->len + n > e->cap) {
        size_t cap = e->cap ? e->cap : 256;
        while (cap < e->len + n)
            cap = cap > e->max / 2 ? e->max : cap * 2;
        uint8_t *np = malloc(cap);
        if (np == NULL) {
            e->err = P11G_E_NOMEM;
            return NULL;
        }
        if (e->p != NULL) {
            memcpy(np, e->p, e->len);
            memset(e->p, 0, e->cap);
            free(e->p);
        }
        e->p = np;
        e->cap = cap;
    }
    uint8_t *at = e->p + e->len;
    e->len += n;
    return at;
}

void p11g_enc_u32(struct p11g_enc *e, uint32_t v)
{
    uint8_t *b = enc_space(e, 4);
    if (b == NULL)
        return;
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

void p11g_enc_u64(struct p11g_enc *e, uint64_t v)
{
    p11g_enc_u32(e, (uint32_t)(v >> 32));
    p11g_enc_u32(e, (uint32_t)v);
}

void p11g_enc_opaque(struct p11g_enc *e, const void *p, size_t n)
{
    if (n > 0xFFFFFFF0u) {
        if (e->err == P11G_OK)
            e->err = P11G_E_TOOBIG;
        return;
    }
    size_t padded = (n + 3) & ~(size_t)3;
    p11g_enc_u32(e, (uint32_t)n);
    uint8_t *b = enc_space(e, padded);
    if (b == NULL)
        return;
    if (p != NULL && n > 0)
        memcpy(b, p, n);
    else
        memset(b, 0, n);
    memset(b + n, 0, padded - n);
}

void p11g_dec_init(struct p11g_dec *d, const uint8_t *p, size_t n)
{
    d->p = p;
    d->pos = 0;
    d->end = n;
}

int p11g_dec_u32(struct p11g_dec *d, uint32_t *v)
{
    if (d->end - d->pos < 4)
        return -1;
    const uint8_t *b = d->p + d->pos;
    *v = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
    d->pos += 4;
    return 0;
}

int p11g_dec_u64(struct p11g_dec *d, uint64_t *v)
{
    uint32_t hi, lo;
    if (d->end - d->pos < 8)
        return -1;
    p11g_dec_u32(d, &hi);
    p11g_dec_u32(d, &lo);
    *v = ((uint64_t)hi << 32) | lo;
    return 0;
}

int p11g_dec_opaque(struct p11g_dec *d, const uint8_t **p, uint32_t *n, uint32_t max)
{
    uint32_t len;
    if (p11g_dec_u32(d, &len) != 0)
        return -1;
    if (len > max)
        return -1;
    size_t padded = ((size_t)len + 3) & ~(size_t)3;
    if (d->end - d->pos < padded)
        return -1;
    *p = d->p + d->pos;
    *n = len;
    d->pos += padded;
    return 0;
}
