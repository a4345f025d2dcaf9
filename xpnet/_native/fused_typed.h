/* The compiled kernels for one element type, included by fused.c once per type with T, SQRT,
   EXP, LOG, NAME(x) (x with the type's suffix: _f32, _f64) and SPLIT(x) (NAME(x)_split) defined.
   Each kernel has a split version, SPLIT(kernel)(<the same arguments>, int parts), that runs it
   over ``parts`` threads of the pool, each part on its own range (the parts are independent: the
   same results). The file undefines those names at its end, for the next type. */

/* Adam, in place over n elements. Subnormal moments flushed to zero inside the loop (FLUSH). */
XPNET_CLONES void NAME(xpnet_adam)(T *restrict p_, T *restrict m_, T *restrict v_, const T *restrict g_, ptrdiff_t n,
                      T lr_t, T c1, T c2, T eps_t) {
    FLUSH_BEGIN
    for (ptrdiff_t i = 0; i < n; ++i) {
        T p = p_[i], m = m_[i], v = v_[i];
        const T g = g_[i];
        XPNET_ADAM(p, m, v, g, lr_t, c1, c2, eps_t);
        p_[i] = p;
        m_[i] = m;
        v_[i] = v;
    }
    FLUSH_END
}

struct NAME(adam_task) { T *p, *m, *v; const T *g; ptrdiff_t n; T lr_t, c1, c2, eps_t; };

static void NAME(adam_part)(void *ctx, int part, int parts) {
    const struct NAME(adam_task) *t = ctx;
    const ptrdiff_t lo = XPNET_LINES_LO(t->n, part, parts), hi = XPNET_LINES_HI(t->n, part, parts);
    if (lo < hi) NAME(xpnet_adam)(t->p + lo, t->m + lo, t->v + lo, t->g + lo, hi - lo, t->lr_t, t->c1, t->c2, t->eps_t);
}

void SPLIT(xpnet_adam)(T *p, T *m, T *v, const T *g, ptrdiff_t n, T lr_t, T c1, T c2, T eps_t, int parts) {
    struct NAME(adam_task) task = {p, m, v, g, n, lr_t, c1, c2, eps_t};
    xpnet_pool_run(NAME(adam_part), &task, parts);
}

/* ReLU backward over n elements: out = where(a > 0, da, 0). */
XPNET_CLONES void NAME(xpnet_relu_backward)(T *restrict out_, const T *restrict a_, const T *restrict da_, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; ++i) {
        T out;
        const T a = a_[i], da = da_[i];
        XPNET_RELU_BACKWARD(out, a, da);
        out_[i] = out;
    }
}

struct NAME(relu_backward_task) { T *out; const T *a, *da; ptrdiff_t n; };

static void NAME(relu_backward_part)(void *ctx, int part, int parts) {
    const struct NAME(relu_backward_task) *t = ctx;
    const ptrdiff_t lo = XPNET_LINES_LO(t->n, part, parts), hi = XPNET_LINES_HI(t->n, part, parts);
    if (lo < hi) NAME(xpnet_relu_backward)(t->out + lo, t->a + lo, t->da + lo, hi - lo);
}

void SPLIT(xpnet_relu_backward)(T *out, const T *a, const T *da, ptrdiff_t n, int parts) {
    struct NAME(relu_backward_task) task = {out, a, da, n};
    xpnet_pool_run(NAME(relu_backward_part), &task, parts);
}

/* z (B rows of n) += b, then max(z, 0) when relu is set, in place in one pass; b may be NULL. */
XPNET_CLONES void NAME(xpnet_bias_act)(T *restrict z_, const T *restrict b_, ptrdiff_t B, ptrdiff_t n, int relu) {
    for (ptrdiff_t r = 0; r < B; ++r) {
        T *restrict row = z_ + r * n;
        if (b_ && relu)
            for (ptrdiff_t c = 0; c < n; ++c) {
                T z = row[c];
                const T b = b_[c];
                XPNET_BIAS_RELU(z, b);
                row[c] = z;
            }
        else if (b_)
            for (ptrdiff_t c = 0; c < n; ++c) row[c] += b_[c];
        else if (relu)
            for (ptrdiff_t c = 0; c < n; ++c) row[c] = row[c] < (T)0 ? (T)0 : row[c];
    }
}

struct NAME(bias_act_task) { T *z; const T *b; ptrdiff_t B, n; int relu; };

static void NAME(bias_act_part)(void *ctx, int part, int parts) {
    const struct NAME(bias_act_task) *t = ctx;
    const ptrdiff_t lo = t->B * part / parts, hi = t->B * (part + 1) / parts;
    NAME(xpnet_bias_act)(t->z + lo * t->n, t->b, hi - lo, t->n, t->relu);
}

void SPLIT(xpnet_bias_act)(T *z, const T *b, ptrdiff_t B, ptrdiff_t n, int relu, int parts) {
    struct NAME(bias_act_task) task = {z, b, B, n, relu};
    xpnet_pool_run(NAME(bias_act_part), &task, parts);
}

/* Mean softmax cross-entropy of z (B rows of C logits) with labels y (checked by the caller to be
   in 0 .. C - 1); delta = (softmax(z) - onehot(y)) / B. */
static double NAME(xent_row)(const T *restrict row, long long label, T *restrict out, long long C, T inv_b)
    XPNET_SOFTMAX_XENT_ROW_BODY

static double NAME(xent_rows)(const T *restrict z, const long long *restrict y, T *restrict delta, ptrdiff_t rows,
                              ptrdiff_t C, T inv_b) {
    double total = 0;
    for (ptrdiff_t b = 0; b < rows; ++b) total += NAME(xent_row)(z + b * C, y[b], delta + b * C, C, inv_b);
    return total;
}

double NAME(xpnet_softmax_xent)(const T *restrict z, const long long *restrict y, T *restrict delta, ptrdiff_t B,
                                ptrdiff_t C) {
    return NAME(xent_rows)(z, y, delta, B, C, (T)1 / (T)B) / (double)B;
}

/* The rows over the pool: each part writes its rows' losses, added up here in row order, as the
   one-thread kernel adds them (the same loss, bit for bit). */
struct NAME(xent_task) { const T *z; const long long *y; T *delta; double *losses; ptrdiff_t B, C; };

static void NAME(xent_part)(void *ctx, int part, int parts) {
    const struct NAME(xent_task) *t = ctx;
    const ptrdiff_t lo = t->B * part / parts, hi = t->B * (part + 1) / parts;
    const T inv_b = (T)1 / (T)t->B;
    for (ptrdiff_t b = lo; b < hi; ++b)
        t->losses[b] = NAME(xent_row)(t->z + b * t->C, t->y[b], t->delta + b * t->C, t->C, inv_b);
}

double SPLIT(xpnet_softmax_xent)(const T *z, const long long *y, T *delta, ptrdiff_t B, ptrdiff_t C, int parts) {
    double *losses = malloc((size_t)B * sizeof(double));
    if (!losses) return NAME(xpnet_softmax_xent)(z, y, delta, B, C);
    struct NAME(xent_task) task = {z, y, delta, losses, B, C};
    xpnet_pool_run(NAME(xent_part), &task, parts);
    double total = 0;
    for (ptrdiff_t b = 0; b < B; ++b) total += losses[b];
    free(losses);
    return total / (double)B;
}

/* How many rows of z (B rows of C logits) have their argmax at the label y. */
static int NAME(argmax_is)(const T *restrict row, long long label, long long C) XPNET_ARGMAX_ROW_IS_BODY

long long NAME(xpnet_count_correct)(const T *restrict z, const long long *restrict y, ptrdiff_t B, ptrdiff_t C) {
    long long correct = 0;
    for (ptrdiff_t b = 0; b < B; ++b) correct += NAME(argmax_is)(z + b * C, y[b], C);
    return correct;
}

/* Inverted dropout over n elements: u = the dropout stream's number of element i (xpnet/_random.py:
   (lowbias32(lowbias32(i·φ ^ key) ^ k1) >> 8) · 2⁻²⁴, in T as the reference computes it),
   mask = u ≥ rate ? scale : 0, y = x · mask. Element i of the whole array is ``first`` + i. */
XPNET_CLONES static void NAME(dropout_range)(T *restrict y_, T *restrict mask_, const T *restrict x_, ptrdiff_t first,
                                             ptrdiff_t n, uint32_t key, uint32_t k1, T rate, T scale) {
    for (ptrdiff_t i = 0; i < n; ++i) {
        const uint32_t bits = xpnet_lowbias32(xpnet_lowbias32((uint32_t)(first + i) * 0x9E3779B9u ^ key) ^ k1);
        const T u = (T)(bits >> 8) * (T)(1.0 / 16777216.0);
        const T mask = u >= rate ? scale : (T)0;
        mask_[i] = mask;
        y_[i] = x_[i] * mask;
    }
}

struct NAME(dropout_task) { T *y, *mask; const T *x; ptrdiff_t first, n; uint32_t key, k1; T rate, scale; };

static void NAME(dropout_part)(void *ctx, int part, int parts) {
    const struct NAME(dropout_task) *t = ctx;
    const ptrdiff_t lo = XPNET_LINES_LO(t->n, part, parts), hi = XPNET_LINES_HI(t->n, part, parts);
    if (lo < hi)
        NAME(dropout_range)(t->y + lo, t->mask + lo, t->x + lo, t->first + lo, hi - lo, t->key, t->k1, t->rate, t->scale);
}

/* ``first``: the number of x's first element in the draw (a rank's rows of a global batch start
   past the rows of the ranks before it). */
void NAME(xpnet_dropout)(T *y, T *mask, const T *x, ptrdiff_t first, ptrdiff_t n, uint32_t key, uint32_t k1, T rate,
                         T scale, int parts) {
    struct NAME(dropout_task) task = {y, mask, x, first, n, key, k1, rate, scale};
    xpnet_pool_run(NAME(dropout_part), &task, parts);
}

/* Convolution's columns and max pooling. */
#include "images_typed.h"

#undef T
#undef SQRT
#undef EXP
#undef LOG
#undef NAME
#undef SPLIT
