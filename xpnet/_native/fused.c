/* xpnet's compiled kernels for NumPy arrays: the arithmetic of xpnet_kernels.h in C loops, for
   float and double (fused_typed.h, once per type), and the pool they split over (pool.c). Built
   when xpnet is installed, as an optional extension (setup.py); loaded with ctypes by
   xpnet/_fast_numpy.py. Without it, NumPy passes compute the same numbers. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "pool.h"

#ifndef XPNET_SOURCE_HASH
#define XPNET_SOURCE_HASH "unknown"
#endif
/* The digest of the sources this library was built from (setup.py; xpnet/_native/sources.py). */
const char *xpnet_source_hash(void) { return XPNET_SOURCE_HASH; }

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
/* Moments of weights whose gradient is always 0 (MNIST's border pixels) decay through the
   subnormal range, where x86 arithmetic is ~100x slower: Adam flushes them to zero, and puts
   the caller's setting back after its loop. */
#define FLUSH_BEGIN const unsigned int csr_ = _mm_getcsr(); _mm_setcsr(csr_ | 0x8040);
#define FLUSH_END _mm_setcsr(csr_);
#else
#define FLUSH_BEGIN
#define FLUSH_END
#endif

/* The elementwise loops are built for several instruction sets, and the loader picks the best
   one this CPU has (GCC's and Clang's target_clones, an ifunc resolved when the library loads):
   the baseline build (no -march=native) runs on any x86-64, and AVX2 or AVX-512 where the CPU has
   them. Every clone does the same IEEE operations in the same order (no contraction into FMA:
   -ffp-contract=off), so all give the same numbers bit for bit (tests/test_fast_paths.py builds
   the baseline alone, with -DXPNET_NO_CLONES, and compares). */
#if defined(__x86_64__) && defined(__has_attribute) && !defined(XPNET_NO_CLONES)
#if __has_attribute(target_clones)
#define XPNET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef XPNET_CLONES
#define XPNET_CLONES
#endif

/* A part's range of an elementwise kernel over n elements: whole cache lines of 16 elements, so
   that no two threads write the same line. */
#define XPNET_LINE_SPLIT(n, k, parts) (((n) + 15) / 16 * (k) / (parts) * 16)
#define XPNET_LINES_LO(n, part, parts) XPNET_LINE_SPLIT(n, part, parts)
#define XPNET_LINES_HI(n, part, parts) \
    (XPNET_LINE_SPLIT(n, (part) + 1, parts) < (n) ? XPNET_LINE_SPLIT(n, (part) + 1, parts) : (n))

#include "xpnet_kernels.h"

/* Wellons' 'lowbias32' integer hash, the dropout stream's (xpnet/_random.py). */
static inline uint32_t xpnet_lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

#define XPNET_CAT_(a, b) a##b
#define XPNET_CAT(a, b) XPNET_CAT_(a, b)

#define T float
#define SQRT sqrtf
#define EXP expf
#define LOG logf
#define NAME(x) XPNET_CAT(x, _f32)
#define SPLIT(x) XPNET_CAT(NAME(x), _split)
#include "fused_typed.h"

#define T double
#define SQRT sqrt
#define EXP exp
#define LOG log
#define NAME(x) XPNET_CAT(x, _f64)
#define SPLIT(x) XPNET_CAT(NAME(x), _split)
#include "fused_typed.h"
