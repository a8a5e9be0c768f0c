/* tls.c: TLS for the proxy connection, with OpenSSL.  Built as the plugin
 * libp11guard-tls.so (see tlsload.c), which alone links libssl and libcrypto.
 *
 * Unlike Caml Crush's client, the server is authenticated fully by default:
 * its chain must lead to PKCS11PROXY_CA_FILE (and nothing else: the system
 * store is not loaded) and its certificate must name the host we dial, or
 * PKCS11PROXY_TLS_SERVER_NAME (subjectAltName only, no partial wildcards).
 * PKCS11PROXY_TLS_VERIFY_HOSTNAME=0 turns only the name check off.
 * TLS 1.2 is the floor, compression, renegotiation and tickets are off.
 *
 * Threads.  One connection is shared by all threads of the process: a writer
 * (under transport.c's write lock) and one reader at a time.  An SSL object
 * must not be used by two threads at once, so every SSL_* call on it runs
 * under t->lock, and that lock is never held while waiting: the socket is
 * non-blocking, and a call that would block returns, drops the lock and lets
 * the caller poll().  So a reader waiting for a reply never keeps a writer
 * from sending, and a writer blocked on a full socket never keeps the reader
 * from draining replies (which could deadlock against a server doing the same).
 *
 * The socket BIO is ours: OpenSSL's writes with write(2), which raises SIGPIPE
 * in the application when the server goes away; ours uses send(MSG_NOSIGNAL).
 *
 * OpenSSL's error queue is per thread and shared with the application (which
 * may well use OpenSSL itself): it is cleared before and after each call, so
 * neither side sees the other's errors. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "p11g.h"

/* TLS 1.2 suites: forward secret and AEAD only (TLS 1.3 has nothing else). */
#define TLS12_CIPHERS "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

struct p11g_tls {
    pthread_mutex_t lock; /* every SSL_* call on ssl, and the fields below */
    SSL_CTX *ctx;
    SSL *ssl;
    int fd;
    int failed; /* a fatal error or the peer's close: no more SSL calls but SSL_free */
    int closed; /* close_notify sent */
    int sys_errno;
    char err[200];
};

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static BIO_METHOD *g_bio_method;

/* ---- the socket BIO ------------------------------------------------------ */
static int bio_write(BIO *b, const char *buf, int n)
{
    struct p11g_tls *t = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (n <= 0)
        return 0;
    for (;;) {
        ssize_t w = send(t->fd, buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w >= 0)
            return (int)w;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_write(b);
        else
            t->sys_errno = errno;
        return -1;
    }
}

static int bio_read(BIO *b, char *buf, int n)
{
    struct p11g_tls *t = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (n <= 0)
        return 0;
    for (;;) {
        ssize_t r = recv(t->fd, buf, (size_t)n, MSG_DONTWAIT);
        if (r >= 0)
            return (int)r; /* 0: the peer closed the stream */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_read(b);
        else
            t->sys_errno = errno;
        return -1;
    }
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b;
    (void)num;
    (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0; /* send() does not buffer */
}

static int bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static void global_init_once(void)
{
    if (OPENSSL_init_ssl(OPENSSL_INIT_LOAD_SSL_STRINGS | OPENSSL_INIT_LOAD_CRYPTO_STRINGS,
                         NULL) != 1)
        return;
    int index = BIO_get_new_index();
    if (index < 0)
        return;
    BIO_METHOD *m = BIO_meth_new(index | BIO_TYPE_SOURCE_SINK, "p11guard socket");
    if (m == NULL)
        return;
    if (BIO_meth_set_write(m, bio_write) != 1 || BIO_meth_set_read(m, bio_read) != 1 ||
        BIO_meth_set_ctrl(m, bio_ctrl) != 1 || BIO_meth_set_create(m, bio_create) != 1) {
        BIO_meth_free(m);
        return;
    }
    g_bio_method = m;
}

int p11g_tls_global_init(void)
{
    pthread_once(&g_once, global_init_once);
    ERR_clear_error();
    return g_bio_method != NULL ? P11G_OK : P11G_E_NOMEM;
}

/* ---- errors ------------------------------------------------------------- */

/* The newest OpenSSL reason on this thread's queue, or dflt. */
static const char *ssl_reason(const char *dflt)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e != 0 ? ERR_reason_error_string(e) : NULL;
    return r != NULL ? r : dflt;
}

/* The OpenSSL reason, saying so when it is the server's alert (its verdict,
 * typically on our certificate) rather than a local failure. */
static void reason_text(char *out, size_t len)
{
    const char *r = ssl_reason("TLS error");
    if (strstr(r, " alert ") != NULL)
        snprintf(out, len, "the server sent an alert: %s", r);
    else
        snprintf(out, len, "%s", r);
}

/* Why an SSL call failed, in words, from its SSL_get_error code. */
static void describe(struct p11g_tls *t, int code, char *out, size_t len)
{
    if (code == SSL_ERROR_ZERO_RETURN)
        snprintf(out, len, "the server closed the TLS session");
    else if (code != SSL_ERROR_SYSCALL || ERR_peek_last_error() != 0)
        reason_text(out, len);
    else if (t->sys_errno != 0)
        snprintf(out, len, "%s", strerror(t->sys_errno));
    else
        snprintf(out, len, "the server closed the connection");
}

/* ---- context --------------------------------------------------------------- */
static int no_password(char *buf, int size, int rwflag, void *u)
{
    /* An encrypted key file: fail instead of letting OpenSSL prompt on the
     * application's terminal. */
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

static int readable(const char *path, const char *var, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "%s %s: %s", var, path, strerror(errno));
        return -1;
    }
    return S_ISDIR(st.st_mode) ? 1 : 0;
}

static SSL_CTX *make_context(const struct p11g_config *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        snprintf(err, errlen, "TLS: cannot create a context: %s", ssl_reason("out of memory"));
        return NULL;
    }
    if (SSL_CTX_set_min_proto_version(ctx, cfg->tls13_only ? TLS1_3_VERSION : TLS1_2_VERSION) !=
            1 ||
        SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS) != 1) {
        snprintf(err, errlen, "TLS: cannot set the protocol versions: %s", ssl_reason("?"));
        goto fail;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_default_passwd_cb(ctx, no_password);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);

    /* Trust exactly the configured CA (a file, or a hashed directory). */
    int dir = readable(cfg->ca_file, "PKCS11PROXY_CA_FILE", err, errlen);
    if (dir < 0)
        goto fail;
    if (SSL_CTX_load_verify_locations(ctx, dir ? NULL : cfg->ca_file, dir ? cfg->ca_file : NULL) !=
        1) {
        snprintf(err, errlen, "PKCS11PROXY_CA_FILE %s: no usable CA certificate (%s)",
                 cfg->ca_file, ssl_reason("not PEM?"));
        goto fail;
    }

    if (cfg->cert_file[0] != '\0') {
        if (readable(cfg->cert_file, "PKCS11PROXY_CERT_FILE", err, errlen) < 0)
            goto fail;
        if (SSL_CTX_use_certificate_chain_file(ctx, cfg->cert_file) != 1) {
            snprintf(err, errlen, "PKCS11PROXY_CERT_FILE %s: cannot load the certificate (%s)",
                     cfg->cert_file, ssl_reason("not PEM?"));
            goto fail;
        }
        if (readable(cfg->key_file, "PKCS11PROXY_PRIVKEY_FILE", err, errlen) < 0)
            goto fail;
        int loaded = SSL_CTX_use_PrivateKey_file(ctx, cfg->key_file, SSL_FILETYPE_PEM) == 1;
        if (!loaded && ERR_GET_REASON(ERR_peek_last_error()) != X509_R_KEY_VALUES_MISMATCH) {
            snprintf(err, errlen,
                     "PKCS11PROXY_PRIVKEY_FILE %s: cannot load the private key (%s; "
                     "an encrypted key is not supported)",
                     cfg->key_file, ssl_reason("not PEM?"));
            goto fail;
        }
        if (!loaded || SSL_CTX_check_private_key(ctx) != 1) {
            snprintf(err, errlen, "PKCS11PROXY_PRIVKEY_FILE %s does not match the certificate %s",
                     cfg->key_file, cfg->cert_file);
            goto fail;
        }
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

static int is_ip_address(const char *name)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

/* What to check on the server certificate, and the SNI to send. */
static int set_server_name(SSL *ssl, const struct p11g_config *cfg)
{
    const char *name = cfg->server_name;
    int ip = is_ip_address(name);
    if (!ip && name[0] != '\0' && SSL_set_tlsext_host_name(ssl, name) != 1)
        return -1;
    if (!cfg->verify_hostname)
        return 0;
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    /* subjectAltName only (a CN is not a host name), and "*" only as a whole label. */
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NEVER_CHECK_SUBJECT |
                                               X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (ip)
        return X509_VERIFY_PARAM_set1_ip_asc(param, name) == 1 ? 0 : -1;
    return X509_VERIFY_PARAM_set1_host(param, name, 0) == 1 ? 0 : -1;
}

static void handshake_failure(struct p11g_tls *t, const struct p11g_config *cfg, int code,
                              char *err, size_t errlen)
{
    char where[P11G_MAX_ADDR + 24];
    if (cfg->transport == P11G_UNIX)
        snprintf(where, sizeof where, "%s", cfg->host);
    else
        snprintf(where, sizeof where, "%s:%s", cfg->host, cfg->port);
    long vr = SSL_get_verify_result(t->ssl);
    if (vr == X509_V_ERR_HOSTNAME_MISMATCH || vr == X509_V_ERR_IP_ADDRESS_MISMATCH)
        snprintf(err, errlen,
                 "TLS handshake with %s failed: the server certificate is not for '%s' (set "
                 "PKCS11PROXY_TLS_SERVER_NAME to the name it carries, or "
                 "PKCS11PROXY_TLS_VERIFY_HOSTNAME=0 to skip the name check)",
                 where, cfg->server_name);
    else if (vr != X509_V_OK)
        snprintf(err, errlen, "TLS handshake with %s failed: server certificate rejected: %s",
                 where, X509_verify_cert_error_string(vr));
    else {
        char why[160];
        describe(t, code, why, sizeof why);
        /* GnuTLS (Caml Crush) just hangs up on a client certificate it refuses. */
        int hangup = code == SSL_ERROR_SYSCALL && ERR_peek_last_error() == 0 &&
                     (t->sys_errno == 0 || t->sys_errno == ECONNRESET);
        snprintf(err, errlen, "TLS handshake with %s failed: %s%s", where, why,
                 hangup ? " (did it refuse our client certificate, PKCS11PROXY_CERT_FILE? "
                          "is it a TLS listener?)"
                        : "");
    }
}

int p11g_tls_open(const struct p11g_config *cfg, int fd, const struct timespec *deadline,
                  struct p11g_tls **out, char *err, size_t errlen)
{
    *out = NULL;
    if (p11g_tls_global_init() != P11G_OK) {
        snprintf(err, errlen, "TLS: cannot initialise OpenSSL");
        return P11G_E_NOMEM;
    }
    ERR_clear_error();
    struct p11g_tls *t = calloc(1, sizeof *t);
    if (t == NULL) {
        snprintf(err, errlen, "out of memory");
        return P11G_E_NOMEM;
    }
    pthread_mutex_init(&t->lock, NULL);
    t->fd = fd;
    int rc = P11G_E_NET;
    t->ctx = make_context(cfg, err, errlen);
    if (t->ctx == NULL)
        goto fail;
    t->ssl = SSL_new(t->ctx);
    BIO *bio = t->ssl != NULL ? BIO_new(g_bio_method) : NULL;
    if (bio == NULL) {
        snprintf(err, errlen, "TLS: out of memory");
        rc = P11G_E_NOMEM;
        goto fail;
    }
    BIO_set_data(bio, t);
    SSL_set_bio(t->ssl, bio, bio); /* the SSL object owns it now */
    if (set_server_name(t->ssl, cfg) != 0) {
        snprintf(err, errlen, "TLS: bad server name '%s'", cfg->server_name);
        goto fail;
    }

    for (;;) {
        ERR_clear_error();
        int r = SSL_connect(t->ssl);
        if (r == 1)
            break;
        int code = SSL_get_error(t->ssl, r);
        short ev = code == SSL_ERROR_WANT_READ ? POLLIN : code == SSL_ERROR_WANT_WRITE ? POLLOUT : 0;
        if (ev == 0) {
            handshake_failure(t, cfg, code, err, errlen);
            goto fail;
        }
        int w = p11g_wait_fd(fd, ev, deadline, -1);
        if (w != P11G_OK) {
            snprintf(err, errlen, "TLS handshake with %s: %s", cfg->host,
                     w == P11G_E_TIMEOUT ? "no answer in time (is it a TLS listener?)"
                                         : strerror(errno));
            rc = w;
            goto fail;
        }
    }
    /* SSL_VERIFY_PEER already refused a failed chain; this is belt and braces. */
    if (SSL_get_verify_result(t->ssl) != X509_V_OK || SSL_get0_peer_certificate(t->ssl) == NULL) {
        snprintf(err, errlen, "TLS handshake with %s: the server was not authenticated",
                 cfg->host);
        goto fail;
    }
    ERR_clear_error();
    *out = t;
    return P11G_OK;
fail:
    ERR_clear_error();
    t->failed = 1;
    p11g_tls_free(t);
    return rc;
}

/* ---- I/O ------------------------------------------------------------------ */
static long io_result(struct p11g_tls *t, int r, short *events)
{
    if (r > 0)
        return r;
    int code = SSL_get_error(t->ssl, r);
    if (code == SSL_ERROR_WANT_READ) {
        *events = POLLIN;
        return 0;
    }
    if (code == SSL_ERROR_WANT_WRITE) {
        *events = POLLOUT;
        return 0;
    }
    t->failed = 1;
    describe(t, code, t->err, sizeof t->err);
    return -1;
}

long p11g_tls_recv(struct p11g_tls *t, void *buf, size_t n, short *events)
{
    int len = n > INT_MAX ? INT_MAX : (int)n;
    long out = -1;
    pthread_mutex_lock(&t->lock);
    if (!t->failed) {
        ERR_clear_error();
        out = io_result(t, SSL_read(t->ssl, buf, len), events);
        ERR_clear_error();
    }
    pthread_mutex_unlock(&t->lock);
    return out;
}

long p11g_tls_send(struct p11g_tls *t, const void *buf, size_t n, short *events)
{
    int len = n > INT_MAX ? INT_MAX : (int)n;
    long out = -1;
    pthread_mutex_lock(&t->lock);
    if (!t->failed) {
        ERR_clear_error();
        out = io_result(t, SSL_write(t->ssl, buf, len), events);
        ERR_clear_error();
    }
    pthread_mutex_unlock(&t->lock);
    return out;
}

void p11g_tls_close_notify(struct p11g_tls *t)
{
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->lock);
    if (!t->failed && !t->closed) {
        t->closed = 1;
        ERR_clear_error();
        (void)SSL_shutdown(t->ssl); /* non-blocking: sent now or never */
        ERR_clear_error();
    }
    pthread_mutex_unlock(&t->lock);
}

void p11g_tls_error(struct p11g_tls *t, char *buf, size_t len)
{
    if (len == 0)
        return;
    buf[0] = '\0';
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->lock);
    snprintf(buf, len, "%s", t->err);
    pthread_mutex_unlock(&t->lock);
}

void p11g_tls_free(struct p11g_tls *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl); /* and its BIO; never sends anything */
    SSL_CTX_free(t->ctx);
    ERR_clear_error();
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* ---- the plugin's one export (tlsload.c finds it with dlsym) ---------------- */
__attribute__((visibility("default"))) const struct p11g_tls_ops p11g_tls_plugin_ops = {
    .version = P11G_TLS_OPS_VERSION,
    .global_init = p11g_tls_global_init,
    .open = p11g_tls_open,
    .recv = p11g_tls_recv,
    .send = p11g_tls_send,
    .close_notify = p11g_tls_close_notify,
    .error = p11g_tls_error,
    .free = p11g_tls_free,
};
