/*
 * A small pool of threads for the fast path's long calls (see pool.c).
 *
 * The fast path's leader thread reads the socket; while the client keeps
 * several calls in flight, it hands each long call (a signature, a
 * decryption) to a pool thread and goes back to reading, so calls on
 * different sessions run in the module at the same time.  Every job carries a
 * key (the call's session or object handle): a job never starts while another
 * one with the same key runs, so calls on one session keep their order.
 */
#ifndef P11GUARD_POOL_H
#define P11GUARD_POOL_H

#include <stdint.h>

#define P11G_POOL_MAX_THREADS 64

struct p11g_pool;
typedef void (*p11g_job_fn)(void *arg);

/* A pool of at most max_threads threads (started on demand), NULL when out
 * of memory. */
struct p11g_pool *p11g_pool_new(unsigned max_threads);
/* Run fn(arg) on a pool thread, after every job with the same key ended.
 * Blocks while all threads are busy.  -1: no thread could be started (the
 * caller runs the job itself); 0: handed over. */
int p11g_pool_submit(struct p11g_pool *pool, uint64_t key, p11g_job_fn fn, void *arg);
/* Wait until no job with this key runs or waits. */
void p11g_pool_wait_key(struct p11g_pool *pool, uint64_t key);
/* Wait until every job has ended. */
void p11g_pool_drain(struct p11g_pool *pool);
/* Jobs handed over and not ended yet (a snapshot). */
unsigned p11g_pool_in_flight(struct p11g_pool *pool);
/* Drain, stop and join the threads, free the pool (NULL is fine). */
void p11g_pool_free(struct p11g_pool *pool);

#endif
