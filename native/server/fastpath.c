/*
 * p11guard server fast path (see fastpath.h).
 *
 * A worker's Python loop hands the connected socket to p11g_fast_serve() while
 * nothing else runs in the worker.  It splits what it reads into records; each
 * whole single-fragment AUTH_NONE call of the connection's program and
 * version, for a procedure Python marked as servable, is decoded, run and
 * answered here.  At anything else - another procedure, a mechanism with a
 * parameter, a byte string over the bound, trailing bytes in a record,
 * fragments, garbage - it returns, and Python gets that record and every byte
 * read after it untouched; Python's path produces the answer, including every
 * error reply.
 *
 * While the client keeps several calls in flight, long calls (P11G_FAST_LONG)
 * run on a pool of threads (pool.c) and the leader goes on reading; a call
 * waits for the calls in flight on its session (or object or slot handle).
 * The pool is drained before Python gets the socket back.
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
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
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

/* FindObjectsInit's template (fastpath.py: FIND_INIT).  Version 4: a typed
 * template of plain values, BYTES and ULONG attributes only, at most
 * MAX_TEMPLATE of them.  Declined (-1):
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

/* A byte-string value into *a (pointing into the record), or -1 to decline. */
static int plain_bytes(CK_ATTRIBUTE *a, const uint8_t *v, uint64_t len)
{
    static CK_BYTE empty; /* a valid pointer for zero-length values */
    if ((len > 0 && (a->type & CKF_ARRAY_ATTRIBUTE_BIT)) || (len == 1 && v[0] > 1))
        return -1;
    a->pValue = len ? (void *)v : (void *)&empty;
    a->ulValueLen = len;
    return 0;
}

static int rd_plain_template(struct rd *r, struct plain_template *t)
{
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
            if (rd_opaque(r, &v, &len) != 0 || plain_bytes(a, v, len) != 0)
                return -1;
        } else {
            return -1;
        }
    }
    t->count = n;
    return 0;
}

/* A version-3 template: (type, value, length word) per attribute, values in
 * the client's layout.  Python puts FindObjectsInit in a version-3 plan only
 * when that layout is the module's, and then the dispatcher passes every
 * value as it is (the length word is not used): so does this.  Declined as
 * above: byte strings for array types, one-byte values other than 0/1, more
 * than MAX_TEMPLATE attributes. */
static int rd_v3_template(struct rd *r, struct plain_template *t)
{
    uint32_t n;
    if (rd_u32(r, &n) != 0 || n > MAX_TEMPLATE)
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *v;
        uint64_t type, len, length_word;
        if (rd_u64(r, &type) != 0 || rd_opaque(r, &v, &len) != 0 ||
            rd_u64(r, &length_word) != 0)
            return -1;
        t->attrs[i].type = type;
        if (plain_bytes(&t->attrs[i], v, len) != 0)
            return -1;
    }
    t->count = n;
    return 0;
}

/* ---- writing the reply ---------------------------------------------------- */

/* The reply buffer of the calling thread: the worker may run calls on several
 * threads (p11g_fast_call, and one thread per channel). */
static _Thread_local uint8_t *scratch;
static _Thread_local size_t scratch_cap;

/* Replies to one socket from several threads go out whole, one at a time
 * (Python's sends too: p11g_fast_send).  One lock per socket, found by its
 * descriptor: a worker's channels (server/channels.py) do not wait for each
 * other's sends.  Two sockets may share a lock; that only costs a wait. */
#define SEND_LOCKS 64
static pthread_mutex_t send_locks[SEND_LOCKS] = {
#define L4 PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, \
           PTHREAD_MUTEX_INITIALIZER
#define L16 L4, L4, L4, L4
    L16, L16, L16, L16
#undef L16
#undef L4
};

static pthread_mutex_t *send_lock_of(int fd)
{
    return &send_locks[(unsigned)fd % SEND_LOCKS];
}

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

/* One call's decoded arguments: pointers into its record, which must outlive
 * it.  `a` is always the first argument (a session, object or slot handle):
 * calls with the same `a` keep their order (the pool's key). */
struct call {
    const struct p11g_fast_proc *proc;
    uint32_t xid;
    uint64_t a, b, c;
    const uint8_t *d1, *d2;
    uint64_t l1, l2;
    struct plain_template t;
};

/* Decode the arguments of one call: 0, or -1 to decline (Python's path takes
 * the call; nothing ran). */
static int decode(const struct p11g_fast *st, struct rd *r, struct call *c)
{
    c->c = 0;
    if (rd_u64(r, &c->a) != 0)
        return -1;
    switch (c->proc->shape) {
    case P11G_SHAPE_HANDLE:
    case P11G_SHAPE_SESSION_INFO:
        break;
    case P11G_SHAPE_OPEN_SESSION:
    case P11G_SHAPE_RANDOM:
    case P11G_SHAPE_FIND:
        if (rd_u64(r, &c->b) != 0)
            return -1;
        break;
    case P11G_SHAPE_DATA_OUT:
        if (rd_opaque(r, &c->d1, &c->l1) != 0 || (st->version == 4 && rd_u64(r, &c->c) != 0))
            return -1;
        break;
    case P11G_SHAPE_FINAL_OUT:
        if (st->version == 4 && rd_u64(r, &c->c) != 0)
            return -1;
        break;
    case P11G_SHAPE_DATA_IN:
        if (rd_opaque(r, &c->d1, &c->l1) != 0)
            return -1;
        break;
    case P11G_SHAPE_DATA2_IN:
        if (rd_opaque(r, &c->d1, &c->l1) != 0 || rd_opaque(r, &c->d2, &c->l2) != 0)
            return -1;
        break;
    case P11G_SHAPE_MECH:
    case P11G_SHAPE_MECH_KEY:
        if (rd_bare_mechanism(r, st->version, st->tag_none, &c->b) != 0)
            return -1;
        if (c->proc->shape == P11G_SHAPE_MECH_KEY && rd_u64(r, &c->c) != 0)
            return -1;
        break;
    case P11G_SHAPE_FIND_INIT:
        if ((st->version == 4 ? rd_plain_template(r, &c->t) : rd_v3_template(r, &c->t)) != 0)
            return -1;
        break;
    default:
        return -1;
    }
    return r->pos == r->n ? 0 : -1;
}

/* A reply length of 0: out of memory. */
#define NO_MEMORY ((size_t)0)

/* FindObjects: rv, objects (count word + hypers), count. */
static size_t find_objects(struct p11g_fast *st, void *fp, CK_SESSION_HANDLE s, uint64_t max)
{
    if (max > st->max_list)
        max = st->max_list;
    CK_OBJECT_HANDLE one = 0, *hs = &one;
    if (max > 1 && (hs = calloc((size_t)max, sizeof *hs)) == NULL)
        return NO_MEMORY;
    CK_ULONG found = 0;
    CK_RV rv = ((fn_find)fp)(s, hs, max, &found);
    if (rv == CKR_OK && found > max)
        rv = CKR_GENERAL_ERROR; /* more than our array */
    if (rv != CKR_OK)
        found = 0;
    size_t n = NO_MEMORY;
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
    return n;
}

/* Run one decoded call, leaving the result after the header in scratch.
 * Returns the reply length, or NO_MEMORY. */
static size_t execute(struct p11g_fast *st, const struct call *c)
{
    void *fp = function_at(st, c->proc->fn);
    switch (c->proc->shape) {
    case P11G_SHAPE_HANDLE:
        return words_reply(((fn_handle)fp)(c->a), NULL, 0);
    case P11G_SHAPE_SESSION_INFO: {
        CK_SESSION_INFO info;
        memset(&info, 0, sizeof info);
        CK_RV rv = ((fn_info)fp)(c->a, &info);
        uint64_t w[4] = {0, 0, 0, 0}; /* zeroed unless CKR_OK, as rv_only_result */
        if (rv == CKR_OK) {
            w[0] = info.slotID;
            w[1] = info.state;
            w[2] = info.flags;
            w[3] = info.ulDeviceError;
        }
        return words_reply(rv, w, 4);
    }
    case P11G_SHAPE_OPEN_SESSION: {
        CK_SESSION_HANDLE h = 0;
        CK_RV rv = ((fn_open)fp)(c->a, c->b, NULL, NULL, &h);
        uint64_t w = h;
        return words_reply(rv, &w, 1);
    }
    case P11G_SHAPE_RANDOM: {
        if (c->b > st->max_opaque)
            return output_room(0) ? finish_output(CKR_DATA_LEN_RANGE, 0, 0, 0) : NO_MEMORY;
        uint8_t *out = output_room(c->b ? c->b : 1);
        if (out == NULL)
            return NO_MEMORY;
        CK_RV rv = ((fn_bytes)fp)(c->a, out, c->b);
        return finish_output(rv, rv == CKR_OK ? (size_t)c->b : 0, 0, 0);
    }
    case P11G_SHAPE_DATA_OUT:
        return call_output(st, fp, 1, c->a, c->d1, c->l1, c->c);
    case P11G_SHAPE_FINAL_OUT:
        return call_output(st, fp, 0, c->a, NULL, 0, c->c);
    case P11G_SHAPE_DATA_IN:
        return words_reply(((fn_bytes)fp)(c->a, (CK_BYTE *)c->d1, c->l1), NULL, 0);
    case P11G_SHAPE_DATA2_IN:
        return words_reply(((fn_data2_in)fp)(c->a, (CK_BYTE *)c->d1, c->l1, (CK_BYTE *)c->d2,
                                              c->l2), NULL, 0);
    case P11G_SHAPE_MECH:
    case P11G_SHAPE_MECH_KEY: {
        CK_MECHANISM m = {c->b, NULL, 0};
        CK_RV rv = c->proc->shape == P11G_SHAPE_MECH ? ((fn_mech)fp)(c->a, &m)
                                                     : ((fn_mech_key)fp)(c->a, &m, c->c);
        return words_reply(rv, NULL, 0);
    }
    case P11G_SHAPE_FIND:
        return find_objects(st, fp, c->a, c->b);
    case P11G_SHAPE_FIND_INIT:
        /* An empty template is NULL, 0 (as binding.py passes it). */
        return words_reply(((fn_find_init)fp)(c->a, c->t.count ? (CK_ATTRIBUTE *)c->t.attrs : NULL,
                                              c->t.count), NULL, 0);
    default:
        return NO_MEMORY; /* decode() declined every other shape */
    }
}

/* ---- the loop ------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The caller holds fd's send lock. */
static int send_locked(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno ? errno : EIO;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_all(int fd, const uint8_t *p, size_t n)
{
    pthread_mutex_t *lock = send_lock_of(fd);
    pthread_mutex_lock(lock);
    int err = send_locked(fd, p, n);
    pthread_mutex_unlock(lock);
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

/* The procedure of a record of n bytes that is one whole single-fragment
 * AUTH_NONE call of the connection's program and version for a procedure
 * served here; NULL otherwise. */
static const struct p11g_fast_proc *match_call(const struct p11g_fast *st, const uint8_t *buf,
                                               size_t n, uint32_t *xid)
{
    if (n < CALL_HEADER)
        return NULL;
    uint32_t w[11];
    for (int i = 0; i < 11; i++)
        w[i] = be32(buf + 4 * i);
    /* mark, xid, CALL, RPC 2, program, version, procedure, AUTH_NONE, 0, AUTH_NONE, 0 */
    if (w[0] != (LAST_FRAGMENT | (uint32_t)(n - 4)) || w[2] != 0 || w[3] != 2 ||
        w[4] != st->program || w[5] != st->version || w[6] >= P11G_FAST_MAX_PROC ||
        w[7] != 0 || w[8] != 0 || w[9] != 0 || w[10] != 0)
        return NULL;
    const struct p11g_fast_proc *proc = &st->procs[w[6]];
    if (proc->shape == P11G_SHAPE_NONE || proc->shape >= P11G_SHAPE_COUNT)
        return NULL;
    *xid = w[1];
    return proc;
}

/* Decode the record's arguments into *c: 0, or -1 (declined: Python's). */
static int decode_record(const struct p11g_fast *st, const uint8_t *buf, size_t n,
                         struct call *c)
{
    c->proc = match_call(st, buf, n, &c->xid);
    if (c->proc == NULL)
        return -1;
    struct rd r = {buf + CALL_HEADER, n - CALL_HEADER, 0, st->max_opaque};
    return decode(st, &r, c);
}

/* Run a decoded call and send its reply: 1, or < 0 (the call may have run:
 * the connection must end).  *overlap (NULL: not checked) is set when a long
 * call ended with the next call waiting. */
static long answer(struct p11g_fast *st, const struct call *c, int *overlap)
{
    uint64_t started = (overlap != NULL && (c->proc->flags & P11G_FAST_LONG)) ? now_ns() : 0;
    size_t len = execute(st, c);
    if (len == NO_MEMORY) {
        release_scratch();
        return P11G_FAST_NO_MEMORY;
    }
    uint8_t *p = scratch;
    put32(p, LAST_FRAGMENT | (uint32_t)(len - 4));
    put32(p + 4, c->xid);
    put32(p + 8, 1);  /* REPLY */
    put32(p + 12, 0); /* MSG_ACCEPTED */
    put32(p + 16, 0); /* verifier AUTH_NONE */
    put32(p + 20, 0); /* verifier length */
    put32(p + 24, 0); /* SUCCESS */
    if (started && now_ns() - started >= st->long_call_ns && input_pending(st->fd))
        *overlap = 1;
    int err = send_all(st->fd, p, len);
    __atomic_add_fetch(&st->calls, 1, __ATOMIC_RELAXED);
    release_scratch();
    if (err != 0) {
        __atomic_store_n(&st->error, err, __ATOMIC_RELAXED);
        return P11G_FAST_SOCKET_ERROR;
    }
    return 1;
}

/* ---- long calls on C threads ---------------------------------------------- */

/* A call handed to a pool thread, with its own copy of the record. */
struct job {
    struct p11g_fast *st;
    struct call call;
    uint8_t record[];
};

static void run_job(void *arg)
{
    struct job *job = arg;
    long r = answer(job->st, &job->call, NULL);
    if (r < 0) {
        int32_t none = 0;
        __atomic_compare_exchange_n(&job->st->failed, &none, (int32_t)r, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(&job->st->pooled, 1, __ATOMIC_RELAXED);
    free(job);
}

/* The client keeps several calls in flight: for a while, long calls run on
 * pool threads.  (Only the leader reads or writes concurrent_until_ns.) */
static void note_overlap(struct p11g_fast *st)
{
    if (st->max_threads > 1)
        st->concurrent_until_ns = now_ns() + st->memory_ns;
}

static struct p11g_pool *pool_of(struct p11g_fast *st)
{
    if (st->pool == NULL && st->max_threads > 1)
        st->pool = p11g_pool_new(st->max_threads - 1);
    return st->pool;
}

/* Hand a long call (already decoded once, in place) to a pool thread with
 * its own copy of the record, decoded again there: 1 handed over (or run here
 * when no thread could start), 0 declined, NOT_HANDED_OVER (out of memory:
 * run it here), < 0 another error. */
#define NOT_HANDED_OVER (-100)

static long hand_over(struct p11g_fast *st, struct p11g_pool *pool, const uint8_t *buf,
                      size_t n)
{
    struct job *job = malloc(sizeof *job + n);
    if (job == NULL)
        return NOT_HANDED_OVER;
    memcpy(job->record, buf, n);
    job->st = st;
    if (decode_record(st, job->record, n, &job->call) != 0) {
        free(job);
        return 0;
    }
    if (p11g_pool_submit(pool, job->call.a, run_job, job) != 0) {
        long r = answer(st, &job->call, NULL);
        free(job);
        return r;
    }
    return 1;
}

/* One whole record on the leader: 1 answered (or handed to a pool thread),
 * 0 declined (nothing ran: Python's), < 0 an error. */
static long lead_record(struct p11g_fast *st, const uint8_t *buf, size_t n)
{
    struct p11g_pool *pool = st->pool;
    if (pool != NULL && p11g_pool_in_flight(pool) > 0)
        note_overlap(st); /* a call arrived while another one runs */
    struct call c;
    if (decode_record(st, buf, n, &c) != 0)
        return 0;
    if ((c.proc->flags & P11G_FAST_LONG) && st->max_threads > 1 &&
        now_ns() < st->concurrent_until_ns && (pool = pool_of(st)) != NULL) {
        long r = hand_over(st, pool, buf, n);
        if (r != NOT_HANDED_OVER)
            return r;
    }
    if (pool != NULL)
        p11g_pool_wait_key(pool, c.a); /* calls on one session keep their order */
    int overlap = 0;
    long r = answer(st, &c, &overlap);
    if (overlap)
        note_overlap(st);
    return r;
}

/* ---- entry points ------------------------------------------------------------ */

long p11g_fast_serve(struct p11g_fast *st, uint8_t *buf, size_t cap)
{
    size_t start = 0, have = 0; /* bytes read and not served: buf[start, start + have) */
    long result = 0;
    int to_python = 0;
    for (;;) {
        if (have >= 4) {
            uint32_t mark = be32(buf + start);
            size_t len = (size_t)(mark & ~LAST_FRAGMENT) + 4;
            if (!(mark & LAST_FRAGMENT) || len > cap) {
                to_python = 1; /* fragments, or too long for the buffer */
                break;
            }
            if (have >= len) {
                long r = lead_record(st, buf + start, len);
                if (r <= 0) {
                    to_python = r == 0;
                    result = r;
                    break;
                }
                start += len;
                have -= len;
                if (have > 0)
                    note_overlap(st); /* the next call came with this one */
                int32_t failed = __atomic_load_n(&st->failed, __ATOMIC_RELAXED);
                if (failed != 0) {
                    result = failed;
                    break;
                }
                continue;
            }
        }
        if (start > 0) {
            memmove(buf, buf + start, have);
            start = 0;
        }
        ssize_t got = recv(st->fd, buf + have, cap - have, 0);
        if (got == 0) {
            result = P11G_FAST_EOF;
            break;
        }
        if (got < 0) {
            if (errno == EINTR) {
                result = P11G_FAST_INTERRUPTED;
            } else {
                st->error = errno;
                result = P11G_FAST_SOCKET_ERROR;
            }
            break;
        }
        have += (size_t)got;
    }
    /* Python takes over: nothing may run in C behind its back. */
    if (st->pool != NULL)
        p11g_pool_drain(st->pool);
    int32_t failed = __atomic_exchange_n(&st->failed, 0, __ATOMIC_RELAXED);
    if (failed != 0 && result >= 0)
        return failed;
    if ((to_python || result == P11G_FAST_EOF || result == P11G_FAST_INTERRUPTED) && have > 0) {
        memmove(buf, buf + start, have); /* Python reads what came, from the start */
        return (long)have;
    }
    return result;
}

long p11g_fast_call(struct p11g_fast *st, const uint8_t *record, size_t n)
{
    struct call c;
    if (decode_record(st, record, n, &c) != 0)
        return 0;
    int overlap = 0;
    long r = answer(st, &c, &overlap);
    return r == 1 && overlap ? 2 : r;
}

long p11g_fast_send(struct p11g_fast *st, const uint8_t *data, size_t n)
{
    int err = send_all(st->fd, data, n);
    return err ? -(long)err : 0;
}

long p11g_fast_send_fd(struct p11g_fast *st, const uint8_t *data, size_t n, int32_t fd)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = (void *)(uintptr_t)data, .iov_len = n};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                         .msg_controllen = sizeof control.bytes};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    int err = 0;
    pthread_mutex_t *lock = send_lock_of(st->fd);
    pthread_mutex_lock(lock);
    ssize_t w;
    do
        w = sendmsg(st->fd, &msg, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0)
        err = errno ? errno : EIO;
    else if ((size_t)w < n) /* the descriptor went with the first byte */
        err = send_locked(st->fd, data + w, n - (size_t)w);
    pthread_mutex_unlock(lock);
    return err ? -(long)err : 0;
}

void p11g_fast_close(struct p11g_fast *st)
{
    p11g_pool_free(st->pool);
    st->pool = NULL;
}

size_t p11g_fast_struct_size(void)
{
    return sizeof(struct p11g_fast);
}
