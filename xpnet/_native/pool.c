/* xpnet's pool of CPU threads (pool.h). A worker spins for up to POOL_SPIN_NS after a task (a
   training step posts tasks every few microseconds to milliseconds), then sleeps. */
#define _GNU_SOURCE
#include "pool.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define POOL_PAUSE() _mm_pause()
#else
#define POOL_PAUSE() ((void)0)
#endif

#define POOL_MAX_WORKERS 255
#define POOL_SPIN_NS 200000L

static pthread_mutex_t pool_caller = PTHREAD_MUTEX_INITIALIZER; /* one task at a time */
static pthread_mutex_t pool_sleep = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static atomic_long pool_posted;   /* task number: workers wait for it to change */
static atomic_int pool_sleepers;  /* workers asleep on pool_wake */
static atomic_int pool_remaining; /* workers still busy with the current task */
static int pool_workers;          /* workers started (changed only under pool_caller) */
static xpnet_part_fn pool_fn;
static void *pool_ctx;
static int pool_parts;
static _Thread_local int pool_inside; /* this thread is a worker, or is running a task */
static int pool_forks_handled;
static long pool_start_ticket; /* the task number a new worker waits to see change */

static long pool_elapsed_ns(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000000000L + (now.tv_nsec - start->tv_nsec);
}

/* One round of a caller's wait: spin, and after POOL_SPIN_NS give the core up between checks
   (a worker whose core was taken away must get it back). */
static void pool_wait_round(unsigned *spins, const struct timespec *start) {
    if ((++*spins & 255u) == 0 && pool_elapsed_ns(start) > POOL_SPIN_NS) sched_yield();
    else POOL_PAUSE();
}

/* Rows of X gathered into out: out[r] = X[clip(index[r])]. */
struct xpnet_take_task { char *out; const char *X; const long long *index; ptrdiff_t rows, n, row_bytes; };

static void take_range(const struct xpnet_take_task *t, ptrdiff_t lo, ptrdiff_t hi) {
    for (ptrdiff_t r = lo; r < hi; ++r) {
        long long i = t->index[r];
        i = i < 0 ? 0 : (i >= t->n ? t->n - 1 : i);
        if (t->row_bytes == 8) memcpy(t->out + r * 8, t->X + i * 8, 8); /* labels: inlined */
        else memcpy(t->out + r * t->row_bytes, t->X + i * t->row_bytes, (size_t)t->row_bytes);
    }
}

/* A gather run ahead: the rows of the next batch, copied by workers in the time they would spend
   waiting (while the caller runs Python and one-thread work), AHEAD_ROWS rows at a claim, so a
   task posted meanwhile waits for one short copy at most. The caller completes it before it
   reads the rows (xpnet_take_rows_finish). One at a time: callers hold ahead_owner to start,
   complete or retire one; workers only claim chunks (under ahead_lock) and count them done. */
#define AHEAD_ROWS 8
static pthread_mutex_t ahead_owner = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t ahead_lock = PTHREAD_MUTEX_INITIALIZER;
static struct xpnet_take_task ahead_task; /* set under both locks */
static long ahead_next, ahead_chunks;     /* under ahead_lock */
static atomic_long ahead_done;            /* chunks copied */
static atomic_int ahead_pending;          /* chunks are left to claim */

/* Claim a chunk of the gather ahead and copy it; 0 when none was left. */
static int ahead_help(void) {
    pthread_mutex_lock(&ahead_lock);
    const long chunk = ahead_next < ahead_chunks ? ahead_next++ : -1;
    const struct xpnet_take_task task = ahead_task;
    if (ahead_next >= ahead_chunks) atomic_store(&ahead_pending, 0);
    pthread_mutex_unlock(&ahead_lock);
    if (chunk < 0) return 0;
    const ptrdiff_t lo = chunk * AHEAD_ROWS, hi = lo + AHEAD_ROWS < task.rows ? lo + AHEAD_ROWS : task.rows;
    take_range(&task, lo, hi);
    atomic_fetch_add(&ahead_done, 1);
    return 1;
}

/* (ahead_owner held) Copy here what is left of the gather ahead, wait for the chunks workers are
   copying, and retire it; returns whether it was a gather of these arguments. */
static int ahead_complete(const struct xpnet_take_task *wanted) {
    while (ahead_help()) {
    }
    const long chunks = ahead_chunks; /* only owners change it */
    const struct xpnet_take_task t = ahead_task;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned spins = 0;
    while (atomic_load(&ahead_done) < chunks) pool_wait_round(&spins, &start);
    pthread_mutex_lock(&ahead_lock);
    ahead_next = ahead_chunks = 0;
    pthread_mutex_unlock(&ahead_lock);
    return chunks > 0 && wanted && t.out == wanted->out && t.X == wanted->X && t.index == wanted->index &&
           t.rows == wanted->rows && t.n == wanted->n && t.row_bytes == wanted->row_bytes;
}

static void *pool_worker(void *arg) {
    const int part = (int)(intptr_t)arg; /* 1 .. workers; the caller runs part 0 */
    /* not pool_posted: the first task may be posted before this thread first runs */
    long seen = pool_start_ticket;
    pool_inside = 1;
    for (;;) {
        struct timespec start;
        clock_gettime(CLOCK_MONOTONIC, &start);
        unsigned spins = 0;
        while (atomic_load(&pool_posted) == seen) {
            if (atomic_load(&ahead_pending) && ahead_help()) { /* idle: copy rows of the next batch */
                clock_gettime(CLOCK_MONOTONIC, &start);
                continue;
            }
            if ((++spins & 255u) == 0 && pool_elapsed_ns(&start) > POOL_SPIN_NS) {
                pthread_mutex_lock(&pool_sleep);
                atomic_fetch_add(&pool_sleepers, 1);
                while (atomic_load(&pool_posted) == seen && !atomic_load(&ahead_pending))
                    pthread_cond_wait(&pool_wake, &pool_sleep);
                atomic_fetch_sub(&pool_sleepers, 1);
                pthread_mutex_unlock(&pool_sleep);
            } else {
                POOL_PAUSE();
            }
        }
        seen = atomic_load(&pool_posted);
        if (part < pool_parts) pool_fn(pool_ctx, part, pool_parts);
        atomic_fetch_sub(&pool_remaining, 1);
    }
    return NULL;
}

/* Fork: the prepare step waits for a task in progress to end (OpenBLAS's own fork handler,
   registered earlier and so run after this one, frees the buffers a product uses); the forked
   child has none of the parent's threads and starts afresh, making workers on demand. */
static void pool_before_fork(void) { pthread_mutex_lock(&pool_caller); }
static void pool_after_fork_in_parent(void) { pthread_mutex_unlock(&pool_caller); }
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool_caller, NULL);
    pthread_mutex_init(&pool_sleep, NULL);
    pthread_cond_init(&pool_wake, NULL);
    atomic_store(&pool_sleepers, 0);
    atomic_store(&pool_remaining, 0);
    pthread_mutex_init(&ahead_owner, NULL);
    pthread_mutex_init(&ahead_lock, NULL);
    ahead_next = ahead_chunks = 0;
    atomic_store(&ahead_done, 0);
    atomic_store(&ahead_pending, 0);
    pool_workers = 0;
    pool_inside = 0;
}

/* Start workers until there are ``wanted`` (caller holds pool_caller); returns how many there are. */
static int pool_grow(int wanted) {
    if (!pool_forks_handled)
        pool_forks_handled =
            pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child) == 0;
    pool_start_ticket = atomic_load(&pool_posted);
    while (pool_workers < wanted && pool_workers < POOL_MAX_WORKERS) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, pool_worker, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        ++pool_workers;
    }
    return pool_workers;
}

/* The workers one product of ``threads`` threads needs, made before OpenBLAS is handed the pool:
   returns 0 when they all exist (and the fork handlers are in place). */
int xpnet_pool_reserve(int threads) {
    if (pool_inside) return -1;
    pthread_mutex_lock(&pool_caller);
    const int ready = pool_grow(threads - 1) >= threads - 1 && pool_forks_handled;
    pthread_mutex_unlock(&pool_caller);
    return ready ? 0 : -1;
}

/* fn(ctx, part, parts) for every part at the same time: part 0 here, the others on workers.
   Returns -1, having run nothing, where that cannot be had (a task inside a task would wait for
   itself; or no more threads could be made). */
static int pool_try_run(xpnet_part_fn fn, void *ctx, int parts) {
    if (pool_inside || parts - 1 > POOL_MAX_WORKERS) return -1;
    pthread_mutex_lock(&pool_caller);
    if (pool_grow(parts - 1) < parts - 1) {
        pthread_mutex_unlock(&pool_caller);
        return -1;
    }
    pool_fn = fn;
    pool_ctx = ctx;
    pool_parts = parts;
    atomic_store(&pool_remaining, pool_workers);
    atomic_fetch_add(&pool_posted, 1);
    if (atomic_load(&pool_sleepers) > 0) {
        pthread_mutex_lock(&pool_sleep);
        pthread_cond_broadcast(&pool_wake);
        pthread_mutex_unlock(&pool_sleep);
    }
    pool_inside = 1;
    fn(ctx, 0, parts);
    pool_inside = 0;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned spins = 0;
    while (atomic_load(&pool_remaining) > 0) pool_wait_round(&spins, &start);
    pthread_mutex_unlock(&pool_caller);
    return 0;
}

/* xpnet's own kernels: their parts are independent, so one after another is a correct fallback. */
void xpnet_pool_run(xpnet_part_fn fn, void *ctx, int parts) {
    if (parts <= 1 || pool_try_run(fn, ctx, parts) != 0)
        for (int part = 0; part < parts; ++part) fn(ctx, part, parts);
}

/* OpenBLAS's threads callback: the numjobs jobs of one product. They wait on each other's
   flags, so they must run at the same time: on the pool, or else on threads made for this call. */
struct xpnet_blas_task { xpnet_blas_job job; char *data; size_t size; int job_data; };
struct xpnet_blas_one { const struct xpnet_blas_task *task; int part; };

static void xpnet_blas_part(void *ctx, int part, int parts) {
    const struct xpnet_blas_task *task = ctx;
    (void)parts;
    task->job(part, task->data + (size_t)part * task->size, task->job_data);
}

static void *xpnet_blas_thread(void *arg) {
    const struct xpnet_blas_one *one = arg;
    xpnet_blas_part((void *)one->task, one->part, 0);
    return NULL;
}

static atomic_llong blas_calls;

long long xpnet_blas_calls(void) { return atomic_load(&blas_calls); }

void xpnet_blas_callback(int sync, xpnet_blas_job job, int numjobs, size_t size, void *data, int job_data) {
    (void)sync; /* always finished before returning */
    atomic_fetch_add(&blas_calls, 1);
    struct xpnet_blas_task task = {job, (char *)data, size, job_data};
    if (numjobs <= 1) {
        if (numjobs == 1) xpnet_blas_part(&task, 0, 1);
        return;
    }
    if (pool_try_run(xpnet_blas_part, &task, numjobs) == 0) return;
    pthread_t threads[POOL_MAX_WORKERS];
    struct xpnet_blas_one ones[POOL_MAX_WORKERS];
    int made = 0;
    for (int part = 1; part < numjobs && made < POOL_MAX_WORKERS; ++part, ++made) {
        ones[made] = (struct xpnet_blas_one){&task, part};
        if (pthread_create(&threads[made], NULL, xpnet_blas_thread, &ones[made])) break;
    }
    if (made < numjobs - 1) {
        fprintf(stderr, "xpnet: could not start threads for an OpenBLAS product (%d of %d); "
                        "set XPNET_THREADS=0 to leave OpenBLAS its own threads\n", made, numjobs - 1);
        abort();
    }
    xpnet_blas_part(&task, 0, numjobs);
    for (int i = 0; i < made; ++i) pthread_join(threads[i], NULL);
}

/* Rows of X gathered into out now, split by rows over ``parts`` threads. */
static void xpnet_take_part(void *ctx, int part, int parts) {
    const struct xpnet_take_task *t = ctx;
    take_range(t, t->rows * part / parts, t->rows * (part + 1) / parts);
}

void xpnet_take_rows(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                     ptrdiff_t row_bytes, int parts) {
    struct xpnet_take_task task = {out, X, index, rows, n, row_bytes};
    xpnet_pool_run(xpnet_take_part, &task, parts);
}

/* Start the gather ahead, after completing one still running (rows = 0: only that). The caller
   must not touch ``out``, nor free X, index or out, until a finish (or another start) returns. */
void xpnet_take_rows_ahead(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                           ptrdiff_t row_bytes) {
    pthread_mutex_lock(&ahead_owner);
    ahead_complete(NULL);
    if (rows > 0) {
        pthread_mutex_lock(&ahead_lock);
        ahead_task = (struct xpnet_take_task){out, X, index, rows, n, row_bytes};
        ahead_next = 0;
        ahead_chunks = (rows + AHEAD_ROWS - 1) / AHEAD_ROWS;
        atomic_store(&ahead_done, 0);
        atomic_store(&ahead_pending, 1);
        pthread_mutex_unlock(&ahead_lock);
    }
    pthread_mutex_unlock(&ahead_owner);
    if (rows > 0 && atomic_load(&pool_sleepers) > 0) { /* sleeping workers: rows to copy */
        pthread_mutex_lock(&pool_sleep);
        pthread_cond_broadcast(&pool_wake);
        pthread_mutex_unlock(&pool_sleep);
    }
}

/* The gather of these arguments, complete on return: the one run ahead, finished here, or else
   (after completing whatever gather ran ahead) copied now over ``parts`` threads. */
void xpnet_take_rows_finish(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                            ptrdiff_t row_bytes, int parts) {
    const struct xpnet_take_task wanted = {out, X, index, rows, n, row_bytes};
    pthread_mutex_lock(&ahead_owner);
    const int done = ahead_complete(&wanted);
    pthread_mutex_unlock(&ahead_owner);
    if (!done) xpnet_take_rows(out, X, index, rows, n, row_bytes, parts);
}
