/* tlsload.c: the library's side of TLS.  tls.c (OpenSSL) is a plugin,
 * libp11guard-tls.so in the same directory as this library, loaded by the first
 * p11g_tls_global_init(), that is by a C_Initialize configured for TLS.  A
 * process that does not use TLS never loads libssl and libcrypto, whose
 * loading and relocation took ~1.5 ms of every short-lived tool's start.
 *
 * The plugin is never unloaded (RTLD_NODELETE): OpenSSL registers exit
 * handlers, and a TLS connection may outlive any C_Finalize ordering. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "p11g.h"

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static const struct p11g_tls_ops *g_ops;

static void load_plugin(void)
{
    Dl_info self;
    char path[PATH_MAX];
    if (dladdr((void *)&load_plugin, &self) == 0 || self.dli_fname == NULL) {
        p11g_log("TLS: cannot find where this library is (dladdr)");
        return;
    }
    const char *slash = strrchr(self.dli_fname, '/');
    int dir = slash != NULL ? (int)(slash - self.dli_fname + 1) : 0;
    int n = snprintf(path, sizeof path, "%.*s%s", dir, self.dli_fname, P11G_TLS_PLUGIN);
    if (n < 0 || (size_t)n >= sizeof path) {
        p11g_log("TLS: the path of %s is too long", P11G_TLS_PLUGIN);
        return;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (h == NULL) {
        const char *why = dlerror();
        p11g_log("TLS: cannot load %s: %s", path, why != NULL ? why : "unknown error");
        return;
    }
    const struct p11g_tls_ops *ops = dlsym(h, P11G_TLS_PLUGIN_SYMBOL);
    if (ops == NULL || ops->version != P11G_TLS_OPS_VERSION) {
        p11g_log("TLS: %s is not from this build of the library", path);
        return;
    }
    g_ops = ops;
}

int p11g_tls_global_init(void)
{
    pthread_once(&g_once, load_plugin);
    return g_ops != NULL ? g_ops->global_init() : P11G_E_NET;
}

/* Every other call comes after a successful p11g_tls_global_init (a TLS
 * object exists only then); a NULL object is answered here. */
int p11g_tls_open(const struct p11g_config *cfg, int fd, const struct timespec *deadline,
                  struct p11g_tls **out, char *err, size_t errlen)
{
    if (g_ops == NULL) {
        snprintf(err, errlen, "TLS is not available");
        return P11G_E_NET;
    }
    return g_ops->open(cfg, fd, deadline, out, err, errlen);
}

long p11g_tls_recv(struct p11g_tls *t, void *buf, size_t n, short *events)
{
    return g_ops->recv(t, buf, n, events);
}

long p11g_tls_send(struct p11g_tls *t, const void *buf, size_t n, short *events)
{
    return g_ops->send(t, buf, n, events);
}

void p11g_tls_close_notify(struct p11g_tls *t)
{
    if (t != NULL)
        g_ops->close_notify(t);
}

void p11g_tls_error(struct p11g_tls *t, char *buf, size_t len)
{
    if (t != NULL) {
        g_ops->error(t, buf, len);
        return;
    }
    if (len > 0)
        buf[0] = '\0';
}

void p11g_tls_free(struct p11g_tls *t)
{
    if (t != NULL)
        g_ops->free(t);
}
