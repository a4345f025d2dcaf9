/* xpnet's pool of CPU threads: one set of workers for OpenBLAS's products (through its threads
   callback) and for the split kernels of fused.c. See xpnet/_cpu_threads.py for why. */
#ifndef XPNET_POOL_H
#define XPNET_POOL_H

#include <stddef.h>

/* One part of a task split over the pool: part in 0 .. parts - 1. */
typedef void (*xpnet_part_fn)(void *ctx, int part, int parts);

/* Run fn over ``parts`` parts on the pool (the caller runs part 0), or one after another on this
   thread where the pool cannot take the task. Returns when every part is done. */
void xpnet_pool_run(xpnet_part_fn fn, void *ctx, int parts);

/* Start the workers a task of ``threads`` parts needs; 0 on success. */
int xpnet_pool_reserve(int threads);

/* OpenBLAS's threads callback (openblas_set_threads_callback_function): the jobs of one product. */
typedef void (*xpnet_blas_job)(int thread_num, void *jobdata, int dojob_data);
void xpnet_blas_callback(int sync, xpnet_blas_job job, int numjobs, size_t size, void *data, int job_data);

/* How many products OpenBLAS has handed to xpnet_blas_callback in this process. */
long long xpnet_blas_calls(void);

/* Rows of X (n rows of row_bytes bytes) gathered into out: out[r] = X[clip(index[r])]. */
void xpnet_take_rows(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                     ptrdiff_t row_bytes, int parts);
void xpnet_take_rows_ahead(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                           ptrdiff_t row_bytes);
void xpnet_take_rows_finish(char *out, const char *X, const long long *index, ptrdiff_t rows, ptrdiff_t n,
                            ptrdiff_t row_bytes, int parts);

#endif
