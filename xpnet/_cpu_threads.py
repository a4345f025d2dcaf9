"""One pool of threads on the CPU for OpenBLAS's products and for the compiled kernels.

Why: OpenBLAS keeps its own worker threads, and after each product they spin for about 0.1 s
waiting for the next one. On a machine with few cores they hold every core but the caller's,
so a kernel of ours split over two threads ran slower than on one (bench/NOTES.md, change 16).
OpenBLAS 0.3.28 and later can hand the jobs of a product to the caller's threads instead
(``openblas_set_threads_callback_function``). xpnet gives it this pool, and splits the gather of
a batch and the Adam step over the same threads. The products are computed as before: OpenBLAS
divides the work into the same jobs; only the threads that run them change.

The hook is process-wide: once the first ``fit`` on NumPy sets it, every OpenBLAS product in the
process runs on this pool (callers take turns). ``XPNET_THREADS=0`` leaves OpenBLAS alone, and
the kernels then run on one thread. Without NumPy's OpenBLAS (another BLAS, an OpenBLAS older
than 0.3.28, or one built on OpenMP rather than its own pthreads) nothing is hooked either.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path

#: The pool, in C, compiled with the kernels (``_fast_numpy``). A worker spins for up to
#: SPIN_NS after a task (a training step posts tasks every few µs to ms), then sleeps.
SOURCE = r"""
#include <pthread.h>
#include <stdatomic.h>
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

typedef void (*xpnet_part_fn)(void *ctx, int part, int parts);

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
            if ((++spins & 255u) == 0 && pool_elapsed_ns(&start) > POOL_SPIN_NS) {
                pthread_mutex_lock(&pool_sleep);
                atomic_fetch_add(&pool_sleepers, 1);
                while (atomic_load(&pool_posted) == seen) pthread_cond_wait(&pool_wake, &pool_sleep);
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

/* A forked child has none of the parent's threads: start afresh (workers are made on demand). */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool_caller, NULL);
    pthread_mutex_init(&pool_sleep, NULL);
    pthread_cond_init(&pool_wake, NULL);
    atomic_store(&pool_sleepers, 0);
    atomic_store(&pool_remaining, 0);
    pool_workers = 0;
    pool_inside = 0;
}

static void pool_serial(xpnet_part_fn fn, void *ctx, int parts) {
    for (int part = 0; part < parts; ++part) fn(ctx, part, parts);
}

/* fn(ctx, part, parts) for every part, at the same time: part 0 here, the others on workers. */
void xpnet_pool_run(xpnet_part_fn fn, void *ctx, int parts) {
    if (parts <= 1 || pool_inside || parts - 1 > POOL_MAX_WORKERS) {
        pool_serial(fn, ctx, parts); /* a task inside a task would wait for itself */
        return;
    }
    pthread_mutex_lock(&pool_caller);
    if (!pool_forks_handled) pool_forks_handled = pthread_atfork(NULL, NULL, pool_after_fork_in_child) == 0;
    pool_start_ticket = atomic_load(&pool_posted);
    while (pool_workers < parts - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, pool_worker, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        ++pool_workers;
    }
    if (pool_workers < parts - 1) {
        pthread_mutex_unlock(&pool_caller);
        pool_serial(fn, ctx, parts);
        return;
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
    while (atomic_load(&pool_remaining) > 0) POOL_PAUSE();
    pthread_mutex_unlock(&pool_caller);
}

/* OpenBLAS's threads callback: run its numjobs jobs of one product at the same time. */
typedef void (*xpnet_blas_job)(int thread_num, void *jobdata, int dojob_data);
struct xpnet_blas_task { xpnet_blas_job job; char *data; size_t size; int job_data; };

static void xpnet_blas_part(void *ctx, int part, int parts) {
    const struct xpnet_blas_task *task = ctx;
    (void)parts;
    task->job(part, task->data + (size_t)part * task->size, task->job_data);
}

void xpnet_blas_callback(int sync, xpnet_blas_job job, int numjobs, size_t size, void *data, int job_data) {
    (void)sync; /* always finished before returning */
    struct xpnet_blas_task task = {job, (char *)data, size, job_data};
    xpnet_pool_run(xpnet_blas_part, &task, numjobs);
}

/* Rows of X gathered into out: out[r] = X[clip(index[r])], split by rows over ``parts`` threads. */
struct xpnet_take_task { char *out; const char *X; const long long *index; ptrdiff_t rows, n, row_bytes; };

static void xpnet_take_part(void *ctx, int part, int parts) {
    const struct xpnet_take_task *t = ctx;
    const ptrdiff_t lo = t->rows * part / parts, hi = t->rows * (part + 1) / parts;
    for (ptrdiff_t r = lo; r < hi; ++r) {
        long long i = t->index[r];
        i = i < 0 ? 0 : (i >= t->n ? t->n - 1 : i);
        memcpy(t->out + r * t->row_bytes, t->X + i * t->row_bytes, (size_t)t->row_bytes);
    }
}

void xpnet_take_rows(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                     ptrdiff_t row_bytes, int parts) {
    struct xpnet_take_task task = {out, X, index, rows, n, row_bytes};
    xpnet_pool_run(xpnet_take_part, &task, parts);
}
"""

#: Where the callback setter may be, by the names OpenBLAS builds export (NumPy's wheels add a
#: scipy_ prefix and a 64_ suffix).
_SETTERS = (
    "scipy_openblas_set_threads_callback_function64_",
    "scipy_openblas_set_threads_callback_function",
    "openblas_set_threads_callback_function64_",
    "openblas_set_threads_callback_function",
)
_PARALLEL = (
    "scipy_openblas_get_parallel64_",
    "scipy_openblas_get_parallel",
    "openblas_get_parallel64_",
    "openblas_get_parallel",
)
_THREAD_COUNTS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


def numpy_openblas(numpy_dir: str) -> ctypes.CDLL | None:
    """NumPy's OpenBLAS, as loaded in this process, or None (another BLAS, or not found).
    ``numpy_dir``: the folder NumPy is installed in (its wheels keep OpenBLAS beside it)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    loaded = sorted({m for m in re.findall(r"(/\S*openblas\S*\.so[\w.]*)", maps)})
    mine = [path for path in loaded if path.startswith(numpy_dir)] or (loaded if len(loaded) == 1 else [])
    if len(mine) != 1:
        return None
    try:
        return ctypes.CDLL(mine[0])
    except OSError:
        return None


@functools.cache
def start(native, numpy_dir: str) -> int:
    """Hand NumPy's OpenBLAS the pool of the compiled library ``native`` (once per process) and
    return how many threads the kernels may be split over: OpenBLAS's thread count when hooked,
    else 1 (XPNET_THREADS=0, another BLAS, an OpenBLAS without the callback, or one core)."""
    if os.environ.get("XPNET_THREADS", "1") == "0":
        return 1
    blas = numpy_openblas(numpy_dir)
    if blas is None:
        return 1
    setter, parallel, count = (
        next((getattr(blas, name) for name in names if hasattr(blas, name)), None)
        for names in (_SETTERS, _PARALLEL, _THREAD_COUNTS)
    )
    if setter is None or parallel is None or count is None:
        return 1
    parallel.restype = ctypes.c_int
    if parallel() != 1:  # 1: OpenBLAS's own pthreads; its OpenMP build is another story
        return 1
    count.restype = ctypes.c_int
    threads = int(count())
    if threads < 2:
        return 1
    setter.argtypes = [ctypes.c_void_p]
    setter.restype = None
    setter(ctypes.cast(native.xpnet_blas_callback, ctypes.c_void_p))
    return threads
