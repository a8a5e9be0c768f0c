/*
 * The fast path's thread pool (see pool.h).
 *
 * One job waits at a time (`pending`): the submitting leader blocks until a
 * thread is idle (or one more may be started) and no job with the same key
 * is in flight, then hands the job over.  Keys of the jobs in flight sit in
 * a small array (at most one per thread plus the pending one), scanned
 * linearly: there are a handful.
 *
 * Pool threads block every signal: signals are for the worker's main thread,
 * whose blocking recv they must interrupt (Python runs its handlers there).
 */
#define _GNU_SOURCE

#include "pool.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

struct job {
    p11g_job_fn fn;
    void *arg;
    uint64_t key;
};

struct p11g_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;    /* a job is pending, or stop */
    pthread_cond_t changed; /* a job was taken or ended */
    unsigned max, started, idle;
    int stop;
    struct job pending;     /* fn == NULL: none */
    uint64_t keys[P11G_POOL_MAX_THREADS + 1];
    unsigned in_flight;     /* entries used in keys */
    pthread_t threads[P11G_POOL_MAX_THREADS];
};

static int key_busy(const struct p11g_pool *pool, uint64_t key)
{
    for (unsigned i = 0; i < pool->in_flight; i++)
        if (pool->keys[i] == key)
            return 1;
    return 0;
}

static void key_done(struct p11g_pool *pool, uint64_t key)
{
    for (unsigned i = 0; i < pool->in_flight; i++) {
        if (pool->keys[i] == key) {
            pool->keys[i] = pool->keys[--pool->in_flight];
            return;
        }
    }
}

static void *pool_thread(void *arg)
{
    struct p11g_pool *pool = arg;
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (pool->pending.fn == NULL && !pool->stop) {
            pool->idle++;
            pthread_cond_wait(&pool->work, &pool->lock);
            pool->idle--;
        }
        if (pool->pending.fn == NULL)
            break; /* stop, nothing left */
        struct job job = pool->pending;
        pool->pending.fn = NULL;
        pthread_cond_broadcast(&pool->changed);
        pthread_mutex_unlock(&pool->lock);
        job.fn(job.arg);
        pthread_mutex_lock(&pool->lock);
        key_done(pool, job.key);
        pthread_cond_broadcast(&pool->changed);
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

/* Under the lock. */
static int start_thread(struct p11g_pool *pool)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&pool->threads[pool->started], NULL, pool_thread, pool);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0)
        return -1;
    pool->started++;
    return 0;
}

struct p11g_pool *p11g_pool_new(unsigned max_threads)
{
    struct p11g_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL)
        return NULL;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->work, NULL);
    pthread_cond_init(&pool->changed, NULL);
    pool->max = max_threads > P11G_POOL_MAX_THREADS ? P11G_POOL_MAX_THREADS : max_threads;
    return pool;
}

int p11g_pool_submit(struct p11g_pool *pool, uint64_t key, p11g_job_fn fn, void *arg)
{
    int result = 0;
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        if (pool->pending.fn == NULL && !key_busy(pool, key)) {
            if (pool->idle > 0)
                break;
            if (pool->started < pool->max) {
                if (start_thread(pool) != 0 && pool->started == 0) {
                    result = -1; /* no thread at all: the caller runs it */
                    goto out;
                }
                break; /* a started thread (this one or a busy one) takes it */
            }
            if (pool->max == 0) {
                result = -1;
                goto out;
            }
        }
        pthread_cond_wait(&pool->changed, &pool->lock);
    }
    pool->pending = (struct job){fn, arg, key};
    pool->keys[pool->in_flight++] = key;
    pthread_cond_signal(&pool->work);
out:
    pthread_mutex_unlock(&pool->lock);
    return result;
}

void p11g_pool_wait_key(struct p11g_pool *pool, uint64_t key)
{
    pthread_mutex_lock(&pool->lock);
    while (key_busy(pool, key))
        pthread_cond_wait(&pool->changed, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}

void p11g_pool_drain(struct p11g_pool *pool)
{
    pthread_mutex_lock(&pool->lock);
    while (pool->in_flight > 0)
        pthread_cond_wait(&pool->changed, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}

unsigned p11g_pool_in_flight(struct p11g_pool *pool)
{
    pthread_mutex_lock(&pool->lock);
    unsigned n = pool->in_flight;
    pthread_mutex_unlock(&pool->lock);
    return n;
}

void p11g_pool_free(struct p11g_pool *pool)
{
    if (pool == NULL)
        return;
    p11g_pool_drain(pool);
    pthread_mutex_lock(&pool->lock);
    pool->stop = 1;
    pthread_cond_broadcast(&pool->work);
    pthread_mutex_unlock(&pool->lock);
    for (unsigned i = 0; i < pool->started; i++)
        pthread_join(pool->threads[i], NULL);
    pthread_cond_destroy(&pool->changed);
    pthread_cond_destroy(&pool->work);
    pthread_mutex_destroy(&pool->lock);
    free(pool);
}
