/* transport.c: one stream connection to the proxy, shared by all threads.
 *
 * Calls are pipelined: a thread registers its XID, sends its whole record under
 * the write lock, then waits.  Whichever waiting thread finds no reader active
 * becomes the reader (leader/follower): it reads one complete record, hands it
 * to the thread whose XID it carries and wakes that thread alone (each caller
 * waits on its own condition); when its own reply comes, it wakes one caller
 * still waiting to read in its place.  So no lock is held for a whole round
 * trip, and replies may arrive in any order.  A server that
 * answers one call at a time (Caml Crush) simply queues the records.
 *
 * Any I/O error, timeout or record that breaks the stream marks the connection
 * dead: the socket is shut down (which wakes a blocked reader), every waiting
 * call fails, and the module reports CKR_DEVICE_ERROR until C_Initialize
 * reconnects.
 *
 * TLS (tls.c) replaces send()/recv() by SSL_write()/SSL_read() on the same
 * non-blocking socket; the locking above is unchanged, tls.c serialises the
 * SSL calls themselves and never holds its lock while waiting. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "p11g.h"

#define RBUF_SIZE 65536

struct pending {
    uint32_t xid;
    int done;
    uint8_t *reply;
    size_t len;
    pthread_cond_t cond; /* this caller's: its reply came, or it may read now */
    struct pending *next;
};

struct p11g_conn {
    atomic_uint refs;
    int fd;
    struct p11g_tls *tls; /* NULL: plain stream */
    int is_unix;          /* a plain Unix socket: it may carry a channel (recvmsg) */
    unsigned fixed_version; /* a channel's protocol version (0: negotiated, v4.c) */
    atomic_int passed_fd; /* a descriptor the server passed (OpenChannel), or -1 */
    struct p11g_conn *next_abandoned;
    int timeout_s;
    size_t max_record;
    int serial;
    pthread_mutex_t serial_lock; /* held for a whole call in serial mode only */
    pthread_mutex_t wlock;       /* one record written at a time */
    pthread_mutex_t lock;        /* everything below */
    pthread_condattr_t cond_attr; /* CLOCK_MONOTONIC, for the callers' conditions */
    int dead;
    int reader_active;
    struct pending *pending;
    uint32_t next_xid;
    /* Read buffer, used only by the current reader. */
    size_t rpos, rlen;
    uint8_t rbuf[RBUF_SIZE];
};

static void deadline_after(struct timespec *ts, int seconds)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += seconds;
}

static int wait_fd(int fd, short events, const struct timespec *deadline)
{
    return p11g_wait_fd(fd, events, deadline, -1);
}

/* A TLS wait is cut into slices: the SSL object is shared, and although the
 * other thread's SSL call should never pull our bytes off the socket into
 * its buffers (then poll() would not see them), a retry now and then makes
 * that harmless rather than a timeout. */
#define TLS_WAIT_SLICE_MS 250

static int tls_send_all(struct p11g_conn *c, const uint8_t *p, size_t n,
                        const struct timespec *deadline)
{
    while (n > 0) {
        short ev = 0;
        long w = p11g_tls_send(c->tls, p, n, &ev);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0)
            return P11G_E_NET;
        int r = p11g_wait_fd(c->fd, ev, deadline, TLS_WAIT_SLICE_MS);
        if (r != P11G_OK)
            return r;
    }
    return P11G_OK;
}

static int send_all(struct p11g_conn *c, const uint8_t *p, size_t n, int more,
                    const struct timespec *deadline)
{
    if (c->tls != NULL)
        return tls_send_all(c, p, n, deadline);
    while (n > 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT | (more ? MSG_MORE : 0));
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int r = wait_fd(c->fd, POLLOUT, deadline);
            if (r != P11G_OK)
                return r;
            continue;
        }
        return P11G_E_NET;
    }
    return P11G_OK;
}

/* msg[0..4) is reserved for the record mark of a single-fragment record. */
static int send_record(struct p11g_conn *c, uint8_t *msg, size_t len,
                       const struct timespec *deadline)
{
    size_t body = len - 4;
    if (body <= P11G_FRAGMENT_MAX) {
        uint32_t mark = 0x80000000u | (uint32_t)body;
        msg[0] = (uint8_t)(mark >> 24);
        msg[1] = (uint8_t)(mark >> 16);
        msg[2] = (uint8_t)(mark >> 8);
        msg[3] = (uint8_t)mark;
        return send_all(c, msg, len, 0, deadline);
    }
    const uint8_t *p = msg + 4;
    if (c->tls != NULL) {
        /* Every fragment with its mark in one buffer and one SSL_write: sent
         * piecewise, each 4-byte mark would cost a TLS record of its own. */
        size_t nfrag = (body + P11G_FRAGMENT_MAX - 1) / P11G_FRAGMENT_MAX;
        uint8_t *all = malloc(body + 4 * nfrag);
        if (all == NULL)
            return P11G_E_NOMEM;
        size_t at = 0;
        while (body > 0) {
            size_t n = body > P11G_FRAGMENT_MAX ? P11G_FRAGMENT_MAX : body;
            uint32_t mark = (uint32_t)n | (n == body ? 0x80000000u : 0);
            all[at] = (uint8_t)(mark >> 24);
            all[at + 1] = (uint8_t)(mark >> 16);
            all[at + 2] = (uint8_t)(mark >> 8);
            all[at + 3] = (uint8_t)mark;
            memcpy(all + at + 4, p, n);
            at += 4 + n;
            p += n;
            body -= n;
        }
        int r = send_all(c, all, at, 0, deadline);
        free(all);
        return r;
    }
    while (body > 0) {
        size_t n = body > P11G_FRAGMENT_MAX ? P11G_FRAGMENT_MAX : body;
        uint32_t mark = (uint32_t)n | (n == body ? 0x80000000u : 0);
        uint8_t hdr[4] = {(uint8_t)(mark >> 24), (uint8_t)(mark >> 16), (uint8_t)(mark >> 8),
                          (uint8_t)mark};
        int r = send_all(c, hdr, 4, 1, deadline);
        if (r == P11G_OK)
            r = send_all(c, p, n, n != body, deadline);
        if (r != P11G_OK)
            return r;
        p += n;
        body -= n;
    }
    return P11G_OK;
}

/* Is fd a connected Unix stream socket (what a channel is)?  The server picks
 * the descriptor; anything else is closed unused. */
static int is_unix_stream(int fd)
{
    int domain = 0, type = 0;
    socklen_t l1 = sizeof domain, l2 = sizeof type;
    return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l1) == 0 && domain == AF_UNIX &&
           getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l2) == 0 && type == SOCK_STREAM;
}

/* recv() on a Unix socket, keeping a descriptor the server passes along with
 * the reply to OpenChannel (channels.c takes it from passed_fd). */
static long recv_unix(struct p11g_conn *c, uint8_t *into, size_t cap)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * 4)];
    } control;
    struct iovec iov = {.iov_base = into, .iov_len = cap};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                         .msg_controllen = sizeof control.bytes};
    long r = (long)recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0 || msg.msg_controllen == 0)
        return r;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS ||
            cm->cmsg_len < CMSG_LEN(0))
            continue;
        size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            if (fd < 0)
                continue;
            /* One channel at a time is asked for: keep the newest, close the rest. */
            int old = is_unix_stream(fd) ? atomic_exchange(&c->passed_fd, fd) : fd;
            if (old >= 0)
                close(old);
        }
    }
    return r;
}

static int read_exact(struct p11g_conn *c, uint8_t *dst, size_t n, const struct timespec *deadline)
{
    while (n > 0) {
        if (c->rpos < c->rlen) {
            size_t k = c->rlen - c->rpos;
            if (k > n)
                k = n;
            memcpy(dst, c->rbuf + c->rpos, k);
            c->rpos += k;
            dst += k;
            n -= k;
            continue;
        }
        /* Large reads go straight to the destination; small ones are buffered
         * so that a record mark and a short reply cost one system call. */
        uint8_t *into = n >= RBUF_SIZE ? dst : c->rbuf;
        size_t cap = n >= RBUF_SIZE ? n : RBUF_SIZE;
        long r;
        if (c->tls != NULL) {
            short ev = 0;
            r = p11g_tls_recv(c->tls, into, cap, &ev);
            if (r < 0)
                return P11G_E_NET; /* TLS failure or end of stream: the reason is kept */
            if (r == 0) {
                int w = p11g_wait_fd(c->fd, ev, deadline, TLS_WAIT_SLICE_MS);
                if (w != P11G_OK)
                    return w;
                continue;
            }
        } else {
            /* A plain socket is blocking with SO_RCVTIMEO (see p11g_conn_open):
             * one recv() per reply instead of recv() + poll() + recv(). */
            r = c->is_unix ? recv_unix(c, into, cap) : (long)recv(c->fd, into, cap, 0);
            if (r == 0)
                return P11G_E_NET; /* peer closed */
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                    return P11G_E_NET;
                /* SO_RCVTIMEO expired (or a spurious wake-up): the deadline decides. */
                if (p11g_ms_left(deadline) == 0)
                    return P11G_E_TIMEOUT;
                continue;
            }
        }
        if (into == dst) {
            dst += r;
            n -= (size_t)r;
        } else {
            c->rpos = 0;
            c->rlen = (size_t)r;
        }
    }
    return P11G_OK;
}

/* Reads one complete record (all fragments), at most c->max_record bytes. */
static int read_record(struct p11g_conn *c, const struct timespec *deadline, uint8_t **out,
                       size_t *out_len)
{
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        uint8_t hdr[4];
        int r = read_exact(c, hdr, 4, deadline);
        if (r != P11G_OK) {
            free(buf);
            return r;
        }
        uint32_t mark = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) |
                        ((uint32_t)hdr[2] << 8) | hdr[3];
        size_t flen = mark & 0x7fffffffu;
        if (flen > c->max_record || len > c->max_record - flen) {
            free(buf);
            return P11G_E_PROTO;
        }
        if (len + flen > cap) {
            size_t ncap = cap ? cap : 256;
            while (ncap < len + flen)
                ncap = ncap > c->max_record / 2 ? c->max_record : ncap * 2;
            uint8_t *nb = realloc(buf, ncap);
            if (nb == NULL) {
                free(buf);
                return P11G_E_NOMEM;
            }
            buf = nb;
            cap = ncap;
        }
        r = read_exact(c, buf + len, flen, deadline);
        if (r != P11G_OK) {
            free(buf);
            return r;
        }
        len += flen;
        if (mark & 0x80000000u)
            break;
    }
    *out = buf;
    *out_len = len;
    return P11G_OK;
}

static void kill_locked(struct p11g_conn *c)
{
    if (!c->dead) {
        c->dead = 1;
        /* Wakes a reader blocked in poll(); the fd itself stays open until
         * the last reference is dropped, so it cannot be reused under us. */
        shutdown(c->fd, SHUT_RDWR);
    }
    for (struct pending *q = c->pending; q != NULL; q = q->next)
        pthread_cond_signal(&q->cond);
}

/* The reader leaves: wake one caller still waiting, to read in its place. */
static void pass_reading_on(struct p11g_conn *c)
{
    for (struct pending *q = c->pending; q != NULL; q = q->next) {
        if (!q->done) {
            pthread_cond_signal(&q->cond);
            return;
        }
    }
}

int p11g_conn_call(struct p11g_conn *c, uint8_t *msg, size_t len, uint8_t **reply,
                   size_t *reply_len)
{
    struct pending me = {0};
    struct timespec deadline;
    int err = P11G_OK;

    if (len < 8)
        return P11G_E_PROTO;
    deadline_after(&deadline, c->timeout_s);
    if (c->serial)
        pthread_mutex_lock(&c->serial_lock);

    pthread_mutex_lock(&c->lock);
    if (c->dead) {
        pthread_mutex_unlock(&c->lock);
        if (c->serial)
            pthread_mutex_unlock(&c->serial_lock);
        return P11G_E_DEAD;
    }
    pthread_cond_init(&me.cond, &c->cond_attr);
    me.xid = c->next_xid++;
    me.next = c->pending;
    c->pending = &me; /* registered before sending: the reply may come at once */
    pthread_mutex_unlock(&c->lock);

    msg[4] = (uint8_t)(me.xid >> 24);
    msg[5] = (uint8_t)(me.xid >> 16);
    msg[6] = (uint8_t)(me.xid >> 8);
    msg[7] = (uint8_t)me.xid;
    pthread_mutex_lock(&c->wlock);
    int w = send_record(c, msg, len, &deadline);
    pthread_mutex_unlock(&c->wlock);

    pthread_mutex_lock(&c->lock);
    if (w != P11G_OK) {
        err = w;
        kill_locked(c);
    }
    while (!me.done && !c->dead) {
        if (!c->reader_active) {
            c->reader_active = 1;
            pthread_mutex_unlock(&c->lock);
            uint8_t *buf = NULL;
            size_t blen = 0;
            int r = read_record(c, &deadline, &buf, &blen);
            pthread_mutex_lock(&c->lock);
            c->reader_active = 0;
            if (r == P11G_OK && blen < 4)
                r = P11G_E_PROTO;
            if (r != P11G_OK) {
                free(buf);
                err = r;
                kill_locked(c);
                break;
            }
            uint32_t xid = ((uint32_t)buf[0] << 24) | ((uint32_t)buf[1] << 16) |
                           ((uint32_t)buf[2] << 8) | buf[3];
            struct pending *q = c->pending;
            while (q != NULL && (q->xid != xid || q->done))
                q = q->next;
            if (q == NULL) { /* nobody asked for it: the peer is confused */
                free(buf);
                err = P11G_E_PROTO;
                kill_locked(c);
                break;
            }
            q->reply = buf;
            q->len = blen;
            q->done = 1;
            if (q != &me)
                pthread_cond_signal(&q->cond);
            else
                pass_reading_on(c);
        } else {
            int rc = pthread_cond_timedwait(&me.cond, &c->lock, &deadline);
            if (rc == ETIMEDOUT && !me.done) {
                err = P11G_E_TIMEOUT;
                kill_locked(c);
                break;
            }
        }
    }
    /* unlink */
    for (struct pending **pp = &c->pending; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == &me) {
            *pp = me.next;
            break;
        }
    }
    pthread_mutex_unlock(&c->lock);
    pthread_cond_destroy(&me.cond);
    if (c->serial)
        pthread_mutex_unlock(&c->serial_lock);

    if (me.done) {
        *reply = me.reply;
        *reply_len = me.len;
        return P11G_OK;
    }
    free(me.reply);
    return err != P11G_OK ? err : P11G_E_NET;
}

int p11g_conn_dead(struct p11g_conn *c)
{
    pthread_mutex_lock(&c->lock);
    int d = c->dead;
    pthread_mutex_unlock(&c->lock);
    return d;
}

void p11g_conn_kill(struct p11g_conn *c)
{
    pthread_mutex_lock(&c->lock);
    /* A deliberate close (C_Finalize, unload) of a healthy TLS session says
     * so with close_notify; a broken one is just cut. */
    if (!c->dead && c->tls != NULL)
        p11g_tls_close_notify(c->tls);
    kill_locked(c);
    pthread_mutex_unlock(&c->lock);
}

void p11g_conn_close(struct p11g_conn *c)
{
    p11g_conn_kill(c);
    p11g_conn_unref(c);
}

void p11g_conn_tls_error(struct p11g_conn *c, char *buf, size_t len)
{
    p11g_tls_error(c != NULL ? c->tls : NULL, buf, len);
}

void p11g_conn_ref(struct p11g_conn *c) { atomic_fetch_add(&c->refs, 1); }

int p11g_conn_busy(struct p11g_conn *c)
{
    pthread_mutex_lock(&c->lock);
    int busy = c->pending != NULL;
    pthread_mutex_unlock(&c->lock);
    return busy;
}

int p11g_conn_may_carry_channel(const struct p11g_conn *c)
{
    return c->tls == NULL && c->fixed_version == 0;
}

unsigned p11g_conn_fixed_version(const struct p11g_conn *c) { return c->fixed_version; }

void p11g_conn_fix_version(struct p11g_conn *c, unsigned version) { c->fixed_version = version; }

int p11g_conn_take_fd(struct p11g_conn *c) { return atomic_exchange(&c->passed_fd, -1); }

/* A descriptor the server passed and nobody took. */
static void close_passed_fd(struct p11g_conn *c)
{
    int passed = p11g_conn_take_fd(c);
    if (passed >= 0)
        close(passed);
}

void p11g_conn_unref(struct p11g_conn *c)
{
    if (c == NULL || atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    p11g_tls_free(c->tls);
    if (c->fd >= 0)
        close(c->fd);
    close_passed_fd(c);
    pthread_mutex_destroy(&c->serial_lock);
    pthread_mutex_destroy(&c->wlock);
    pthread_mutex_destroy(&c->lock);
    pthread_condattr_destroy(&c->cond_attr);
    free(c);
}

/* Connections dropped in forked children: kept reachable (they are never
 * used again) so that leak checkers do not report them. */
static struct p11g_conn *g_abandoned;

void p11g_conn_abandon(struct p11g_conn *c)
{
    /* Forked child: the parent keeps using this connection.  Close only our
     * descriptor (no shutdown(), which would cut the parent's stream too) and
     * leak the struct, whose locks may be held by threads that do not exist here.
     * A TLS session is dropped the same way, without SSL_shutdown(): a
     * close_notify from here would end the parent's session (and the SSL
     * object may be in the middle of a call of a parent thread). */
    if (c == NULL)
        return;
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    close_passed_fd(c);
    c->next_abandoned = g_abandoned;
    g_abandoned = c;
}

static int connect_wait(int fd, const struct sockaddr *sa, socklen_t salen,
                        const struct timespec *deadline)
{
    if (connect(fd, sa, salen) == 0)
        return 0;
    if (errno != EINPROGRESS && errno != EAGAIN && errno != EINTR)
        return errno;
    if (wait_fd(fd, POLLOUT, deadline) != P11G_OK)
        return ETIMEDOUT;
    int soerr = 0;
    socklen_t l = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &l) != 0)
        return errno;
    return soerr;
}

static int open_socket(const struct p11g_config *cfg, const struct timespec *deadline, char *err,
                       size_t errlen)
{
    if (cfg->transport == P11G_UNIX) {
        struct sockaddr_un sun;
        memset(&sun, 0, sizeof sun);
        sun.sun_family = AF_UNIX;
        size_t n = strlen(cfg->host);
        if (n >= sizeof sun.sun_path) {
            snprintf(err, errlen, "Unix socket path too long");
            return -1;
        }
        memcpy(sun.sun_path, cfg->host, n);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            snprintf(err, errlen, "socket: %s", strerror(errno));
            return -1;
        }
        int e = connect_wait(fd, (struct sockaddr *)&sun, sizeof sun, deadline);
        if (e != 0) {
            snprintf(err, errlen, "cannot connect to %s: %s", cfg->host, strerror(e));
            close(fd);
            return -1;
        }
        return fd;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(cfg->host, cfg->port, &hints, &res);
    if (g != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", cfg->host, gai_strerror(g));
        return -1;
    }
    int fd = -1, e = 0;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                    ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        e = connect_wait(fd, ai->ai_addr, ai->ai_addrlen, deadline);
        if (e == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(err, errlen, "cannot connect to %s:%s: %s", cfg->host, cfg->port,
                 strerror(e ? e : ECONNREFUSED));
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Replies are read with a blocking recv() bounded by SO_RCVTIMEO (the RPC
 * timeout); sends stay non-blocking per call (MSG_DONTWAIT) and poll only when
 * the socket buffer is full.  TLS keeps the non-blocking socket: OpenSSL's
 * reads and writes are driven by poll(). */
static int make_blocking(int fd, int timeout_s)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
        return -1;
    struct timeval tv = {.tv_sec = timeout_s, .tv_usec = 0};
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

static struct p11g_conn *new_conn(int fd, int timeout_s, size_t max_record)
{
    struct p11g_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    atomic_init(&c->refs, 1);
    atomic_init(&c->passed_fd, -1);
    c->fd = fd;
    c->timeout_s = timeout_s;
    c->max_record = max_record;
    pthread_mutex_init(&c->serial_lock, NULL);
    pthread_mutex_init(&c->wlock, NULL);
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_init(&c->cond_attr);
    pthread_condattr_setclock(&c->cond_attr, CLOCK_MONOTONIC);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    c->next_xid = (uint32_t)now.tv_nsec ^ ((uint32_t)getpid() << 16) ^ (uint32_t)now.tv_sec;
    return c;
}

int p11g_conn_open(const struct p11g_config *cfg, struct p11g_conn **out, char *err,
                   size_t errlen)
{
    struct timespec deadline;
    *out = NULL;
    deadline_after(&deadline, cfg->timeout_s);
    int fd = open_socket(cfg, &deadline, err, errlen);
    if (fd < 0)
        return P11G_E_NET;
    struct p11g_tls *tls = NULL;
    if (cfg->tls) {
        int r = p11g_tls_open(cfg, fd, &deadline, &tls, err, errlen);
        if (r != P11G_OK) {
            close(fd);
            return r;
        }
    } else if (make_blocking(fd, cfg->timeout_s) != 0) {
        snprintf(err, errlen, "socket options: %s", strerror(errno));
        close(fd);
        return P11G_E_NET;
    }
    struct p11g_conn *c = new_conn(fd, cfg->timeout_s, cfg->max_record);
    if (c == NULL) {
        p11g_tls_free(tls);
        close(fd);
        snprintf(err, errlen, "out of memory");
        return P11G_E_NOMEM;
    }
    c->tls = tls;
    c->is_unix = cfg->transport == P11G_UNIX && tls == NULL;
    c->serial = cfg->serial;
    *out = c;
    return P11G_OK;
}

int p11g_conn_adopt(const struct p11g_conn *main, int fd, unsigned version,
                    struct p11g_conn **out)
{
    *out = NULL;
    if (make_blocking(fd, main->timeout_s) != 0)
        return P11G_E_NET;
    struct p11g_conn *c = new_conn(fd, main->timeout_s, main->max_record);
    if (c == NULL)
        return P11G_E_NOMEM;
    c->fixed_version = version;
    *out = c;
    return P11G_OK;
}
