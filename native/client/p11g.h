/* p11g.h: internal interfaces of libp11guard.so (nothing here is exported). */
#ifndef P11G_H
#define P11G_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "pkcs11_3.h"

#define P11G_HIDDEN __attribute__((visibility("hidden")))
#define P11G_EXPORT __attribute__((visibility("default")))

/* ---- limits ------------------------------------------------------------ */
#define P11G_DEFAULT_TIMEOUT 25            /* seconds, like Caml Crush */
#define P11G_DEFAULT_MAX_RECORD ((size_t)16 * 1024 * 1024 + 64 * 1024)
#define P11G_MIN_MAX_RECORD ((size_t)64 * 1024)
#define P11G_FRAGMENT_MAX ((size_t)65532) /* what libtirpc sends; every server takes it */
#define P11G_MAX_MECH_PARAM ((size_t)64 * 1024)
#define P11G_MAX_NAME 1024
#define P11G_MAX_ADDR 1024
#define P11G_MAX_FIELDS 24
#define P11G_MAX_HOSTNAME 256

/* ---- configuration (config.c) ---------------------------------------- */
enum p11g_transport { P11G_TCP, P11G_UNIX };

struct p11g_config {
    enum p11g_transport transport;
    int tls;                  /* TLS over the stream (tls://, tls+unix://, host:port + CA) */
    char host[P11G_MAX_ADDR]; /* TCP host, or the Unix socket path */
    char port[16];
    char libname[P11G_MAX_NAME];
    int timeout_s;
    size_t max_record;
    int serial; /* 1: one call in flight per connection (PKCS11PROXY_SERIAL=1) */
    int channels; /* 1: threads may get channels (channels.c; PKCS11PROXY_CHANNELS=0: no) */
    char ca_file[P11G_MAX_ADDR], cert_file[P11G_MAX_ADDR], key_file[P11G_MAX_ADDR];
    /* TLS server authentication: the chain is always verified; the name too
     * unless PKCS11PROXY_TLS_VERIFY_HOSTNAME=0.  server_name is the name
     * checked (and sent as SNI when it is not an address). */
    int verify_hostname;
    char server_name[P11G_MAX_HOSTNAME];
    int tls13_only; /* PKCS11PROXY_TLS_MIN_VERSION=1.3 */
};

/* Fills *cfg from the environment.  On error writes one line to err and
 * returns the CK_RV C_Initialize must return. */
P11G_HIDDEN CK_RV p11g_config_load(struct p11g_config *cfg, char *err, size_t errlen);

/* ---- XDR buffers (xdr.c) ---------------------------------------------- */
struct p11g_enc {
    uint8_t *p;
    size_t len, cap, max;
    int err; /* P11G_E_* once something failed; later writes are ignored */
};
struct p11g_dec {
    const uint8_t *p;
    size_t pos, end;
};

P11G_HIDDEN void p11g_enc_init(struct p11g_enc *e, size_t max);
P11G_HIDDEN void p11g_enc_free(struct p11g_enc *e);
P11G_HIDDEN void p11g_enc_u32(struct p11g_enc *e, uint32_t v);
P11G_HIDDEN void p11g_enc_u64(struct p11g_enc *e, uint64_t v);
/* p == NULL: n zero bytes (used for output buffers: never send caller memory) */
P11G_HIDDEN void p11g_enc_opaque(struct p11g_enc *e, const void *p, size_t n);

P11G_HIDDEN void p11g_dec_init(struct p11g_dec *d, const uint8_t *p, size_t n);
P11G_HIDDEN int p11g_dec_u32(struct p11g_dec *d, uint32_t *v);
P11G_HIDDEN int p11g_dec_u64(struct p11g_dec *d, uint64_t *v);
P11G_HIDDEN int p11g_dec_opaque(struct p11g_dec *d, const uint8_t **p, uint32_t *n, uint32_t max);

/* Internal error codes (never returned to the application as such). */
#define P11G_OK 0
#define P11G_E_NET 1       /* connection broken / closed: connection is now dead */
#define P11G_E_TIMEOUT 2   /* no reply in time: connection is now dead */
#define P11G_E_PROTO 3     /* malformed reply or RPC-level refusal (this call only) */
#define P11G_E_NOMEM 4
#define P11G_E_TOOBIG 5    /* the call does not fit the record limit */
#define P11G_E_PROC 6      /* PROC_UNAVAIL from the server */
#define P11G_E_DEAD 7      /* connection was already dead */

/* ---- connection (transport.c) ----------------------------------------- */
struct p11g_conn;

P11G_HIDDEN int p11g_conn_open(const struct p11g_config *cfg, struct p11g_conn **out,
                               char *err, size_t errlen);
/* One round trip.  msg starts with 4 bytes reserved for the record mark,
 * then the XID word (filled in here).  On P11G_OK *reply (malloc'ed) holds the
 * whole reply record. */
P11G_HIDDEN int p11g_conn_call(struct p11g_conn *c, uint8_t *msg, size_t len, uint8_t **reply,
                               size_t *reply_len);
P11G_HIDDEN int p11g_conn_dead(struct p11g_conn *c);
P11G_HIDDEN void p11g_conn_kill(struct p11g_conn *c);
P11G_HIDDEN void p11g_conn_ref(struct p11g_conn *c);
/* Drops a reference; the last one closes the socket and frees. */
P11G_HIDDEN void p11g_conn_unref(struct p11g_conn *c);
/* p11g_conn_kill, then p11g_conn_unref: done with c (the server's side ends). */
P11G_HIDDEN void p11g_conn_close(struct p11g_conn *c);
/* In a forked child: drop our copy of the socket without touching locks. */
P11G_HIDDEN void p11g_conn_abandon(struct p11g_conn *c);
/* A connection around a channel's descriptor (channels.c), with main's timeout
 * and record limit, speaking `version` from the start. */
P11G_HIDDEN int p11g_conn_adopt(const struct p11g_conn *main, int fd, unsigned version,
                                struct p11g_conn **out);
/* Is a call in flight on c (another thread is using it)? */
P11G_HIDDEN int p11g_conn_busy(struct p11g_conn *c);
/* Could c ask for a channel (a plain socket, not TLS, not a channel itself)? */
P11G_HIDDEN int p11g_conn_may_carry_channel(const struct p11g_conn *c);
/* A channel's fixed protocol version; 0 for a negotiated connection. */
P11G_HIDDEN unsigned p11g_conn_fixed_version(const struct p11g_conn *c);
/* Before c's first call: it speaks `version` without negotiating (a channel). */
P11G_HIDDEN void p11g_conn_fix_version(struct p11g_conn *c, unsigned version);
/* The descriptor the server passed on c (-1: none); the caller owns it. */
P11G_HIDDEN int p11g_conn_take_fd(struct p11g_conn *c);

/* Copies the reason of the last TLS failure on c ("" if none) into buf. */
P11G_HIDDEN void p11g_conn_tls_error(struct p11g_conn *c, char *buf, size_t len);
/* ---- waiting (wait.c; also in the TLS plugin) ---------------------------- */
/* Waits until fd is ready for `events`, the deadline passes (P11G_E_TIMEOUT)
 * or, if slice_ms >= 0, slice_ms milliseconds pass (P11G_OK). */
P11G_HIDDEN int p11g_wait_fd(int fd, short events, const struct timespec *deadline, int slice_ms);
/* Milliseconds until the CLOCK_MONOTONIC deadline (0 once passed). */
P11G_HIDDEN int p11g_ms_left(const struct timespec *deadline);

/* ---- TLS (tls.c, OpenSSL) ---------------------------------------------- */
/* tls.c is built as a plugin, libp11guard-tls.so beside the library, loaded
 * (tlsload.c) by the first p11g_tls_global_init(): only a process that uses
 * TLS loads libssl and libcrypto (~1.5 ms at every start otherwise). */
struct p11g_tls;

/* Once per process, before the first TLS connection: initialise OpenSSL. */
P11G_HIDDEN int p11g_tls_global_init(void);
/* Handshake on the connected non-blocking socket fd, verifying the server's
 * chain against cfg->ca_file and (unless disabled) its name.  On failure
 * writes one line to err and returns P11G_E_*. */
P11G_HIDDEN int p11g_tls_open(const struct p11g_config *cfg, int fd,
                              const struct timespec *deadline, struct p11g_tls **out, char *err,
                              size_t errlen);
/* One SSL_read / SSL_write under the object's lock.  > 0: bytes moved;
 * 0: retry after fd is ready for *events; -1: end of stream or TLS failure
 * (the reason is kept for p11g_tls_error).  A write must be retried with the
 * same arguments. */
P11G_HIDDEN long p11g_tls_recv(struct p11g_tls *t, void *buf, size_t n, short *events);
P11G_HIDDEN long p11g_tls_send(struct p11g_tls *t, const void *buf, size_t n, short *events);
/* Best effort, never blocks: a close_notify alert if the session is healthy. */
P11G_HIDDEN void p11g_tls_close_notify(struct p11g_tls *t);
P11G_HIDDEN void p11g_tls_error(struct p11g_tls *t, char *buf, size_t len);
P11G_HIDDEN void p11g_tls_free(struct p11g_tls *t);

/* What the plugin gives the library: its p11g_tls_* functions. */
struct p11g_tls_ops {
    unsigned version; /* P11G_TLS_OPS_VERSION: the plugin is from the same build */
    int (*global_init)(void);
    int (*open)(const struct p11g_config *cfg, int fd, const struct timespec *deadline,
                struct p11g_tls **out, char *err, size_t errlen);
    long (*recv)(struct p11g_tls *t, void *buf, size_t n, short *events);
    long (*send)(struct p11g_tls *t, const void *buf, size_t n, short *events);
    void (*close_notify)(struct p11g_tls *t);
    void (*error)(struct p11g_tls *t, char *buf, size_t len);
    void (*free)(struct p11g_tls *t);
};
#define P11G_TLS_OPS_VERSION (1000u + (unsigned)sizeof(struct p11g_config))
#define P11G_TLS_PLUGIN "libp11guard-tls.so"
#define P11G_TLS_PLUGIN_SYMBOL "p11g_tls_plugin_ops"

/* ---- table-driven codec (codec.c) ------------------------------------- */
enum { P11G_T_IN = 0, P11G_T_OUT = 1 };

struct p11g_arg {
    uint64_t h;                 /* H */
    const void *ptr;            /* O: NULL with len > 0 sends len zero bytes */
    size_t len;
    const CK_MECHANISM *mech;   /* M */
    const CK_ATTRIBUTE *tmpl;   /* T */
    CK_ULONG count;
    int tmpl_mode;              /* P11G_T_IN or P11G_T_OUT (GetAttributeValue) */
};

struct p11g_field {
    uint64_t h;
    const uint8_t *ptr;
    uint32_t len;
    uint8_t major, minor;
};

struct p11g_res {
    uint64_t h;             /* H */
    const uint8_t *ptr;     /* O: bytes; L: count big-endian hypers; T: count raw entries */
    uint32_t len;           /* O: byte count; L and T: element count */
    struct p11g_field f[P11G_MAX_FIELDS]; /* structs */
};

struct p11g_reply {
    uint8_t *buf;
    size_t len;
    unsigned version; /* the protocol version the call went out with (v4.h) */
};

/* Encodes a call to `proc` from args, runs it on c and decodes the reply into
 * res[] (views into rep->buf; free with p11g_reply_free).  Returns P11G_*. */
P11G_HIDDEN int p11g_rpc(struct p11g_conn *c, unsigned proc, const struct p11g_arg *args,
                         struct p11g_res *res, struct p11g_reply *rep, size_t max_record);
P11G_HIDDEN void p11g_reply_free(struct p11g_reply *rep);
P11G_HIDDEN const char *p11g_proc_name(unsigned proc);
/* Iterates a validated template result. */
P11G_HIDDEN void p11g_tmpl_next(struct p11g_dec *d, uint64_t *type, const uint8_t **p,
                                uint32_t *n, uint64_t *value_len);
P11G_HIDDEN uint64_t p11g_list_get(const uint8_t *p, uint32_t i);

/* ---- module state (module.c) ------------------------------------------ */
/* Takes a reference on the live connection or returns the CK_RV to give. */
P11G_HIDDEN CK_RV p11g_acquire(struct p11g_conn **c, size_t *max_record);

/* ---- channels (channels.c) ---------------------------------------------- */
/* The calling thread's channel (a reference, for one call), opening one when
 * `c` is busy with another thread's call and the server offers channels; NULL:
 * use c. */
P11G_HIDDEN struct p11g_conn *p11g_channel_for_call(struct p11g_conn *c, size_t max_record);
/* After a successful C_Initialize: where channels connect, and whether at all. */
P11G_HIDDEN void p11g_channels_configure(const struct p11g_config *cfg);
/* Closes every channel (C_Finalize, reconnection, unload). */
P11G_HIDDEN void p11g_channels_close_all(void);
P11G_HIDDEN void p11g_channels_atfork_prepare(void);
P11G_HIDDEN void p11g_channels_atfork_parent(void);
P11G_HIDDEN void p11g_channels_atfork_child(void);
P11G_HIDDEN void p11g_channels_unload(void);
P11G_HIDDEN void p11g_release(struct p11g_conn *c);
P11G_HIDDEN unsigned long p11g_generation(void);
/* acquire + rpc + release + error mapping.  On CKR_OK, res[0].h is the
 * module's rv (see p11g_rv). */
P11G_HIDDEN CK_RV p11g_call(unsigned proc, const struct p11g_arg *args, struct p11g_res *res,
                            struct p11g_reply *rep);

/* One call's decoded result and the reply buffer it points into (functions.c). */
struct p11g_result {
    struct p11g_res r[6];
    struct p11g_reply rep;
};
/* Runs proc; on CKR_OK the module's rv is in *mrv and the reply must be freed. */
P11G_HIDDEN CK_RV p11g_run(unsigned proc, const struct p11g_arg *a, struct p11g_result *c,
                           CK_RV *mrv);
/* For procedures whose result is only the rv. */
P11G_HIDDEN CK_RV p11g_simple(unsigned proc, const struct p11g_arg *a);
P11G_HIDDEN CK_RV p11g_rv(uint64_t wire_rv);
P11G_HIDDEN void p11g_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- output cache (cache.c) ------------------------------------------- */
#define P11G_FAM_DIGEST 0x01u
#define P11G_FAM_SIGN 0x02u
#define P11G_FAM_VERIFY 0x04u
#define P11G_FAM_ENCRYPT 0x08u
#define P11G_FAM_DECRYPT 0x10u
#define P11G_FAM_SIGN_RECOVER 0x20u
#define P11G_FAM_VERIFY_RECOVER 0x40u
#define P11G_FAM_OTHER 0x80u

P11G_HIDDEN uint64_t p11g_hash(uint64_t h, const void *p, size_t n);
/* 1 and fills *rv when (session, proc, key) is cached. */
P11G_HIDDEN int p11g_cache_take(CK_SESSION_HANDLE s, unsigned proc, uint64_t key, CK_BYTE_PTR out,
                                CK_ULONG_PTR out_len, CK_RV *rv);
P11G_HIDDEN CK_RV p11g_cache_put(CK_SESSION_HANDLE s, unsigned proc, unsigned families,
                                 uint64_t key, const uint8_t *data, size_t len);
P11G_HIDDEN int p11g_cache_busy(CK_SESSION_HANDLE s, unsigned families);
P11G_HIDDEN void p11g_cache_drop_session(CK_SESSION_HANDLE s);
P11G_HIDDEN void p11g_cache_clear(void);
P11G_HIDDEN void p11g_cache_atfork_prepare(void);
P11G_HIDDEN void p11g_cache_atfork_parent(void);
P11G_HIDDEN void p11g_cache_atfork_child(void);

/* ---- function lists (functions.c) ------------------------------------- */
P11G_HIDDEN extern CK_FUNCTION_LIST p11g_function_list;
P11G_HIDDEN extern CK_FUNCTION_LIST_3_0 p11g_function_list_3_0;

#endif /* P11G_H */
