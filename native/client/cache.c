/* cache.c: local emulation of PKCS#11 output-length queries.
 *
 * The protocol has no length-only call: the server always runs the operation
 * and returns the complete output.  So when the application asks for the length
 * (NULL buffer) or passes a buffer that is too small, the operation has already
 * run once on the token; its output is kept here under (session, procedure,
 * key), where key hashes the input (or, for WrapKey, the mechanism and keys).
 * The application's follow-up call with the same input is answered from here
 * without a second RPC, so single-shot tokens work and nothing runs twice.
 * Entries go away when served, on CloseSession/CloseAllSessions/Finalize/
 * reconnect/fork, and the oldest is evicted beyond MAX_ENTRIES.  Data is wiped
 * when freed (it may be plaintext). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "p11g.h"

#define MAX_ENTRIES 256

struct entry {
    CK_SESSION_HANDLE session;
    unsigned proc;
    unsigned families;
    uint64_t key;
    uint8_t *data;
    size_t len;
    struct entry *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry *head; /* newest first */
static unsigned count;

uint64_t p11g_hash(uint64_t h, const void *p, size_t n)
{
    /* FNV-1a, 64-bit: the key only has to tell apart inputs of one
     * application's query/fetch pair, it is not a security boundary. */
    const uint8_t *b = p;
    if (h == 0)
        h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    h ^= (uint64_t)n;
    h *= 0x100000001b3ull;
    return h;
}

static void entry_free(struct entry *e)
{
    if (e->data != NULL) {
        memset(e->data, 0, e->len);
        __asm__ __volatile__("" : : "r"(e->data) : "memory");
        free(e->data);
    }
    free(e);
}

int p11g_cache_take(CK_SESSION_HANDLE s, unsigned proc, uint64_t key, CK_BYTE_PTR out,
                    CK_ULONG_PTR out_len, CK_RV *rv)
{
    pthread_mutex_lock(&lock);
    struct entry **pp = &head;
    while (*pp != NULL && !((*pp)->session == s && (*pp)->proc == proc && (*pp)->key == key))
        pp = &(*pp)->next;
    struct entry *e = *pp;
    if (e == NULL) {
        pthread_mutex_unlock(&lock);
        return 0;
    }
    if (out == NULL) {
        *out_len = e->len;
        *rv = CKR_OK;
    } else if (*out_len < e->len) {
        *out_len = e->len;
        *rv = CKR_BUFFER_TOO_SMALL;
    } else {
        if (e->len)
            memcpy(out, e->data, e->len);
        *out_len = e->len;
        *rv = CKR_OK;
        *pp = e->next;
        count--;
        entry_free(e);
    }
    pthread_mutex_unlock(&lock);
    return 1;
}

CK_RV p11g_cache_put(CK_SESSION_HANDLE s, unsigned proc, unsigned families, uint64_t key,
                     const uint8_t *data, size_t len)
{
    struct entry *e = calloc(1, sizeof *e);
    if (e == NULL)
        return CKR_HOST_MEMORY;
    e->data = malloc(len ? len : 1);
    if (e->data == NULL) {
        free(e);
        return CKR_HOST_MEMORY;
    }
    if (len)
        memcpy(e->data, data, len);
    e->len = len;
    e->session = s;
    e->proc = proc;
    e->families = families;
    e->key = key;
    pthread_mutex_lock(&lock);
    /* One pending result per (session, procedure): a newer one replaces it. */
    for (struct entry **pp = &head; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->session == s && (*pp)->proc == proc) {
            struct entry *old = *pp;
            *pp = old->next;
            count--;
            entry_free(old);
            break;
        }
    }
    e->next = head;
    head = e;
    if (++count > MAX_ENTRIES) {
        struct entry **pp = &head;
        while ((*pp)->next != NULL)
            pp = &(*pp)->next;
        entry_free(*pp);
        *pp = NULL;
        count--;
    }
    pthread_mutex_unlock(&lock);
    return CKR_OK;
}

int p11g_cache_busy(CK_SESSION_HANDLE s, unsigned families)
{
    int busy = 0;
    pthread_mutex_lock(&lock);
    for (struct entry *e = head; e != NULL && !busy; e = e->next)
        busy = e->session == s && (e->families & families) != 0;
    pthread_mutex_unlock(&lock);
    return busy;
}

void p11g_cache_drop_session(CK_SESSION_HANDLE s)
{
    pthread_mutex_lock(&lock);
    struct entry **pp = &head;
    while (*pp != NULL) {
        if ((*pp)->session == s) {
            struct entry *e = *pp;
            *pp = e->next;
            count--;
            entry_free(e);
        } else {
            pp = &(*pp)->next;
        }
    }
    pthread_mutex_unlock(&lock);
}

static void clear_locked(void)
{
    while (head != NULL) {
        struct entry *e = head;
        head = e->next;
        entry_free(e);
    }
    count = 0;
}

void p11g_cache_clear(void)
{
    pthread_mutex_lock(&lock);
    clear_locked();
    pthread_mutex_unlock(&lock);
}

void p11g_cache_atfork_prepare(void) { pthread_mutex_lock(&lock); }
void p11g_cache_atfork_parent(void) { pthread_mutex_unlock(&lock); }
void p11g_cache_atfork_child(void)
{
    /* The child has none of the parent's sessions. */
    clear_locked();
    pthread_mutex_unlock(&lock);
}
