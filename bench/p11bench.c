/*
 * p11bench: time one PKCS#11 operation against any module.
 *
 * The module is dlopen()ed by path, so the same binary measures SoftHSM2
 * directly, a Caml Crush client library, or libp11guard.so.  Keys are created
 * as session objects at start-up (only those the chosen operation needs), so
 * the token is left as it was found; the single token object used by `find`
 * is destroyed at the end.
 *
 * Two ops need no module in this process:
 *  - newconn forks a child per iteration that does what a short-lived tool
 *    does (dlopen, C_GetFunctionList, C_Initialize, C_GetSlotList,
 *    C_Finalize, exit); the parent only forks and waits, so nothing (not even
 *    the Caml Crush client's socket, opened at dlopen) is inherited.
 *  - echo is the floor of a proxied call: request/reply round trips of the
 *    sizes of one GetSessionInfo in protocol v4, over TCP loopback or a Unix
 *    socket, against a bare C echo server that p11bench forks itself.
 *
 * The result is ONE line of JSON on stdout (also on failure, with "error"),
 * so a driver can parse it without scraping.  Diagnostics go to stderr.
 * The PIN is never printed.  With --sync, a {"ready":...} line comes first and
 * the measurement starts when a line (or EOF) arrives on stdin, so a driver
 * can start many processes at once or look at the server in between.
 *
 * Build: make -C bench   (gcc -O2 -std=c11 -Wall -Wextra -Werror -pthread -ldl)
 */
#define _GNU_SOURCE /* flock, prctl, SOCK_CLOEXEC, mkdtemp */

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

/* Our own "rv" for a call that returned CKR_OK but produced a wrong-looking
 * result (wrong output length, object not found): counted as an error so a
 * broken proxy cannot look fast by doing nothing. */
#define BENCH_RV_BAD_RESULT (CKR_VENDOR_DEFINED | 0x0BADUL)

/* Stop a thread after this many consecutive failures: a dead connection
 * (Caml Crush returns -1 forever) must not spin for the whole duration. */
#define MAX_CONSECUTIVE_ERRORS 100

/* newconn: the child's exit status says which step failed; the parent
 * reports it as this vendor rv | status (0x80 | signal for a killed child). */
#define BENCH_RV_NEWCONN (CKR_VENDOR_DEFINED | 0xC000UL)
enum newconn_step {
    NEWCONN_OK = 0,
    NEWCONN_DLOPEN = 1,
    NEWCONN_NO_SYMBOL = 2,
    NEWCONN_FUNCTION_LIST = 3,
    NEWCONN_INITIALIZE = 4,
    NEWCONN_SLOT_LIST = 5,
    NEWCONN_FINALIZE = 6,
};

#define AES_DATA_LEN 4096
#define DIGEST_DATA_LEN 1024
#define MAX_SLOTS 256
#define LABEL_MAX 64

/* echo: one GetSessionInfo in protocol v4 is a 52-byte call record and a
 * 68-byte reply record (record marks included), measured with strace. */
#define ECHO_REQUEST_DEFAULT 52
#define ECHO_REPLY_DEFAULT 68
#define ECHO_MAX_BYTES 65536

/* ------------------------------------------------------------------ */
/* Operations                                                          */

enum op {
    OP_RANDOM,
    OP_SESSIONINFO,
    OP_FIND,
    OP_DIGEST,
    OP_ECDSA,
    OP_RSA,
    OP_AESCBC,
    OP_OPENSESSION,
    OP_CONNECT,
    OP_NEWCONN,
    OP_ECHO,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "random", "sessioninfo", "find", "digest", "ecdsa",
    "rsa", "aescbc", "opensession", "connect", "newconn", "echo",
};

/* Does this process itself load the module (and log in, make keys)? */
static int loads_module(enum op op)
{
    return op != OP_NEWCONN && op != OP_ECHO;
}

/* Does each thread work on its own session of the shared module? */
static int uses_sessions(enum op op)
{
    return loads_module(op) && op != OP_CONNECT;
}

/* ------------------------------------------------------------------ */
/* Options and shared state                                            */

struct options {
    const char *module;
    const char *token_label; /* NULL: the first slot with a token */
    const char *pin;         /* NULL: no login */
    enum op op;
    double seconds;          /* used when iterations == 0 */
    unsigned long iterations;
    unsigned threads;
    double warmup;           /* seconds, per thread, not counted */
    int sync;                /* --sync: print ready, wait for stdin before t0 */
    const char *setup_lock;  /* --setup-lock: flock() held around token writes */
    int echo_unix;           /* --echo unix (else tcp) */
    unsigned long request_bytes, reply_bytes;
};

struct bench {
    struct options opt;
    void *dl;
    CK_FUNCTION_LIST_PTR f;
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE main_session;
    int logged_in;
    CK_OBJECT_HANDLE rsa_priv, ec_priv, aes_key, find_obj;
    char find_label[LABEL_MAX];
    int lock_fd;             /* -1 unless the setup lock is held */
    pid_t echo_pid;          /* the echo server, 0 when none */
    struct sockaddr_storage echo_addr;
    socklen_t echo_addrlen;
    char echo_dir[64];       /* the Unix echo socket's private directory */
    pthread_barrier_t ready; /* threads + main: everyone set up and warmed */
    pthread_barrier_t go;    /* threads + main: main has taken t0 */
};

/* Latency histogram: log2 buckets with 16 linear sub-buckets (about 6%
 * resolution), so percentiles cost nothing per operation. */
#define HIST_SUB_BITS 4
#define HIST_BUCKETS 1024

struct worker {
    struct bench *b;
    unsigned index;
    unsigned long quota; /* iterations for this thread (with --iterations) */
    CK_SESSION_HANDLE session;
    int fd;                  /* echo: this thread's connection */
    unsigned long count;
    unsigned long errors;
    CK_RV first_error;
    int setup_failed;
    char setup_error[160];
    double end_time;
    uint64_t hist[HIST_BUCKETS];
    uint64_t max_ns;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static unsigned hist_index(uint64_t ns)
{
    if (ns < (1U << HIST_SUB_BITS))
        return (unsigned)ns;
    unsigned msb = 63U - (unsigned)__builtin_clzll(ns);
    unsigned sub = (unsigned)((ns >> (msb - HIST_SUB_BITS)) & ((1U << HIST_SUB_BITS) - 1));
    unsigned idx = (msb - HIST_SUB_BITS + 1) * (1U << HIST_SUB_BITS) + sub;
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

/* The lower bound of a bucket, i.e. the inverse of hist_index. */
static uint64_t hist_value(unsigned idx)
{
    if (idx < (1U << HIST_SUB_BITS))
        return idx;
    unsigned msb = idx / (1U << HIST_SUB_BITS) + HIST_SUB_BITS - 1;
    uint64_t sub = idx % (1U << HIST_SUB_BITS);
    return ((1ULL << HIST_SUB_BITS) | sub) << (msb - HIST_SUB_BITS);
}

/* ------------------------------------------------------------------ */
/* JSON output                                                         */

/* Writes s as a JSON string body; control characters and quotes escaped. */
static void json_str(FILE *out, const char *s)
{
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(out, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(out, "\\u%04x", *p);
        else
            fputc(*p, out);
    }
    fputc('"', out);
}

static void print_failure(const struct options *o, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "p11bench: %s\n", msg);
    printf("{\"op\":");
    json_str(stdout, o->op < OP_COUNT ? op_names[o->op] : "?");
    printf(",\"module\":");
    json_str(stdout, o->module ? o->module : "");
    printf(",\"error\":");
    json_str(stdout, msg);
    printf("}\n");
    fflush(stdout);
}

/* ------------------------------------------------------------------ */
/* Setup lock                                                          */

/* SoftHSM2 rewrites its token file on every C_Login, and a process that
 * reads the token meanwhile (C_Initialize, C_GetTokenInfo) can find it
 * missing.  Processes started together (the concurrency scenarios) therefore
 * take an exclusive flock() around what reads or writes token files: from
 * dlopen to the end of C_Login, and around teardown.  Key generation (session
 * objects) and the measured loop run unlocked. */
static int setup_lock_take(struct bench *b)
{
    if (b->opt.setup_lock == NULL || b->lock_fd >= 0)
        return 0;
    int fd = open(b->opt.setup_lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            close(fd);
            return -1;
        }
    }
    b->lock_fd = fd;
    return 0;
}

static void setup_lock_release(struct bench *b)
{
    if (b->lock_fd < 0)
        return;
    flock(b->lock_fd, LOCK_UN);
    close(b->lock_fd);
    b->lock_fd = -1;
}

/* ------------------------------------------------------------------ */
/* Setup                                                               */

static CK_BBOOL ck_true = CK_TRUE;
static CK_BBOOL ck_false = CK_FALSE;

/* Token labels are 32 bytes, blank padded, not NUL terminated. */
static int label_matches(const CK_UTF8CHAR label[32], const char *want)
{
    size_t n = strlen(want);
    if (n > 32)
        return 0;
    if (memcmp(label, want, n) != 0)
        return 0;
    for (size_t i = n; i < 32; i++)
        if (label[i] != ' ')
            return 0;
    return 1;
}

static CK_RV find_slot(struct bench *b, char *err, size_t errlen)
{
    CK_ULONG n = 0;
    CK_SLOT_ID slots[MAX_SLOTS];
    /* Always ask for the count first: the Caml Crush client crashes on a
     * buffer with count 0. */
    CK_RV rv = b->f->C_GetSlotList(CK_TRUE, NULL, &n);
    if (rv != CKR_OK) {
        snprintf(err, errlen, "C_GetSlotList: 0x%lx", (unsigned long)rv);
        return rv;
    }
    if (n == 0) {
        snprintf(err, errlen, "no slot with a token");
        return CKR_TOKEN_NOT_PRESENT;
    }
    if (n > MAX_SLOTS)
        n = MAX_SLOTS;
    rv = b->f->C_GetSlotList(CK_TRUE, slots, &n);
    if (rv != CKR_OK) {
        snprintf(err, errlen, "C_GetSlotList: 0x%lx", (unsigned long)rv);
        return rv;
    }
    if (n > MAX_SLOTS)
        n = MAX_SLOTS;
    for (CK_ULONG i = 0; i < n; i++) {
        if (b->opt.token_label == NULL) {
            b->slot = slots[i];
            return CKR_OK;
        }
        CK_TOKEN_INFO ti;
        memset(&ti, 0, sizeof ti);
        if (b->f->C_GetTokenInfo(slots[i], &ti) != CKR_OK)
            continue;
        if (label_matches(ti.label, b->opt.token_label)) {
            b->slot = slots[i];
            return CKR_OK;
        }
    }
    snprintf(err, errlen, "no token labelled '%s'", b->opt.token_label);
    return CKR_TOKEN_NOT_PRESENT;
}

static CK_RV make_rsa(struct bench *b)
{
    CK_MECHANISM mech = {CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_ULONG bits = 2048;
    CK_BYTE exponent[] = {0x01, 0x00, 0x01};
    CK_ATTRIBUTE pub[] = {
        {CKA_TOKEN, &ck_false, sizeof ck_false},
        {CKA_VERIFY, &ck_true, sizeof ck_true},
        {CKA_MODULUS_BITS, &bits, sizeof bits},
        {CKA_PUBLIC_EXPONENT, exponent, sizeof exponent},
    };
    CK_ATTRIBUTE priv[] = {
        {CKA_TOKEN, &ck_false, sizeof ck_false},
        {CKA_PRIVATE, &ck_true, sizeof ck_true},
        {CKA_SENSITIVE, &ck_true, sizeof ck_true},
        {CKA_SIGN, &ck_true, sizeof ck_true},
    };
    CK_OBJECT_HANDLE pubh;
    return b->f->C_GenerateKeyPair(b->main_session, &mech, pub, 4, priv, 4, &pubh, &b->rsa_priv);
}

static CK_RV make_ec(struct bench *b)
{
    CK_MECHANISM mech = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    /* DER OID 1.2.840.10045.3.1.7 (prime256v1 / P-256). */
    CK_BYTE params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    CK_ATTRIBUTE pub[] = {
        {CKA_TOKEN, &ck_false, sizeof ck_false},
        {CKA_VERIFY, &ck_true, sizeof ck_true},
        {CKA_EC_PARAMS, params, sizeof params},
    };
    CK_ATTRIBUTE priv[] = {
        {CKA_TOKEN, &ck_false, sizeof ck_false},
        {CKA_PRIVATE, &ck_true, sizeof ck_true},
        {CKA_SENSITIVE, &ck_true, sizeof ck_true},
        {CKA_SIGN, &ck_true, sizeof ck_true},
    };
    CK_OBJECT_HANDLE pubh;
    return b->f->C_GenerateKeyPair(b->main_session, &mech, pub, 3, priv, 4, &pubh, &b->ec_priv);
}

static CK_RV make_aes(struct bench *b)
{
    CK_MECHANISM mech = {CKM_AES_KEY_GEN, NULL, 0};
    CK_ULONG len = 32;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_TOKEN, &ck_false, sizeof ck_false},
        {CKA_ENCRYPT, &ck_true, sizeof ck_true},
        {CKA_VALUE_LEN, &len, sizeof len},
    };
    return b->f->C_GenerateKey(b->main_session, &mech, tmpl, 3, &b->aes_key);
}

/* One public token data object with a per-process label: FindObjects then
 * matches exactly one object, and concurrent runs do not see each other's. */
static CK_RV make_find_object(struct bench *b)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BYTE value[] = "p11bench";
    snprintf(b->find_label, sizeof b->find_label, "p11bench-find-%ld", (long)getpid());
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_TOKEN, &ck_true, sizeof ck_true},
        {CKA_PRIVATE, &ck_false, sizeof ck_false},
        {CKA_LABEL, b->find_label, strlen(b->find_label)},
        {CKA_VALUE, value, sizeof value - 1},
    };
    return b->f->C_CreateObject(b->main_session, tmpl, 5, &b->find_obj);
}

static int needs_login(enum op op)
{
    return op == OP_ECDSA || op == OP_RSA || op == OP_AESCBC || op == OP_FIND;
}

/* Initialise, open the main session, log in and create what the op needs.
 * Returns 0 or -1 with err filled. */
static int setup(struct bench *b, char *err, size_t errlen)
{
    CK_C_INITIALIZE_ARGS init;
    memset(&init, 0, sizeof init);
    init.flags = CKF_OS_LOCKING_OK; /* we call from several threads */
    CK_RV rv = b->f->C_Initialize(&init);
    if (rv != CKR_OK) {
        snprintf(err, errlen, "C_Initialize: 0x%lx", (unsigned long)rv);
        return -1;
    }
    if (find_slot(b, err, errlen) != CKR_OK)
        return -1;
    if (b->opt.op == OP_CONNECT) {
        /* The loop owns Initialize/Finalize from here on. */
        setup_lock_release(b);
        rv = b->f->C_Finalize(NULL);
        if (rv != CKR_OK) {
            snprintf(err, errlen, "C_Finalize: 0x%lx", (unsigned long)rv);
            return -1;
        }
        return 0;
    }
    rv = b->f->C_OpenSession(b->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                             &b->main_session);
    if (rv != CKR_OK) {
        snprintf(err, errlen, "C_OpenSession: 0x%lx", (unsigned long)rv);
        return -1;
    }
    if (b->opt.pin != NULL) {
        rv = b->f->C_Login(b->main_session, CKU_USER, (CK_UTF8CHAR_PTR)b->opt.pin,
                           strlen(b->opt.pin));
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
            snprintf(err, errlen, "C_Login: 0x%lx", (unsigned long)rv);
            return -1;
        }
        b->logged_in = 1;
    } else if (needs_login(b->opt.op)) {
        snprintf(err, errlen, "--op %s needs --pin", op_names[b->opt.op]);
        return -1;
    }
    /* The token file is not written again until teardown (except by find's
     * object, created below: keep the lock for that one). */
    if (b->opt.op != OP_FIND)
        setup_lock_release(b);
    const char *what = NULL;
    switch (b->opt.op) {
    case OP_RSA: what = "RSA-2048 key pair"; rv = make_rsa(b); break;
    case OP_ECDSA: what = "P-256 key pair"; rv = make_ec(b); break;
    case OP_AESCBC: what = "AES-256 key"; rv = make_aes(b); break;
    case OP_FIND: what = "token data object"; rv = make_find_object(b); break;
    default: rv = CKR_OK; break;
    }
    setup_lock_release(b);
    if (rv != CKR_OK) {
        snprintf(err, errlen, "creating the %s: 0x%lx", what, (unsigned long)rv);
        return -1;
    }
    return 0;
}

static void teardown(struct bench *b)
{
    if (!loads_module(b->opt.op) || b->opt.op == OP_CONNECT)
        return; /* nothing loaded here, or every iteration ended with C_Finalize */
    if (setup_lock_take(b) != 0)
        fprintf(stderr, "p11bench: --setup-lock: %s\n", strerror(errno));
    if (b->find_obj != CK_INVALID_HANDLE)
        b->f->C_DestroyObject(b->main_session, b->find_obj);
    if (b->logged_in)
        b->f->C_Logout(b->main_session);
    b->f->C_CloseSession(b->main_session);
    b->f->C_Finalize(NULL);
    setup_lock_release(b);
}

/* ------------------------------------------------------------------ */
/* newconn: one short-lived tool per iteration                         */

/* Runs in the forked child; returns its exit status (enum newconn_step). */
static int newconn_child(const char *module)
{
    void *dl = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (dl == NULL)
        return NEWCONN_DLOPEN;
    CK_C_GetFunctionList gfl;
    *(void **)&gfl = dlsym(dl, "C_GetFunctionList");
    if (gfl == NULL)
        return NEWCONN_NO_SYMBOL;
    CK_FUNCTION_LIST_PTR f = NULL;
    if (gfl(&f) != CKR_OK || f == NULL)
        return NEWCONN_FUNCTION_LIST;
    CK_C_INITIALIZE_ARGS init;
    memset(&init, 0, sizeof init);
    init.flags = CKF_OS_LOCKING_OK;
    if (f->C_Initialize(&init) != CKR_OK)
        return NEWCONN_INITIALIZE;
    CK_SLOT_ID slots[MAX_SLOTS];
    CK_ULONG n = 0;
    CK_RV rv = f->C_GetSlotList(CK_TRUE, NULL, &n);
    if (rv == CKR_OK && n > 0) {
        if (n > MAX_SLOTS)
            n = MAX_SLOTS;
        rv = f->C_GetSlotList(CK_TRUE, slots, &n);
    }
    CK_RV rv2 = f->C_Finalize(NULL);
    if (rv != CKR_OK || n == 0)
        return NEWCONN_SLOT_LIST;
    return rv2 == CKR_OK ? NEWCONN_OK : NEWCONN_FINALIZE;
}

static CK_RV newconn_once(const char *module)
{
    pid_t pid = fork();
    if (pid < 0)
        return CKR_HOST_MEMORY;
    if (pid == 0)
        exit(newconn_child(module)); /* exit(), as a tool would: destructors run */
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return CKR_FUNCTION_FAILED;
    if (WIFEXITED(status))
        return WEXITSTATUS(status) == 0 ? CKR_OK
                                         : BENCH_RV_NEWCONN | (CK_RV)WEXITSTATUS(status);
    return BENCH_RV_NEWCONN | 0x80UL | (CK_RV)(WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

/* ------------------------------------------------------------------ */
/* echo: the floor of one round trip                                   */

static int write_full(int fd, const unsigned char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int read_full(int fd, unsigned char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void set_nodelay(int fd, int is_unix)
{
    int one = 1;
    if (!is_unix)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* One connection of the echo server: read a whole request, write a whole
 * reply, until the client closes. */
static void echo_serve(int fd, const struct options *o)
{
    static unsigned char in[ECHO_MAX_BYTES], out[ECHO_MAX_BYTES];
    set_nodelay(fd, o->echo_unix);
    memset(out, 0x5a, o->reply_bytes);
    while (read_full(fd, in, o->request_bytes) == 0 &&
           write_full(fd, out, o->reply_bytes) == 0)
        ;
}

/* The echo server process: a process per connection, as a proxy worker. */
static void echo_server(int lfd, pid_t parent, const struct options *o)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)
        _exit(0); /* the parent died before prctl */
    signal(SIGCHLD, SIG_IGN); /* connections' processes reap themselves */
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            _exit(1);
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(lfd);
            echo_serve(c, o);
            _exit(0);
        }
        close(c);
    }
}

/* Listen on 127.0.0.1:0 or on a socket in a fresh /tmp directory, and fork
 * the server.  Called before any thread exists. */
static int echo_start(struct bench *b, char *err, size_t errlen)
{
    int lfd = socket(b->opt.echo_unix ? AF_UNIX : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        snprintf(err, errlen, "echo socket: %s", strerror(errno));
        return -1;
    }
    memset(&b->echo_addr, 0, sizeof b->echo_addr);
    if (b->opt.echo_unix) {
        struct sockaddr_un *un = (struct sockaddr_un *)&b->echo_addr;
        snprintf(b->echo_dir, sizeof b->echo_dir, "/tmp/p11bench-echo-XXXXXX");
        if (mkdtemp(b->echo_dir) == NULL) {
            snprintf(err, errlen, "echo mkdtemp: %s", strerror(errno));
            b->echo_dir[0] = '\0';
            close(lfd);
            return -1;
        }
        un->sun_family = AF_UNIX;
        snprintf(un->sun_path, sizeof un->sun_path, "%s/s", b->echo_dir);
        b->echo_addrlen = sizeof *un;
    } else {
        struct sockaddr_in *in = (struct sockaddr_in *)&b->echo_addr;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        in->sin_port = 0;
        b->echo_addrlen = sizeof *in;
    }
    if (bind(lfd, (struct sockaddr *)&b->echo_addr, b->echo_addrlen) != 0 ||
        getsockname(lfd, (struct sockaddr *)&b->echo_addr, &b->echo_addrlen) != 0 ||
        listen(lfd, 128) != 0) {
        snprintf(err, errlen, "echo bind/listen: %s", strerror(errno));
        close(lfd);
        return -1;
    }
    fflush(NULL);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "echo fork: %s", strerror(errno));
        close(lfd);
        return -1;
    }
    if (pid == 0)
        echo_server(lfd, parent, &b->opt);
    close(lfd);
    b->echo_pid = pid;
    return 0;
}

static void echo_stop(struct bench *b)
{
    if (b->echo_pid > 0) {
        kill(b->echo_pid, SIGTERM);
        while (waitpid(b->echo_pid, NULL, 0) < 0 && errno == EINTR)
            ;
        b->echo_pid = 0;
    }
    if (b->echo_dir[0]) {
        unlink(((struct sockaddr_un *)&b->echo_addr)->sun_path);
        rmdir(b->echo_dir);
        b->echo_dir[0] = '\0';
    }
}

static int echo_connect(const struct bench *b)
{
    int fd = socket(b->echo_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)&b->echo_addr, b->echo_addrlen) != 0) {
        close(fd);
        return -1;
    }
    set_nodelay(fd, b->opt.echo_unix);
    return fd;
}

/* ------------------------------------------------------------------ */
/* One operation                                                       */

struct op_buffers {
    CK_BYTE in[ECHO_MAX_BYTES];
    CK_BYTE out[ECHO_MAX_BYTES];
};

/* Performs one operation; CKR_OK or the first failing rv. */
static CK_RV run_op(struct worker *w, struct op_buffers *buf)
{
    struct bench *b = w->b;
    CK_FUNCTION_LIST_PTR f = b->f;
    CK_SESSION_HANDLE s = w->session;
    CK_ULONG outlen = sizeof buf->out;
    CK_RV rv;

    switch (b->opt.op) {
    case OP_RANDOM:
        return f->C_GenerateRandom(s, buf->out, 32);

    case OP_SESSIONINFO: {
        CK_SESSION_INFO si;
        return f->C_GetSessionInfo(s, &si);
    }

    case OP_FIND: {
        CK_ATTRIBUTE tmpl[] = {{CKA_LABEL, b->find_label, strlen(b->find_label)}};
        CK_OBJECT_HANDLE found[16];
        CK_ULONG nfound = 0;
        rv = f->C_FindObjectsInit(s, tmpl, 1);
        if (rv != CKR_OK)
            return rv;
        rv = f->C_FindObjects(s, found, 16, &nfound);
        CK_RV rv2 = f->C_FindObjectsFinal(s);
        if (rv != CKR_OK)
            return rv;
        if (rv2 != CKR_OK)
            return rv2;
        return nfound >= 1 ? CKR_OK : BENCH_RV_BAD_RESULT;
    }

    case OP_DIGEST: {
        CK_MECHANISM m = {CKM_SHA256, NULL, 0};
        rv = f->C_DigestInit(s, &m);
        if (rv != CKR_OK)
            return rv;
        rv = f->C_Digest(s, buf->in, DIGEST_DATA_LEN, buf->out, &outlen);
        if (rv != CKR_OK)
            return rv;
        return outlen == 32 ? CKR_OK : BENCH_RV_BAD_RESULT;
    }

    case OP_ECDSA: {
        CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
        rv = f->C_SignInit(s, &m, b->ec_priv);
        if (rv != CKR_OK)
            return rv;
        rv = f->C_Sign(s, buf->in, 32, buf->out, &outlen);
        if (rv != CKR_OK)
            return rv;
        return outlen == 64 ? CKR_OK : BENCH_RV_BAD_RESULT;
    }

    case OP_RSA: {
        CK_MECHANISM m = {CKM_SHA256_RSA_PKCS, NULL, 0};
        rv = f->C_SignInit(s, &m, b->rsa_priv);
        if (rv != CKR_OK)
            return rv;
        rv = f->C_Sign(s, buf->in, 32, buf->out, &outlen);
        if (rv != CKR_OK)
            return rv;
        return outlen == 256 ? CKR_OK : BENCH_RV_BAD_RESULT;
    }

    case OP_AESCBC: {
        CK_BYTE iv[16] = {0};
        CK_MECHANISM m = {CKM_AES_CBC, iv, sizeof iv};
        rv = f->C_EncryptInit(s, &m, b->aes_key);
        if (rv != CKR_OK)
            return rv;
        rv = f->C_Encrypt(s, buf->in, AES_DATA_LEN, buf->out, &outlen);
        if (rv != CKR_OK)
            return rv;
        return outlen == AES_DATA_LEN ? CKR_OK : BENCH_RV_BAD_RESULT;
    }

    case OP_OPENSESSION: {
        CK_SESSION_HANDLE h;
        rv = f->C_OpenSession(b->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &h);
        if (rv != CKR_OK)
            return rv;
        return f->C_CloseSession(h);
    }

    case OP_CONNECT: {
        CK_C_INITIALIZE_ARGS init;
        CK_SLOT_ID slots[MAX_SLOTS];
        CK_ULONG n = 0;
        memset(&init, 0, sizeof init);
        init.flags = CKF_OS_LOCKING_OK;
        rv = f->C_Initialize(&init);
        if (rv != CKR_OK)
            return rv;
        rv = f->C_GetSlotList(CK_TRUE, NULL, &n);
        if (rv == CKR_OK && n > 0) {
            if (n > MAX_SLOTS)
                n = MAX_SLOTS;
            rv = f->C_GetSlotList(CK_TRUE, slots, &n);
        }
        CK_RV rv2 = f->C_Finalize(NULL);
        return rv != CKR_OK ? rv : rv2;
    }

    case OP_NEWCONN:
        return newconn_once(b->opt.module);

    case OP_ECHO:
        if (write_full(w->fd, buf->in, b->opt.request_bytes) != 0 ||
            read_full(w->fd, buf->out, b->opt.reply_bytes) != 0)
            return CKR_DEVICE_ERROR;
        return CKR_OK;

    case OP_COUNT:
        break;
    }
    return CKR_FUNCTION_FAILED;
}

/* ------------------------------------------------------------------ */
/* Threads                                                             */

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct bench *b = w->b;
    struct op_buffers *buf = calloc(1, sizeof *buf);

    for (size_t i = 0; buf && i < sizeof buf->in; i++)
        buf->in[i] = (CK_BYTE)(i * 31U + w->index);

    w->fd = -1;
    if (buf == NULL) {
        w->setup_failed = 1;
        snprintf(w->setup_error, sizeof w->setup_error, "out of memory");
    } else if (b->opt.op == OP_ECHO) {
        w->fd = echo_connect(b);
        if (w->fd < 0) {
            w->setup_failed = 1;
            snprintf(w->setup_error, sizeof w->setup_error, "echo connect: %s",
                     strerror(errno));
        }
    } else if (uses_sessions(b->opt.op)) {
        CK_RV rv = b->f->C_OpenSession(b->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                       &w->session);
        if (rv != CKR_OK) {
            w->setup_failed = 1;
            snprintf(w->setup_error, sizeof w->setup_error, "thread C_OpenSession: 0x%lx",
                     (unsigned long)rv);
        }
    }

    /* Warm-up: fills caches, forks the server's worker path, etc. Errors
     * here are not fatal; the measured loop counts them. */
    if (!w->setup_failed && b->opt.warmup > 0) {
        double stop = now_s() + b->opt.warmup;
        unsigned consecutive = 0;
        while (now_s() < stop && consecutive < MAX_CONSECUTIVE_ERRORS)
            consecutive = run_op(w, buf) == CKR_OK ? 0 : consecutive + 1;
    }

    pthread_barrier_wait(&b->ready);
    pthread_barrier_wait(&b->go); /* main checked setup and took t0 */

    if (!w->setup_failed && buf != NULL) {
        uint64_t t = now_ns();
        uint64_t deadline = t + (uint64_t)(b->opt.seconds * 1e9);
        unsigned consecutive = 0;
        for (unsigned long i = 0;; i++) {
            if (b->opt.iterations ? i >= w->quota : t >= deadline)
                break;
            CK_RV rv = run_op(w, buf);
            uint64_t t2 = now_ns();
            if (rv == CKR_OK) {
                w->count++;
                consecutive = 0;
                uint64_t d = t2 - t;
                w->hist[hist_index(d)]++;
                if (d > w->max_ns)
                    w->max_ns = d;
            } else {
                if (w->errors++ == 0)
                    w->first_error = rv;
                if (++consecutive >= MAX_CONSECUTIVE_ERRORS)
                    break;
            }
            t = t2;
        }
    }
    w->end_time = now_s();

    if (!w->setup_failed && uses_sessions(b->opt.op))
        b->f->C_CloseSession(w->session);
    if (w->fd >= 0)
        close(w->fd);
    free(buf);
    return NULL;
}

static double percentile_us(const uint64_t *hist, uint64_t total, double p)
{
    if (total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(p * (double)total);
    if (rank >= total)
        rank = total - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen > rank)
            return (double)hist_value(i) / 1000.0;
    }
    return (double)hist_value(HIST_BUCKETS - 1) / 1000.0;
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: p11bench --module PATH --op OP [options]\n"
            "       p11bench --op echo [--echo tcp|unix] [options]\n"
            "  --module PATH        PKCS#11 module to dlopen\n"
            "  --token-label LABEL  token to use (default: first slot with a token)\n"
            "  --pin PIN            user PIN (needed by find, ecdsa, rsa, aescbc)\n"
            "  --op OP              random|sessioninfo|find|digest|ecdsa|rsa|aescbc|\n"
            "                       opensession|connect|newconn|echo\n"
            "  --seconds S          measure for S seconds (default 5)\n"
            "  --iterations N       measure N operations in total instead\n"
            "  --threads N          threads, each with its own session (default 1)\n"
            "  --warmup S           seconds of unmeasured warm-up per thread (default 0.5)\n"
            "  --sync               print {\"ready\":...} when set up, start on a stdin line\n"
            "  --setup-lock PATH    flock PATH around token-file access (many processes)\n"
            "  --echo tcp|unix      echo transport (default tcp)\n"
            "  --request-bytes N    echo request size (default 52)\n"
            "  --reply-bytes N      echo reply size (default 68)\n"
            "Prints one JSON line: ops_per_s, count, errors, elapsed_s, latency percentiles.\n");
}

static int parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= 0.0) || v > 1e6)
        return -1;
    *out = v;
    return 0;
}

static int parse_ulong(const char *s, unsigned long *out)
{
    char *end;
    errno = 0;
    if (*s == '-')
        return -1;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

/* Returns 0, 1 (help printed) or -1 (error printed). */
static int parse_args(int argc, char **argv, struct options *o)
{
    o->op = OP_COUNT;
    o->seconds = 5.0;
    o->threads = 1;
    o->warmup = 0.5;
    o->request_bytes = ECHO_REQUEST_DEFAULT;
    o->reply_bytes = ECHO_REPLY_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(a, "--sync")) {
            o->sync = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "p11bench: %s: missing value or unknown option\n", a);
            return -1;
        }
        const char *v = argv[++i];
        unsigned long ul;
        if (!strcmp(a, "--module")) {
            o->module = v;
        } else if (!strcmp(a, "--token-label")) {
            o->token_label = v;
        } else if (!strcmp(a, "--pin")) {
            o->pin = v;
        } else if (!strcmp(a, "--op")) {
            for (int k = 0; k < OP_COUNT; k++)
                if (!strcmp(v, op_names[k]))
                    o->op = (enum op)k;
            if (o->op == OP_COUNT) {
                fprintf(stderr, "p11bench: unknown op '%s'\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--seconds")) {
            if (parse_double(v, &o->seconds) || o->seconds <= 0) {
                fprintf(stderr, "p11bench: bad --seconds\n");
                return -1;
            }
        } else if (!strcmp(a, "--iterations")) {
            if (parse_ulong(v, &o->iterations) || o->iterations == 0) {
                fprintf(stderr, "p11bench: bad --iterations\n");
                return -1;
            }
        } else if (!strcmp(a, "--threads")) {
            if (parse_ulong(v, &ul) || ul == 0 || ul > 1024) {
                fprintf(stderr, "p11bench: bad --threads (1..1024)\n");
                return -1;
            }
            o->threads = (unsigned)ul;
        } else if (!strcmp(a, "--warmup")) {
            if (parse_double(v, &o->warmup)) {
                fprintf(stderr, "p11bench: bad --warmup\n");
                return -1;
            }
        } else if (!strcmp(a, "--setup-lock")) {
            o->setup_lock = v;
        } else if (!strcmp(a, "--echo")) {
            if (strcmp(v, "tcp") != 0 && strcmp(v, "unix") != 0) {
                fprintf(stderr, "p11bench: bad --echo (tcp or unix)\n");
                return -1;
            }
            o->echo_unix = !strcmp(v, "unix");
        } else if (!strcmp(a, "--request-bytes") || !strcmp(a, "--reply-bytes")) {
            if (parse_ulong(v, &ul) || ul == 0 || ul > ECHO_MAX_BYTES) {
                fprintf(stderr, "p11bench: bad %s (1..%d)\n", a, ECHO_MAX_BYTES);
                return -1;
            }
            *(!strcmp(a, "--request-bytes") ? &o->request_bytes : &o->reply_bytes) = ul;
        } else {
            fprintf(stderr, "p11bench: unknown option %s\n", a);
            return -1;
        }
    }
    if (o->op == OP_ECHO && o->module == NULL)
        o->module = o->echo_unix ? "echo:unix" : "echo:tcp";
    if (o->module == NULL || o->op == OP_COUNT) {
        usage(stderr);
        return -1;
    }
    if (o->op == OP_CONNECT && o->threads != 1) {
        fprintf(stderr, "p11bench: --op connect finalizes the library; use --threads 1\n");
        return -1;
    }
    if (o->op == OP_NEWCONN && o->threads != 1) {
        /* fork() from one thread only: a child of a multi-threaded process
         * that dlopen()s is outside what POSIX promises. */
        fprintf(stderr, "p11bench: --op newconn forks per iteration; use --threads 1\n");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */

static void print_result(const struct bench *b, const struct worker *ws, double elapsed,
                         double prepare_s)
{
    static uint64_t hist[HIST_BUCKETS];
    unsigned long count = 0, errors = 0;
    uint64_t max_ns = 0;
    CK_RV first_error = CKR_OK;
    for (unsigned t = 0; t < b->opt.threads; t++) {
        count += ws[t].count;
        if (ws[t].errors && errors == 0)
            first_error = ws[t].first_error;
        errors += ws[t].errors;
        if (ws[t].max_ns > max_ns)
            max_ns = ws[t].max_ns;
        for (unsigned i = 0; i < HIST_BUCKETS; i++)
            hist[i] += ws[t].hist[i];
    }
    printf("{\"op\":\"%s\",\"module\":", op_names[b->opt.op]);
    json_str(stdout, b->opt.module);
    printf(",\"threads\":%u,\"count\":%lu,\"errors\":%lu,\"elapsed_s\":%.6f,"
           "\"ops_per_s\":%.2f,\"prepare_s\":%.3f,"
           "\"latency_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f}",
           b->opt.threads, count, errors, elapsed, elapsed > 0 ? (double)count / elapsed : 0.0,
           prepare_s, percentile_us(hist, count, 0.50), percentile_us(hist, count, 0.90),
           percentile_us(hist, count, 0.99), (double)max_ns / 1000.0);
    if (errors)
        printf(",\"first_error\":\"0x%lx\"", (unsigned long)first_error);
    if (b->opt.op == OP_ECHO)
        printf(",\"request_bytes\":%lu,\"reply_bytes\":%lu", b->opt.request_bytes,
               b->opt.reply_bytes);
    printf("}\n");
    fflush(stdout);
}

/* dlopen the module, get its function list and run setup(); on failure the
 * error JSON has been printed and everything is undone. */
static int load_module(struct bench *b)
{
    char err[256] = "";
    if (setup_lock_take(b) != 0) {
        print_failure(&b->opt, "--setup-lock %s: %s", b->opt.setup_lock, strerror(errno));
        return -1;
    }
    /* Loading a Caml Crush client connects to the server (constructor). */
    b->dl = dlopen(b->opt.module, RTLD_NOW | RTLD_LOCAL);
    if (b->dl == NULL) {
        print_failure(&b->opt, "dlopen: %s", dlerror());
        setup_lock_release(b);
        return -1;
    }
    CK_C_GetFunctionList gfl;
    /* POSIX guarantees this conversion works for dlsym results. */
    *(void **)&gfl = dlsym(b->dl, "C_GetFunctionList");
    CK_RV rv = gfl == NULL ? CKR_FUNCTION_FAILED : gfl(&b->f);
    if (gfl == NULL || rv != CKR_OK || b->f == NULL) {
        if (gfl == NULL)
            print_failure(&b->opt, "no C_GetFunctionList in module");
        else
            print_failure(&b->opt, "C_GetFunctionList: 0x%lx", (unsigned long)rv);
        setup_lock_release(b);
        dlclose(b->dl);
        return -1;
    }
    if (setup(b, err, sizeof err) != 0) {
        print_failure(&b->opt, "%s", err);
        b->f->C_Finalize(NULL);
        setup_lock_release(b);
        dlclose(b->dl);
        return -1;
    }
    return 0;
}

/* --sync: tell the driver we are ready, then wait for its go (a line or EOF). */
static void sync_with_driver(void)
{
    printf("{\"ready\":true,\"pid\":%ld}\n", (long)getpid());
    fflush(stdout);
    char c;
    for (;;) {
        ssize_t n = read(STDIN_FILENO, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || c == '\n')
            break;
    }
}

/* Undo what main set up, whatever the op. */
static void finish(struct bench *b)
{
    teardown(b);
    echo_stop(b);
    if (b->dl != NULL)
        dlclose(b->dl);
}

int main(int argc, char **argv)
{
    static struct bench b;
    b.lock_fd = -1;
    int pa = parse_args(argc, argv, &b.opt);
    if (pa != 0)
        return pa > 0 ? 0 : 2;

    double t_setup = now_s();
    char err[256] = "";
    if (loads_module(b.opt.op) && load_module(&b) != 0)
        return 1;
    if (b.opt.op == OP_ECHO && echo_start(&b, err, sizeof err) != 0) {
        print_failure(&b.opt, "%s", err);
        finish(&b);
        return 1;
    }

    unsigned nt = b.opt.threads;
    struct worker *ws = calloc(nt, sizeof *ws);
    pthread_t *tids = calloc(nt, sizeof *tids);
    if (ws == NULL || tids == NULL) {
        print_failure(&b.opt, "out of memory");
        free(ws);
        free(tids);
        finish(&b);
        return 1;
    }
    pthread_barrier_init(&b.ready, NULL, nt + 1);
    pthread_barrier_init(&b.go, NULL, nt + 1);
    unsigned started = 0;
    for (unsigned t = 0; t < nt; t++) {
        ws[t].b = &b;
        ws[t].index = t;
        if (b.opt.iterations)
            ws[t].quota = b.opt.iterations / nt + (t < b.opt.iterations % nt ? 1 : 0);
        if (pthread_create(&tids[t], NULL, worker_main, &ws[t]) != 0)
            break;
        started++;
    }
    if (started != nt) {
        /* The started threads wait on a barrier that can no longer fill;
         * returning from main ends them with the process. */
        print_failure(&b.opt, "pthread_create failed after %u threads", started);
        echo_stop(&b);
        return 1;
    }
    pthread_barrier_wait(&b.ready);
    double prepare_s = now_s() - t_setup;
    if (b.opt.sync)
        sync_with_driver();
    double t0 = now_s();
    pthread_barrier_wait(&b.go);
    double t_end = t0;
    for (unsigned t = 0; t < nt; t++) {
        pthread_join(tids[t], NULL);
        if (ws[t].end_time > t_end)
            t_end = ws[t].end_time;
    }
    int status = 0;
    for (unsigned t = 0; t < nt; t++) {
        if (ws[t].setup_failed) {
            snprintf(err, sizeof err, "%s", ws[t].setup_error);
            status = 1;
            break;
        }
    }
    if (status)
        print_failure(&b.opt, "%s", err);
    else
        print_result(&b, ws, t_end - t0, prepare_s);

    pthread_barrier_destroy(&b.ready);
    pthread_barrier_destroy(&b.go);
    free(ws);
    free(tids);
    finish(&b);
    return status;
}
