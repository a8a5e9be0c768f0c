/*
 * p11guard server fast path: the worker's call loop for the simplest calls,
 * in C (see fastpath.c and docs/ARCHITECTURE.md, "Fast path in C").
 *
 * The Python worker fills a struct p11g_fast (which procedures may be served
 * here, with which shape, and where the PKCS#11 function sits in the module's
 * CK_FUNCTION_LIST) and calls p11g_fast_serve() with the GIL released.  The
 * declarations are repeated in src/p11guard/server/fastpath.py (cffi cdef);
 * p11g_fast_struct_size() lets Python check that both agree.
 */
#ifndef P11GUARD_FASTPATH_H
#define P11GUARD_FASTPATH_H

#include <stddef.h>
#include <stdint.h>

#define P11G_FAST_MAX_PROC 128

/* Shapes: how arguments are decoded, the function called and the result encoded. */
enum p11g_fast_shape {
    P11G_SHAPE_NONE = 0,     /* not served here */
    P11G_SHAPE_HANDLE,       /* (h) -> rv                      fn(h) */
    P11G_SHAPE_SESSION_INFO, /* (s) -> rv, 4 words             fn(s, &info) */
    P11G_SHAPE_OPEN_SESSION, /* (slot, flags) -> rv, handle    fn(slot, flags, NULL, NULL, &h) */
    P11G_SHAPE_RANDOM,       /* (s, len) -> rv, bytes          fn(s, buf, len) */
    P11G_SHAPE_DATA_OUT,     /* (s, data[, out_len]) -> rv, bytes[, len]  fn(s, d, dl, o, &ol) */
    P11G_SHAPE_FINAL_OUT,    /* (s[, out_len]) -> rv, bytes[, len]        fn(s, o, &ol) */
    P11G_SHAPE_DATA_IN,      /* (s, data) -> rv                fn(s, d, dl) */
    P11G_SHAPE_DATA2_IN,     /* (s, data, data2) -> rv         fn(s, d, dl, d2, d2l) */
    P11G_SHAPE_MECH,         /* (s, mech) -> rv                fn(s, &m)      no parameter */
    P11G_SHAPE_MECH_KEY,     /* (s, mech, key) -> rv           fn(s, &m, key) no parameter */
    P11G_SHAPE_FIND,         /* (s, max) -> rv, handles, count fn(s, hs, max, &n) */
    P11G_SHAPE_FIND_INIT,    /* (s, template) -> rv           fn(s, attrs, n)  v3: native layout */
    P11G_SHAPE_COUNT
};

/* p11g_fast_proc.flags */
#define P11G_FAST_LONG 1u /* may take long: check whether the client overlaps calls */

struct p11g_fast_proc {
    uint8_t shape;
    uint8_t flags;
    uint16_t fn; /* byte offset of the function pointer in CK_FUNCTION_LIST */
};

struct p11g_fast {
    /* set by Python */
    int32_t fd;
    uint32_t program;
    uint32_t version;      /* 3: Caml Crush's encoding, 4: p11guard's */
    uint32_t tag_none;     /* version 4: the typed-parameter tag meaning "no parameter" */
    uint64_t functions;    /* CK_FUNCTION_LIST * as an integer */
    uint64_t max_opaque;   /* bound of any byte string in or out */
    uint64_t max_list;     /* bound of FindObjects' max_count */
    uint64_t output_slack; /* first output buffer: input length + this */
    uint64_t long_call_ns; /* a P11G_FAST_LONG call this long triggers the overlap check */
    uint64_t memory_ns;    /* how long an overlap keeps long calls on pool threads */
    uint32_t max_threads;  /* threads per connection: the leader and max_threads - 1 in the pool */
    uint32_t reserved;
    struct p11g_fast_proc procs[P11G_FAST_MAX_PROC];
    /* set by C */
    uint64_t calls;        /* calls answered here (cumulative) */
    uint64_t pooled;       /* of them, run on pool threads */
    uint64_t concurrent_until_ns; /* CLOCK_MONOTONIC: until then long calls go to the pool */
    void *pool;            /* struct p11g_pool *, started on the first overlap */
    int32_t error;         /* errno of the socket error behind P11G_FAST_SOCKET_ERROR */
    int32_t failed;        /* a pool thread's error (< 0), for the leader */
};

/* p11g_fast_serve() results (> 0: that many bytes in buf for Python) */
#define P11G_FAST_EOF 0
#define P11G_FAST_SOCKET_ERROR (-1)
#define P11G_FAST_INTERRUPTED (-3) /* a signal: Python runs its handlers, then calls again */
#define P11G_FAST_NO_MEMORY (-4)

/* Read and serve calls until one needs Python (only while no other thread of
 * the worker runs a call).  While the client keeps several calls in flight,
 * long calls run on a pool of C threads (pool.h); they have all ended when
 * this returns.  > 0: that many bytes at the start of buf are Python's (the
 * first call is there). */
long p11g_fast_serve(struct p11g_fast *st, uint8_t *buf, size_t cap);
/* Serve one whole framed record already read: 1 served (reply sent), 2 served
 * and the next call was waiting when this long one ended, 0 not for here
 * (nothing ran), < 0 an error.  Any thread; the caller keeps the call's
 * session order (Python's session locks). */
long p11g_fast_call(struct p11g_fast *st, const uint8_t *record, size_t n);
/* Send bytes under the lock the replies of p11g_fast_* go out under:
 * 0, or -errno. */
long p11g_fast_send(struct p11g_fast *st, const uint8_t *data, size_t n);
/* The same with one descriptor passed along (SCM_RIGHTS, a Unix socket):
 * a channel's client end (server/channels.py).  0, or -errno. */
long p11g_fast_send_fd(struct p11g_fast *st, const uint8_t *data, size_t n, int32_t fd);
/* Stop the pool's threads (the connection is over). */
void p11g_fast_close(struct p11g_fast *st);
size_t p11g_fast_struct_size(void);

#endif
