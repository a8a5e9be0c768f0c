/* channels.c: a connection of its own for each application thread that
 * overlaps calls with another thread.
 *
 * Threads sharing one connection are pipelined (transport.c), but each reply
 * then wakes a reading thread on both sides before it reaches its caller; with
 * every CPU busy in the module, those wake-ups wait.  So when a thread starts a
 * call while another call is in flight on the connection, it asks the worker
 * for a channel (protocol version 4, OpenChannel): the worker answers with one
 * end of a socket pair passed along with the reply (SCM_RIGHTS), served by a
 * thread of its own in the same worker, with the same module, sessions and
 * login.  From then on that thread's calls go over its channel, one at a time,
 * with nobody else's replies in the way.
 *
 * Over TCP the reply is a ticket instead: the thread connects to the proxy
 * again and presents it in JoinChannel, the new connection's first call; the
 * listener routes that connection to our worker.  TLS has no channels (a TLS
 * session cannot move between processes), and a server that offers none
 * (Caml Crush, a limit reached) answers otherwise: the thread then shares the
 * connection for the rest of this initialisation.  PKCS11PROXY_CHANNELS=0
 * turns channels off.
 *
 * Ownership: the registry below holds each channel; a thread finds its own
 * through a pthread key (whose destructor closes it when the thread ends).
 * C_Finalize, a reconnecting C_Initialize and unloading close them all by
 * bumping the registry's generation; a thread holding a channel of an older
 * generation just forgets it.  In a forked child every channel is the parent's:
 * dropped without a word on it (p11g_conn_abandon). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "p11g.h"
#include "p11g_procs.h"
#include "v4.h"

struct chan {
    struct p11g_conn *conn;
    struct chan *next; /* registry */
};

/* Per thread (the pthread key's value). */
struct slot {
    struct chan *chan;        /* valid (in the registry) only while chan_gen is current */
    unsigned long chan_gen;   /* the generation chan was opened in */
    unsigned long refused_in; /* generation + 1 in which no channel is to be had */
};

static pthread_mutex_t g_chan_lock = PTHREAD_MUTEX_INITIALIZER; /* everything below */
static struct chan *g_chans;
static unsigned long g_chan_generation;
static int g_chan_enabled;
static struct p11g_config g_chan_cfg; /* where a TCP channel connects (the proxy) */
static pthread_mutex_t g_open_lock = PTHREAD_MUTEX_INITIALIZER; /* one OpenChannel at a time */
static pthread_once_t g_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t g_key;
static int g_key_ok;

static void unlink_locked(struct chan *ch)
{
    for (struct chan **pp = &g_chans; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == ch) {
            *pp = ch->next;
            return;
        }
    }
}

static void close_chan(struct chan *ch)
{
    p11g_conn_close(ch->conn); /* the worker's thread for it sees EOF */
    free(ch);
}

/* A thread ends: its channel (if still current) goes with it. */
static void thread_ends(void *value)
{
    struct slot *s = value;
    struct chan *ch = NULL;
    pthread_mutex_lock(&g_chan_lock);
    if (s->chan != NULL && s->chan_gen == g_chan_generation) {
        ch = s->chan;
        unlink_locked(ch);
    }
    pthread_mutex_unlock(&g_chan_lock);
    if (ch != NULL)
        close_chan(ch);
    free(s);
}

static void make_key(void) { g_key_ok = pthread_key_create(&g_key, thread_ends) == 0; }

void p11g_channels_configure(const struct p11g_config *cfg)
{
    pthread_mutex_lock(&g_chan_lock);
    g_chan_enabled = cfg->channels && !cfg->serial && !cfg->tls;
    g_chan_cfg = *cfg;
    pthread_mutex_unlock(&g_chan_lock);
}

void p11g_channels_close_all(void)
{
    pthread_mutex_lock(&g_chan_lock);
    struct chan *all = g_chans;
    g_chans = NULL;
    g_chan_generation++;
    pthread_mutex_unlock(&g_chan_lock);
    while (all != NULL) {
        struct chan *next = all->next;
        close_chan(all); /* a slot still pointing here is stale: it never looks */
        all = next;
    }
}

void p11g_channels_atfork_prepare(void) { pthread_mutex_lock(&g_chan_lock); }

void p11g_channels_atfork_parent(void) { pthread_mutex_unlock(&g_chan_lock); }

/* A forked child's copies of the parent's channels: kept reachable (never used
 * again) so that leak checkers do not report them. */
static struct chan *g_abandoned;

void p11g_channels_atfork_child(void)
{
    while (g_chans != NULL) {
        struct chan *ch = g_chans;
        g_chans = ch->next;
        p11g_conn_abandon(ch->conn); /* the parent's: close our descriptor only */
        ch->next = g_abandoned;
        g_abandoned = ch;
    }
    g_chan_generation++;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_open_lock, &fresh, sizeof fresh); /* may have been held by a parent thread */
    pthread_mutex_unlock(&g_chan_lock);
}

void p11g_channels_unload(void)
{
    /* The channels went with p11g_unload (close_all).  No destructor may run into
     * this library once it is unmapped. */
    if (g_key_ok) {
        pthread_key_delete(g_key);
        g_key_ok = 0;
    }
}

#define TICKET_SIZE 32 /* server/channels.py */

/* TCP: a new connection to the proxy whose first call, JoinChannel(ticket), makes
 * it a channel of our worker.  NULL if anything fails. */
static struct p11g_conn *join_channel(const uint8_t *ticket, size_t max_record)
{
    pthread_mutex_lock(&g_chan_lock);
    struct p11g_config cfg = g_chan_cfg;
    pthread_mutex_unlock(&g_chan_lock);
    struct p11g_conn *ch = NULL;
    char err[256];
    if (p11g_conn_open(&cfg, &ch, err, sizeof err) != P11G_OK)
        return NULL; /* the main connection still works: no need to say more */
    p11g_conn_fix_version(ch, P11G_RPC_VERSION4);
    struct p11g_arg a[1];
    struct p11g_res r[1];
    struct p11g_reply rep;
    memset(a, 0, sizeof a);
    a[0].ptr = ticket;
    a[0].len = TICKET_SIZE;
    int e = p11g_rpc(ch, P11G_PROC_JoinChannel, a, r, &rep, max_record);
    if (e == P11G_OK) {
        uint64_t rv = r[0].h;
        p11g_reply_free(&rep);
        if (rv == CKR_OK)
            return ch;
    }
    p11g_conn_close(ch);
    return NULL;
}

/* Ask the worker for a channel over `c`; NULL when there is none to be had. */
static struct p11g_conn *open_channel(struct p11g_conn *c, size_t max_record)
{
    struct p11g_arg a[1];
    struct p11g_res r[2];
    struct p11g_reply rep;
    memset(a, 0, sizeof a);
    pthread_mutex_lock(&g_open_lock);
    int err = p11g_rpc(c, P11G_PROC_OpenChannel, a, r, &rep, max_record);
    int fd = p11g_conn_take_fd(c);
    pthread_mutex_unlock(&g_open_lock);
    if (err != P11G_OK) { /* the connection's own failure shows on the next call */
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    uint64_t rv = r[0].h;
    uint8_t ticket[TICKET_SIZE];
    int has_ticket = r[1].len == TICKET_SIZE;
    if (has_ticket)
        memcpy(ticket, r[1].ptr, TICKET_SIZE);
    p11g_reply_free(&rep);
    struct p11g_conn *ch = NULL;
    if (rv == CKR_OK && fd >= 0 && p11g_conn_adopt(c, fd, P11G_RPC_VERSION4, &ch) == P11G_OK)
        return ch; /* Unix: the channel came with the reply */
    if (fd >= 0)
        close(fd);
    if (rv == CKR_OK && has_ticket && fd < 0)
        return join_channel(ticket, max_record); /* TCP */
    return NULL;
}

struct p11g_conn *p11g_channel_for_call(struct p11g_conn *c, size_t max_record)
{
    pthread_once(&g_key_once, make_key);
    if (!g_key_ok)
        return NULL;
    struct slot *s = pthread_getspecific(g_key);
    pthread_mutex_lock(&g_chan_lock);
    unsigned long gen = g_chan_generation;
    int enabled = g_chan_enabled;
    struct chan *dead = NULL;
    if (s != NULL && s->chan != NULL) {
        if (s->chan_gen == gen && !p11g_conn_dead(s->chan->conn)) {
            struct p11g_conn *conn = s->chan->conn;
            p11g_conn_ref(conn);
            pthread_mutex_unlock(&g_chan_lock);
            return conn;
        }
        if (s->chan_gen == gen) {
            /* It broke (the call that saw it failed): this thread shares the
             * connection from now on, which fails too if the proxy is gone. */
            dead = s->chan;
            unlink_locked(dead);
            s->refused_in = gen + 1;
        }
        s->chan = NULL; /* else closed (and freed) with its generation: never looked at */
    }
    pthread_mutex_unlock(&g_chan_lock);
    if (dead != NULL) {
        close_chan(dead);
        return NULL;
    }
    if (!enabled || (s != NULL && s->refused_in == gen + 1) ||
        !p11g_conn_may_carry_channel(c) || p11g_conn_version(c) != P11G_RPC_VERSION4 ||
        !p11g_conn_busy(c))
        return NULL; /* the shared connection: nothing else runs, or no channel here */

    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL)
            return NULL;
        if (pthread_setspecific(g_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    struct p11g_conn *conn = open_channel(c, max_record);
    struct chan *ch = conn != NULL ? calloc(1, sizeof *ch) : NULL;
    pthread_mutex_lock(&g_chan_lock);
    if (ch == NULL || g_chan_generation != gen) {
        /* Refused, or C_Finalize / a fork came in between: shared from now on. */
        s->refused_in = gen + 1;
        pthread_mutex_unlock(&g_chan_lock);
        free(ch);
        if (conn != NULL)
            p11g_conn_close(conn);
        return NULL;
    }
    ch->conn = conn;
    ch->next = g_chans;
    g_chans = ch;
    s->chan = ch;
    s->chan_gen = gen;
    p11g_conn_ref(conn);
    pthread_mutex_unlock(&g_chan_lock);
    return conn;
}
