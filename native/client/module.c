/* module.c: library-wide state: C_Initialize / C_Finalize, the connection
 * handshake, reconnection, fork handling, and the C_GetFunctionList /
 * C_GetInterface(List) entry points.
 *
 * Nothing happens at load time except registering fork handlers: the
 * connection is made in C_Initialize (SetupArch -> LoadModule -> Initialize).
 * g_lock guards only pointer swaps and reference counts, never a round trip. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "p11g.h"
#include "p11g_procs.h"

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;      /* state below */
static pthread_mutex_t g_init_lock = PTHREAD_MUTEX_INITIALIZER; /* Initialize/Finalize */
static int g_initialized;
static struct p11g_conn *g_conn;
static size_t g_max_record = P11G_DEFAULT_MAX_RECORD;
static unsigned long g_generation;
static int g_lost_logged;
static pthread_once_t g_exit_once = PTHREAD_ONCE_INIT;
static void register_exit_handler(void);

void p11g_log(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    /* One write so that lines from several threads do not interleave. */
    char out[540];
    int n = snprintf(out, sizeof out, "p11guard: %s\n", line);
    if (n > 0) {
        ssize_t w = write(2, out, (size_t)n < sizeof out ? (size_t)n : sizeof out - 1);
        (void)w;
    }
}

static unsigned arch_code(void)
{
    const uint16_t probe = 1;
    int little = *(const uint8_t *)&probe == 1;
    if (sizeof(CK_ULONG) == 8)
        return little ? P11G_ARCH_LITTLE_ENDIAN_64 : P11G_ARCH_BIG_ENDIAN_64;
    return little ? P11G_ARCH_LITTLE_ENDIAN_32 : P11G_ARCH_BIG_ENDIAN_32;
}

CK_RV p11g_rv(uint64_t wire_rv)
{
    /* Caml Crush answers (CK_RV)-1 for protocol misuse; no application
     * expects that value. */
    if (wire_rv == UINT64_MAX)
        return CKR_GENERAL_ERROR;
    return (CK_RV)wire_rv;
}

unsigned long p11g_generation(void)
{
    pthread_mutex_lock(&g_lock);
    unsigned long g = g_generation;
    pthread_mutex_unlock(&g_lock);
    return g;
}

CK_RV p11g_acquire(struct p11g_conn **c, size_t *max_record)
{
    CK_RV rv = CKR_OK;
    pthread_mutex_lock(&g_lock);
    if (!g_initialized)
        rv = CKR_CRYPTOKI_NOT_INITIALIZED;
    else if (g_conn == NULL || p11g_conn_dead(g_conn))
        rv = CKR_DEVICE_ERROR;
    else {
        p11g_conn_ref(g_conn);
        *c = g_conn;
        *max_record = g_max_record;
    }
    pthread_mutex_unlock(&g_lock);
    return rv;
}

void p11g_release(struct p11g_conn *c) { p11g_conn_unref(c); }

static CK_RV map_err(int err, unsigned proc)
{
    switch (err) {
    case P11G_OK:
        return CKR_OK;
    case P11G_E_NOMEM:
        return CKR_HOST_MEMORY;
    case P11G_E_TOOBIG:
        return CKR_DATA_LEN_RANGE;
    case P11G_E_PROC:
        return CKR_FUNCTION_NOT_SUPPORTED;
    case P11G_E_PROTO:
        p11g_log("malformed or refused reply to C_%s", p11g_proc_name(proc));
        return CKR_DEVICE_ERROR;
    default: {
        pthread_mutex_lock(&g_lock);
        int first = !g_lost_logged;
        g_lost_logged = 1;
        pthread_mutex_unlock(&g_lock);
        if (first)
            p11g_log("%s during C_%s; calls fail with CKR_DEVICE_ERROR until C_Initialize "
                     "reconnects",
                     err == P11G_E_TIMEOUT ? "proxy did not answer in time"
                                           : "connection to the proxy lost",
                     p11g_proc_name(proc));
        return CKR_DEVICE_ERROR;
    }
    }
}

CK_RV p11g_call(unsigned proc, const struct p11g_arg *args, struct p11g_res *res,
                struct p11g_reply *rep)
{
    struct p11g_conn *c;
    size_t max_record;
    rep->buf = NULL;
    rep->len = 0;
    CK_RV rv = p11g_acquire(&c, &max_record);
    if (rv != CKR_OK)
        return rv;
    /* This thread's own channel, when it has one or now needs one (channels.c). */
    struct p11g_conn *ch = p11g_channel_for_call(c, max_record);
    if (ch != NULL) {
        p11g_release(c);
        c = ch;
    }
    int err = p11g_rpc(c, proc, args, res, rep, max_record);
    p11g_release(c);
    if (err != P11G_OK)
        p11g_reply_free(rep);
    return map_err(err, proc);
}

/* With TLS 1.3 the server checks our certificate after our side of the
 * handshake is done: a refusal arrives as an alert on the first read. */
static int log_tls_failure(struct p11g_conn *c, const struct p11g_config *cfg, const char *step)
{
    char why[200];
    if (!cfg->tls)
        return 0;
    p11g_conn_tls_error(c, why, sizeof why);
    if (why[0] == '\0')
        return 0;
    p11g_log("TLS session with %s failed during %s: %s", cfg->host, step, why);
    return 1;
}

/* SetupArch -> LoadModule -> Initialize on a fresh connection.  `init_flags`
 * are the application's CK_C_INITIALIZE_ARGS flags: over protocol v4 the one
 * the server can act on (CKF_LIBRARY_CANT_CREATE_OS_THREADS) is forwarded; the
 * server itself decides on OS locking. */
static CK_RV handshake(struct p11g_conn *c, const struct p11g_config *cfg, CK_FLAGS init_flags)
{
    struct p11g_arg a[1];
    struct p11g_res r[2];
    struct p11g_reply rep;
    int err;

    memset(a, 0, sizeof a);
    a[0].h = arch_code();
    err = p11g_rpc(c, P11G_PROC_SetupArch, a, r, &rep, cfg->max_record);
    if (err != P11G_OK) {
        if (log_tls_failure(c, cfg, "SetupArch"))
            return CKR_DEVICE_ERROR;
        p11g_log("SetupArch failed (%s): is %s a p11guard or Caml Crush server?",
                 err == P11G_E_TIMEOUT ? "timeout" : err == P11G_E_PROTO ? "bad reply" : "I/O",
                 cfg->host);
        return CKR_DEVICE_ERROR;
    }
    uint64_t server_arch = r[0].h;
    p11g_reply_free(&rep);
    if (server_arch < P11G_ARCH_LITTLE_ENDIAN_64 || server_arch > P11G_ARCH_BIG_ENDIAN_32) {
        p11g_log("server refused our architecture (SetupArch answered %lld)",
                 (long long)server_arch);
        return CKR_DEVICE_ERROR;
    }

    memset(a, 0, sizeof a);
    a[0].ptr = cfg->libname;
    a[0].len = strlen(cfg->libname);
    err = p11g_rpc(c, P11G_PROC_LoadModule, a, r, &rep, cfg->max_record);
    if (err != P11G_OK) {
        if (log_tls_failure(c, cfg, "LoadModule"))
            return CKR_DEVICE_ERROR;
        p11g_log("LoadModule failed: %s", err == P11G_E_PROTO ? "bad reply" : "I/O error");
        return CKR_DEVICE_ERROR;
    }
    CK_RV mrv = p11g_rv(r[0].h);
    p11g_reply_free(&rep);
    if (mrv != CKR_OK) {
        p11g_log("the proxy refused module '%s' (rv 0x%lx)", cfg->libname, (unsigned long)mrv);
        return CKR_DEVICE_ERROR;
    }

    memset(a, 0, sizeof a);
    a[0].h = init_flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS;
    err = p11g_rpc(c, P11G_PROC_Initialize, a, r, &rep, cfg->max_record);
    if (err != P11G_OK) {
        if (log_tls_failure(c, cfg, "Initialize"))
            return CKR_DEVICE_ERROR;
        p11g_log("Initialize failed: %s", err == P11G_E_PROTO ? "bad reply" : "I/O error");
        return CKR_DEVICE_ERROR;
    }
    mrv = p11g_rv(r[0].h);
    p11g_reply_free(&rep);
    return mrv;
}

static CK_RV check_init_args(CK_VOID_PTR pInitArgs)
{
    if (pInitArgs == NULL)
        return CKR_OK;
    const CK_C_INITIALIZE_ARGS *a = pInitArgs;
    if (a->pReserved != NULL)
        return CKR_ARGUMENTS_BAD;
    int n = (a->CreateMutex != NULL) + (a->DestroyMutex != NULL) + (a->LockMutex != NULL) +
            (a->UnlockMutex != NULL);
    if (n != 0 && n != 4)
        return CKR_ARGUMENTS_BAD;
    /* We always lock with pthreads, which PKCS#11 allows with CKF_OS_LOCKING_OK;
     * without it we still use OS locks rather than refuse (documented). */
    return CKR_OK;
}

P11G_EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs)
{
    CK_RV rv = check_init_args(pInitArgs);
    if (rv != CKR_OK)
        return rv;

    pthread_mutex_lock(&g_init_lock);
    pthread_mutex_lock(&g_lock);
    if (g_initialized && g_conn != NULL && !p11g_conn_dead(g_conn)) {
        pthread_mutex_unlock(&g_lock);
        pthread_mutex_unlock(&g_init_lock);
        return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    }
    /* Not initialised, or initialised on a dead connection: (re)connect. */
    struct p11g_conn *old = g_conn;
    g_conn = NULL;
    g_initialized = 0;
    g_generation++;
    pthread_mutex_unlock(&g_lock);
    p11g_channels_close_all();
    if (old != NULL)
        p11g_conn_close(old);
    p11g_cache_clear();

    struct p11g_config cfg;
    char err[256] = "";
    rv = p11g_config_load(&cfg, err, sizeof err);
    if (rv != CKR_OK) {
        p11g_log("%s", err);
        pthread_mutex_unlock(&g_init_lock);
        return rv;
    }
    if (cfg.tls) {
        int t = p11g_tls_global_init();
        if (t != P11G_OK) {
            if (t == P11G_E_NOMEM) /* a plugin that does not load has said why */
                p11g_log("TLS: cannot initialise OpenSSL");
            pthread_mutex_unlock(&g_init_lock);
            return CKR_DEVICE_ERROR;
        }
        /* After OpenSSL's own exit handler, so ours runs first (see p11g_unload). */
        pthread_once(&g_exit_once, register_exit_handler);
    }
    struct p11g_conn *c = NULL;
    if (p11g_conn_open(&cfg, &c, err, sizeof err) != P11G_OK) {
        p11g_log("%s", err);
        pthread_mutex_unlock(&g_init_lock);
        return CKR_DEVICE_ERROR;
    }
    CK_FLAGS init_flags = 0;
    if (pInitArgs != NULL)
        init_flags = ((CK_C_INITIALIZE_ARGS *)pInitArgs)->flags;
    rv = handshake(c, &cfg, init_flags);
    if (rv != CKR_OK) {
        p11g_conn_close(c);
        pthread_mutex_unlock(&g_init_lock);
        return rv;
    }
    p11g_channels_configure(&cfg);
    pthread_mutex_lock(&g_lock);
    g_conn = c;
    g_max_record = cfg.max_record;
    g_initialized = 1;
    g_lost_logged = 0;
    g_generation++;
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_unlock(&g_init_lock);
    return CKR_OK;
}

P11G_EXPORT CK_RV C_Finalize(CK_VOID_PTR pReserved)
{
    if (pReserved != NULL)
        return CKR_ARGUMENTS_BAD;
    pthread_mutex_lock(&g_init_lock);
    pthread_mutex_lock(&g_lock);
    if (!g_initialized) {
        pthread_mutex_unlock(&g_lock);
        pthread_mutex_unlock(&g_init_lock);
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    struct p11g_conn *c = g_conn;
    size_t max_record = g_max_record;
    g_conn = NULL;
    g_initialized = 0;
    g_generation++; /* ends local WaitForSlotEvent loops */
    pthread_mutex_unlock(&g_lock);
    p11g_channels_close_all(); /* before the module is finalized under them */

    CK_RV rv = CKR_OK;
    if (c != NULL && !p11g_conn_dead(c)) {
        struct p11g_arg a[1];
        struct p11g_res r[1];
        struct p11g_reply rep;
        memset(a, 0, sizeof a);
        if (p11g_rpc(c, P11G_PROC_Finalize, a, r, &rep, max_record) == P11G_OK) {
            rv = p11g_rv(r[0].h);
            p11g_reply_free(&rep);
        }
        /* On a broken connection the server side is gone already: the
         * library is finalised either way. */
    }
    if (c != NULL)
        p11g_conn_close(c); /* closing ends the server's worker */
    p11g_cache_clear();
    pthread_mutex_unlock(&g_init_lock);
    return rv;
}

/* ---- fork handling ------------------------------------------------------ */
static void atfork_prepare(void)
{
    pthread_mutex_lock(&g_lock);
    p11g_cache_atfork_prepare();
    p11g_channels_atfork_prepare();
}

static void atfork_parent(void)
{
    p11g_channels_atfork_parent();
    p11g_cache_atfork_parent();
    pthread_mutex_unlock(&g_lock);
}

static void atfork_child(void)
{
    /* PKCS#11: a child must call C_Initialize.  Until it does, every call
     * returns CKR_CRYPTOKI_NOT_INITIALIZED; nothing is ever sent on the
     * parent's connection from here. */
    p11g_channels_atfork_child();
    p11g_cache_atfork_child();
    p11g_conn_abandon(g_conn);
    g_conn = NULL;
    g_initialized = 0;
    g_generation++;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_init_lock, &fresh, sizeof fresh); /* may have been held by a parent thread */
    pthread_mutex_unlock(&g_lock);
}

__attribute__((constructor)) static void p11g_load(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Runs at dlclose, and at exit.  At exit the order matters with TLS: OpenSSL
 * registers its cleanup with atexit() when it is initialised, and a library's
 * destructors run after all atexit handlers, when no OpenSSL function may be
 * called any more (OPENSSL_cleanup(3)).  So C_Initialize also registers this
 * function with atexit() right after initialising OpenSSL: handlers run in
 * reverse order, so it runs (and closes the session with close_notify) before
 * OpenSSL's cleanup.  The second call finds nothing to do. */
static void p11g_unload(void)
{
    pthread_mutex_lock(&g_lock);
    struct p11g_conn *c = g_conn;
    g_conn = NULL;
    g_initialized = 0;
    pthread_mutex_unlock(&g_lock);
    p11g_channels_close_all();
    if (c != NULL)
        p11g_conn_close(c);
    p11g_cache_clear();
}

__attribute__((destructor)) static void p11g_unload_dtor(void)
{
    p11g_unload();
    p11g_channels_unload(); /* here only: the atexit run is not an unload */
}

static void register_exit_handler(void)
{
    /* atexit() from a shared object is bound to it: a dlclose runs it too. */
    if (atexit(p11g_unload) != 0)
        p11g_log("cannot register the exit handler; TLS sessions are cut at exit");
}

/* ---- function lists and interfaces -------------------------------------- */
P11G_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
    if (ppFunctionList == NULL)
        return CKR_ARGUMENTS_BAD;
    *ppFunctionList = &p11g_function_list;
    return CKR_OK;
}

/* The 2.40 list comes first and is the default: the proxied module speaks
 * 2.40 over protocol v3.  The 3.0 list is there for applications that ask for
 * it by version; its 3.0-only functions answer CKR_FUNCTION_NOT_SUPPORTED. */
static CK_INTERFACE g_interfaces[2] = {
    {(CK_CHAR *)"PKCS 11", &p11g_function_list, 0},
    {(CK_CHAR *)"PKCS 11", &p11g_function_list_3_0, 0},
};
#define N_INTERFACES (sizeof g_interfaces / sizeof g_interfaces[0])

P11G_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount)
{
    if (pulCount == NULL)
        return CKR_ARGUMENTS_BAD;
    if (pInterfacesList == NULL) {
        *pulCount = N_INTERFACES;
        return CKR_OK;
    }
    if (*pulCount < N_INTERFACES) {
        *pulCount = N_INTERFACES;
        return CKR_BUFFER_TOO_SMALL;
    }
    memcpy(pInterfacesList, g_interfaces, sizeof g_interfaces);
    *pulCount = N_INTERFACES;
    return CKR_OK;
}

P11G_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                                 CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags)
{
    if (ppInterface == NULL)
        return CKR_ARGUMENTS_BAD;
    for (size_t i = 0; i < N_INTERFACES; i++) {
        CK_INTERFACE *it = &g_interfaces[i];
        const CK_VERSION *v = it->pFunctionList; /* both lists start with their version */
        if (pInterfaceName != NULL &&
            strcmp((const char *)pInterfaceName, (const char *)it->pInterfaceName) != 0)
            continue;
        if (pVersion != NULL && (pVersion->major != v->major || pVersion->minor != v->minor))
            continue;
        if ((it->flags & flags) != flags)
            continue;
        *ppInterface = it;
        return CKR_OK;
    }
    return CKR_ARGUMENTS_BAD;
}
