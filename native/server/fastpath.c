/*
 * p11guard server fast path (see fastpath.h).
 *
 * A worker's Python loop hands the connected socket to p11g_fast_serve() while
 * nothing else runs in the worker.  Each read that holds exactly one whole
 * single-fragment AUTH_NONE call of the connection's program and version, for
 * a procedure Python marked as servable, is decoded, run and answered here.
 * Anything else - another procedure, a mechanism with a parameter, a byte
 * string over the bound, trailing bytes, several records, fragments, garbage -
 * goes back to Python untouched (the return value says how many bytes were
 * read), and Python's path produces the answer, including every error reply.
 *
 * Python marks a procedure servable only when its answer here is exactly the
 * one its own path would give: the policy has no unit for the function, no
 * debug logging is on, and the shape below reproduces the dispatcher's rules
 * (output buffer sizes, retries on CKR_BUFFER_TOO_SMALL, bounds).
 *
 * Every length from the network is checked against what was read and against
 * max_opaque / max_list before use; every length from the module is checked
 * against the buffer it was given.
 */
#define _GNU_SOURCE

#include "fastpath.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

#define LAST_FRAGMENT 0x80000000u
#define CALL_HEADER 44  /* record mark + xid .. verifier length: 11 words */
#define REPLY_HEADER 28 /* record mark + xid, REPLY, ACCEPTED, AUTH_NONE, 0, SUCCESS */
#define OUT_LEN_NULL UINT64_MAX
#define SCRATCH_KEEP (1u << 20) /* a larger reply buffer is freed after use */

/* ---- reading the arguments ------------------------------------------------ */

struct rd {
    const uint8_t *p;
    size_t n, pos;
    uint64_t max_opaque;
};

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int rd_u32(struct rd *r, uint32_t *v)
{
    if (r->n - r->pos < 4)
        return -1;
    *v = be32(r->p + r->pos);
    r->pos += 4;
    return 0;
}

static int rd_u64(struct rd *r, uint64_t *v)
{
    if (r->n - r->pos < 8)
        return -1;
    *v = ((uint64_t)be32(r->p + r->pos) << 32) | be32(r->p + r->pos + 4);
    r->pos += 8;
    return 0;
}

/* A variable-length opaque: a pointer into the record (never NULL). */
static int rd_opaque(struct rd *r, const uint8_t **data, uint64_t *len)
{
    uint32_t n;
    if (rd_u32(r, &n) != 0 || n > r->max_opaque)
        return -1;
    size_t padded = (size_t)n + ((4 - (n & 3)) & 3);
    if (r->n - r->pos < padded)
        return -1;
    *data = r->p + r->pos;
    *len = n;
    r->pos += padded;
    return 0;
}

/* A mechanism without parameter: Caml Crush's (type, empty opaque) or
 * p11guard's (type, NONE tag).  Anything else is Python's to convert. */
static int rd_bare_mechanism(struct rd *r, uint32_t version, uint32_t tag_none, uint64_t *type)
{
    if (rd_u64(r, type) != 0)
        return -1;
    if (version == 3) {
        const uint8_t *param;
        uint64_t len;
        return rd_opaque(r, &param, &len) == 0 && len == 0 ? 0 : -1;
    }
    uint32_t tag;
    return rd_u32(r, &tag) == 0 && tag == tag_none ? 0 : -1;
}

/* A version-4 typed template of plain values (fastpath.py: FIND_INIT): BYTES
 * and ULONG attributes only, at most MAX_TEMPLATE of them.  Declined (-1):
 * nested templates, arrays, byte strings for CK_ATTRIBUTE-array types (the
 * dispatcher refuses those), and any one-byte value other than 0x00/0x01 -
 * it may be a non-canonical CK_BBOOL, which the policy's canonical-booleans
 * unit rewrites: so the calls served here are exactly those it leaves alone. */
#define MAX_TEMPLATE 32
#define CKF_ARRAY_ATTRIBUTE_BIT 0x40000000UL
#define KIND_BYTES 0
#define KIND_ULONG 1

struct plain_template {
    CK_ATTRIBUTE attrs[MAX_TEMPLATE];
    CK_ULONG ulongs[MAX_TEMPLATE];
    CK_ULONG count;
};

static int rd_plain_template(struct rd *r, struct plain_template *t)
{
    static CK_BYTE empty; /* a valid pointer for zero-length values */
    uint32_t n;
    if (rd_u32(r, &n) != 0 || n > MAX_TEMPLATE)
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t type;
        uint32_t kind;
        if (rd_u64(r, &type) != 0 || rd_u32(r, &kind) != 0)
            return -1;
        CK_ATTRIBUTE *a = &t->attrs[i];
        a->type = type;
        if (kind == KIND_ULONG) {
            uint64_t value;
            if (rd_u64(r, &value) != 0 || value > (CK_ULONG)-1)
                return -1;
            t->ulongs[i] = (CK_ULONG)value;
            a->pValue = &t->ulongs[i];
            a->ulValueLen = sizeof(CK_ULONG);
        } else if (kind == KIND_BYTES) {
            const uint8_t *v;
            uint64_t len;
            if (rd_opaque(r, &v, &len) != 0)
                return -1;
            if ((len > 0 && (type & CKF_ARRAY_ATTRIBUTE_BIT)) || (len == 1 && v[0] > 1))
                return -1;
            a->pValue = len ? (void *)v : (void *)&empty;
            a->ulValueLen = len;
        } else {
            return -1;
        }
    }
    t->count = n;
    return 0;
}

/* ---- writing the reply ---------------------------------------------------- */

/* The reply buffer of the calling thread: the worker may run calls on several
 * threads (p11g_fast_call); one connection per process, so one set of them. */
static _Thread_local uint8_t *scratch;
static _Thread_local size_t scratch_cap;

/* Replies from several threads go out whole, one at a time (Python's sends
 * too: p11g_fast_send). */
static pthread_mutex_t send_lock = PTHREAD_MUTEX_INITIALIZER;

static int reserve(size_t need)
{
    if (need <= scratch_cap)
        return 0;
    size_t cap = scratch_cap ? (size_t)scratch_cap : 4096;
    while (cap < need)
        cap *= 2;
    uint8_t *p = realloc(scratch, cap);
    if (p == NULL)
        return -1;
    scratch = p;
    scratch_cap = cap;
    return 0;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

/* ---- calling the module --------------------------------------------------- */

typedef CK_RV (*fn_handle)(CK_ULONG);
typedef CK_RV (*fn_info)(CK_SESSION_HANDLE, CK_SESSION_INFO *);
typedef CK_RV (*fn_open)(CK_SLOT_ID, CK_FLAGS, void *, CK_NOTIFY, CK_SESSION_HANDLE *);
typedef CK_RV (*fn_bytes)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);
typedef CK_RV (*fn_data_out)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
typedef CK_RV (*fn_final_out)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG *);
typedef CK_RV (*fn_data2_in)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG);
typedef CK_RV (*fn_mech)(CK_SESSION_HANDLE, CK_MECHANISM *);
typedef CK_RV (*fn_mech_key)(CK_SESSION_HANDLE, CK_MECHANISM *, CK_OBJECT_HANDLE);
typedef CK_RV (*fn_find)(CK_SESSION_HANDLE, CK_OBJECT_HANDLE *, CK_ULONG, CK_ULONG *);
typedef CK_RV (*fn_find_init)(CK_SESSION_HANDLE, CK_ATTRIBUTE *, CK_ULONG);

static void *function_at(const struct p11g_fast *st, uint16_t offset)
{
    void *fp;
    memcpy(&fp, (const uint8_t *)(uintptr_t)st->functions + offset, sizeof fp);
    return fp;
}

/* The reply is laid out in scratch: REPLY_HEADER bytes (filled last),
 * then the result.  An output byte string is written by the module in place,
 * right after rv and the opaque's length word (OUT_AT). */
#define RV_AT REPLY_HEADER
#define OUT_AT (REPLY_HEADER + 8 + 4)

static uint8_t *output_room(uint64_t cap)
{
    if (reserve(OUT_AT + (size_t)cap + 3 + 8) != 0)
        return NULL;
    return scratch + OUT_AT;
}

/* rv, an opaque of `len` bytes already at OUT_AT, optionally one more word. */
static size_t finish_output(CK_RV rv, size_t len, int tail, uint64_t word)
{
    uint8_t *p = scratch;
    put64(p + RV_AT, rv);
    put32(p + RV_AT + 8, (uint32_t)len);
    size_t pos = OUT_AT + len;
    while (pos & 3)
        p[pos++] = 0;
    if (tail) {
        put64(p + pos, word);
        pos += 8;
    }
    return pos;
}

/* The dispatcher's output rule (v3 and v4; dispatch.py and dispatch_v4.py,
 * _output_call): a first buffer of input length + slack (v4: at most the
 * caller's size), one more call with the exact size on CKR_BUFFER_TOO_SMALL
 * when that fits the bound (v4: the caller's buffer).  A v4 NULL output is a
 * length query.  Returns the reply length, 0 when out of memory. */
static size_t call_output(struct p11g_fast *st, void *fp, int with_data, CK_SESSION_HANDLE s,
                          const uint8_t *data, uint64_t dlen, uint64_t out_len)
{
    int v4 = st->version == 4;
    CK_ULONG got = 0;
    CK_RV rv;
    if (v4 && out_len == OUT_LEN_NULL) {
        if (reserve(OUT_AT + 8) != 0)
            return 0;
        rv = with_data ? ((fn_data_out)fp)(s, (CK_BYTE *)data, dlen, NULL, &got)
                       : ((fn_final_out)fp)(s, NULL, &got);
        return finish_output(rv, 0, 1, got);
    }
    uint64_t cap = st->max_opaque;
    if (v4 && out_len < cap)
        cap = out_len;
    uint64_t guess = dlen + st->output_slack;
    if (v4 && guess > cap)
        guess = cap;
    for (int attempt = 0;; attempt++) {
        uint8_t *out = output_room(guess ? guess : 1);
        if (out == NULL)
            return 0;
        got = (CK_ULONG)guess;
        rv = with_data ? ((fn_data_out)fp)(s, (CK_BYTE *)data, dlen, out, &got)
                       : ((fn_final_out)fp)(s, out, &got);
        if (attempt == 0 && rv == CKR_BUFFER_TOO_SMALL && guess < got && got <= cap) {
            guess = got;
            continue;
        }
        break;
    }
    size_t len = 0;
    if (rv == CKR_OK) {
        if (got > guess)
            rv = CKR_GENERAL_ERROR; /* the module claims more than our buffer */
        else
            len = (size_t)got;
    }
    return finish_output(rv, len, v4, got);
}

/* rv and then `n` more words. */
static size_t words_reply(CK_RV rv, const uint64_t *w, size_t n)
{
    if (reserve(RV_AT + 8 * (n + 1)) != 0)
        return 0;
    put64(scratch + RV_AT, rv);
    for (size_t i = 0; i < n; i++)
        put64(scratch + RV_AT + 8 * (i + 1), w[i]);
    return RV_AT + 8 * (n + 1);
}

/* Decode and run one call, leaving the result after the header in
 * scratch.  Returns the reply length; DECLINE (Python's path takes the
 * call: nothing was run) or NO_MEMORY. */
#define DECLINE ((size_t)0)
#define NO_MEMORY ((size_t)1)

static size_t run(struct p11g_fast *st, const struct p11g_fast_proc *proc, struct rd *r)
{
    void *fp = function_at(st, proc->fn);
    uint64_t a, b, c = 0;
    const uint8_t *d1, *d2;
    uint64_t l1, l2;
    size_t n;
    switch (proc->shape) {
    case P11G_SHAPE_HANDLE:
        if (rd_u64(r, &a) != 0 || r->pos != r->n)
            return DECLINE;
        n = words_reply(((fn_handle)fp)(a), NULL, 0);
        break;
    case P11G_SHAPE_SESSION_INFO: {
        if (rd_u64(r, &a) != 0 || r->pos != r->n)
            return DECLINE;
        CK_SESSION_INFO info;
        memset(&info, 0, sizeof info);
        CK_RV rv = ((fn_info)fp)(a, &info);
        uint64_t w[4] = {0, 0, 0, 0}; /* zeroed unless CKR_OK, as rv_only_result */
        if (rv == CKR_OK) {
            w[0] = info.slotID;
            w[1] = info.state;
            w[2] = info.flags;
            w[3] = info.ulDeviceError;
        }
        n = words_reply(rv, w, 4);
        break;
    }
    case P11G_SHAPE_OPEN_SESSION: {
        if (rd_u64(r, &a) != 0 || rd_u64(r, &b) != 0 || r->pos != r->n)
            return DECLINE;
        CK_SESSION_HANDLE h = 0;
        CK_RV rv = ((fn_open)fp)(a, b, NULL, NULL, &h);
        uint64_t w = h;
        n = words_reply(rv, &w, 1);
        break;
    }
    case P11G_SHAPE_RANDOM: {
        if (rd_u64(r, &a) != 0 || rd_u64(r, &b) != 0 || r->pos != r->n)
            return DECLINE;
        if (b > st->max_opaque) {
            n = output_room(0) ? finish_output(CKR_DATA_LEN_RANGE, 0, 0, 0) : 0;
            break;
        }
        uint8_t *out = output_room(b ? b : 1);
        if (out == NULL)
            return NO_MEMORY;
        CK_RV rv = ((fn_bytes)fp)(a, out, b);
        n = finish_output(rv, rv == CKR_OK ? (size_t)b : 0, 0, 0);
        break;
    }
    case P11G_SHAPE_DATA_OUT:
        if (rd_u64(r, &a) != 0 || rd_opaque(r, &d1, &l1) != 0 ||
            (st->version == 4 && rd_u64(r, &c) != 0) || r->pos != r->n)
            return DECLINE;
        n = call_output(st, fp, 1, a, d1, l1, c);
        break;
    case P11G_SHAPE_FINAL_OUT:
        if (rd_u64(r, &a) != 0 || (st->version == 4 && rd_u64(r, &c) != 0) || r->pos != r->n)
            return DECLINE;
        n = call_output(st, fp, 0, a, NULL, 0, c);
        break;
    case P11G_SHAPE_DATA_IN:
        if (rd_u64(r, &a) != 0 || rd_opaque(r, &d1, &l1) != 0 || r->pos != r->n)
            return DECLINE;
        n = words_reply(((fn_bytes)fp)(a, (CK_BYTE *)d1, l1), NULL, 0);
        break;
    case P11G_SHAPE_DATA2_IN:
        if (rd_u64(r, &a) != 0 || rd_opaque(r, &d1, &l1) != 0 ||
            rd_opaque(r, &d2, &l2) != 0 || r->pos != r->n)
            return DECLINE;
        n = words_reply(((fn_data2_in)fp)(a, (CK_BYTE *)d1, l1, (CK_BYTE *)d2, l2), NULL, 0);
        break;
    case P11G_SHAPE_MECH:
    case P11G_SHAPE_MECH_KEY: {
        if (rd_u64(r, &a) != 0 || rd_bare_mechanism(r, st->version, st->tag_none, &b) != 0)
            return DECLINE;
        if (proc->shape == P11G_SHAPE_MECH_KEY && rd_u64(r, &c) != 0)
            return DECLINE;
        if (r->pos != r->n)
            return DECLINE;
        CK_MECHANISM m = {b, NULL, 0};
        CK_RV rv = proc->shape == P11G_SHAPE_MECH ? ((fn_mech)fp)(a, &m)
                                                  : ((fn_mech_key)fp)(a, &m, c);
        n = words_reply(rv, NULL, 0);
        break;
    }
    case P11G_SHAPE_FIND: {
        if (rd_u64(r, &a) != 0 || rd_u64(r, &b) != 0 || r->pos != r->n)
            return DECLINE;
        if (b > st->max_list)
            b = st->max_list;
        CK_OBJECT_HANDLE one = 0, *hs = &one;
        if (b > 1 && (hs = calloc((size_t)b, sizeof *hs)) == NULL)
            return NO_MEMORY;
        CK_ULONG found = 0;
        CK_RV rv = ((fn_find)fp)(a, hs, b, &found);
        if (rv == CKR_OK && found > b)
            rv = CKR_GENERAL_ERROR; /* more than our array */
        if (rv != CKR_OK)
            found = 0;
        /* rv, objects (count word + hypers), count */
        n = 0;
        if (reserve(RV_AT + 8 + 4 + 8 * (size_t)found + 8) == 0) {
            uint8_t *p = scratch;
            put64(p + RV_AT, rv);
            put32(p + RV_AT + 8, (uint32_t)found);
            size_t pos = RV_AT + 12;
            for (CK_ULONG i = 0; i < found; i++, pos += 8)
                put64(p + pos, hs[i]);
            put64(p + pos, found);
            n = pos + 8;
        }
        if (hs != &one)
            free(hs);
        break;
    }
    case P11G_SHAPE_FIND_INIT: {
        struct plain_template t;
        if (st->version != 4 || rd_u64(r, &a) != 0 || rd_plain_template(r, &t) != 0 ||
            r->pos != r->n)
            return DECLINE;
        /* An empty template is NULL, 0 (as binding.py passes it). */
        n = words_reply(((fn_find_init)fp)(a, t.count ? t.attrs : NULL, t.count), NULL, 0);
        break;
    }
    default:
        return DECLINE;
    }
    return n ? n : NO_MEMORY;
}

/* ---- the loop ------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int send_all(int fd, const uint8_t *p, size_t n)
{
    int err = 0;
    pthread_mutex_lock(&send_lock);
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            err = errno ? errno : EIO;
            break;
        }
        p += w;
        n -= (size_t)w;
    }
    pthread_mutex_unlock(&send_lock);
    return err;
}

/* Is the next call already waiting?  (Checked before a long call's reply is
 * sent: afterwards a serial client's next call would look the same.) */
static int input_pending(int fd)
{
    uint8_t byte;
    return recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

static void release_scratch(void)
{
    if (scratch_cap > SCRATCH_KEEP) {
        free(scratch);
        scratch = NULL;
        scratch_cap = 0;
    }
}

/* One record of n bytes: served (1, reply sent), declined (0: not a call
 * for here, nothing ran) or an error (< 0: the call may have run).  *overlap
 * (may be NULL) is set when a long call ended with the next one waiting. */
static long serve_record(struct p11g_fast *st, const uint8_t *buf, size_t n, int *overlap)
{
    if (n < CALL_HEADER)
        return 0;
    uint32_t w[11];
    for (int i = 0; i < 11; i++)
        w[i] = be32(buf + 4 * i);
    /* mark, xid, CALL, RPC 2, program, version, procedure, AUTH_NONE, 0, AUTH_NONE, 0 */
    if (w[0] != (LAST_FRAGMENT | (uint32_t)(n - 4)) || w[2] != 0 || w[3] != 2 ||
        w[4] != st->program || w[5] != st->version || w[6] >= P11G_FAST_MAX_PROC ||
        w[7] != 0 || w[8] != 0 || w[9] != 0 || w[10] != 0)
        return 0;
    const struct p11g_fast_proc *proc = &st->procs[w[6]];
    if (proc->shape == P11G_SHAPE_NONE || proc->shape >= P11G_SHAPE_COUNT)
        return 0;
    struct rd r = {buf + CALL_HEADER, n - CALL_HEADER, 0, st->max_opaque};
    uint64_t started = (overlap != NULL && (proc->flags & P11G_FAST_LONG)) ? now_ns() : 0;
    size_t len = run(st, proc, &r);
    if (len == DECLINE)
        return 0;
    if (len == NO_MEMORY)
        return P11G_FAST_NO_MEMORY; /* the call ran: the connection must end */
    uint8_t *p = scratch;
    put32(p, LAST_FRAGMENT | (uint32_t)(len - 4));
    put32(p + 4, w[1]); /* xid */
    put32(p + 8, 1);    /* REPLY */
    put32(p + 12, 0);   /* MSG_ACCEPTED */
    put32(p + 16, 0);   /* verifier AUTH_NONE */
    put32(p + 20, 0);   /* verifier length */
    put32(p + 24, 0);   /* SUCCESS */
    if (started && now_ns() - started >= st->long_call_ns && input_pending(st->fd))
        *overlap = 1;
    int err = send_all(st->fd, p, len);
    __atomic_add_fetch(&st->calls, 1, __ATOMIC_RELAXED);
    release_scratch();
    if (err != 0) {
        st->error = err;
        return P11G_FAST_SOCKET_ERROR;
    }
    return 1;
}

long p11g_fast_serve(struct p11g_fast *st, uint8_t *buf, size_t cap)
{
    for (;;) {
        ssize_t got = recv(st->fd, buf, cap, 0);
        if (got == 0)
            return P11G_FAST_EOF;
        if (got < 0) {
            if (errno == EINTR)
                return P11G_FAST_INTERRUPTED;
            st->error = errno;
            return P11G_FAST_SOCKET_ERROR;
        }
        int overlap = 0;
        long r = serve_record(st, buf, (size_t)got, &overlap);
        if (r == 0)
            return got;
        if (r < 0)
            return r;
        if (overlap)
            return P11G_FAST_OVERLAP;
    }
}

long p11g_fast_call(struct p11g_fast *st, const uint8_t *record, size_t n)
{
    int overlap = 0;
    long r = serve_record(st, record, n, &overlap);
    return r == 1 && overlap ? 2 : r;
}

long p11g_fast_send(struct p11g_fast *st, const uint8_t *data, size_t n)
{
    int err = send_all(st->fd, data, n);
    return err ? -(long)err : 0;
}

size_t p11g_fast_struct_size(void)
{
    return sizeof(struct p11g_fast);
}
