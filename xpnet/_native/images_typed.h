/* The compiled kernels of convolution and max pooling on NCHW images, for one element type:
   included by fused_typed.h (so once per type, with T and NAME defined there). The products
   themselves are NumPy's (OpenBLAS); these move the images into and out of the columns the
   products take, and pool.

   The columns of b images x (b, C, H, W) for a k × k kernel at stride s and padding p form one
   matrix cols (C·k·k rows, b·H'·W' columns): row c·k·k + u·k + v, column n·H'·W' + i·W' + j holds
   x[n, c, i·s + u − p, j·s + v − p], or 0 where that falls in the padding. One product
   W₂ (O, C·k·k) · cols then gives every output of the b images, as (O, b·H'·W'). */

struct NAME(im_task) {
    T *out;
    const T *in;
    const T *bias;
    T *sums;
    ptrdiff_t b, C, H, W, k, s, p, Ho, Wo;
};

/* The output positions j in [lo, hi) whose input column j·s + v − p lies in 0 .. W − 1. */
static void NAME(valid_range)(ptrdiff_t v, ptrdiff_t s, ptrdiff_t p, ptrdiff_t W, ptrdiff_t Wo, ptrdiff_t *lo,
                              ptrdiff_t *hi) {
    ptrdiff_t first = p > v ? (p - v + s - 1) / s : 0;
    ptrdiff_t last = W + p - v > 0 ? (W + p - v - 1) / s + 1 : 0; /* one past the last valid j */
    *lo = first < Wo ? first : Wo;
    *hi = last < Wo ? last : Wo;
    if (*hi < *lo) *hi = *lo;
}

/* Rows [lo, hi) of the columns. */
static void NAME(im2col_rows)(const struct NAME(im_task) *t, ptrdiff_t lo, ptrdiff_t hi) {
    const ptrdiff_t kk = t->k * t->k, plane = t->Ho * t->Wo, ld = t->b * plane;
    for (ptrdiff_t r = lo; r < hi; ++r) {
        const ptrdiff_t c = r / kk, u = (r % kk) / t->k, v = r % t->k;
        ptrdiff_t jlo, jhi;
        NAME(valid_range)(v, t->s, t->p, t->W, t->Wo, &jlo, &jhi);
        for (ptrdiff_t n = 0; n < t->b; ++n) {
            const T *image = t->in + (n * t->C + c) * t->H * t->W;
            T *dst = t->out + r * ld + n * plane;
            for (ptrdiff_t i = 0; i < t->Ho; ++i, dst += t->Wo) {
                const ptrdiff_t y = i * t->s + u - t->p;
                if (y < 0 || y >= t->H) {
                    for (ptrdiff_t j = 0; j < t->Wo; ++j) dst[j] = (T)0;
                    continue;
                }
                const ptrdiff_t base = y * t->W + v - t->p; /* + j·s: the input column of j */
                for (ptrdiff_t j = 0; j < jlo; ++j) dst[j] = (T)0;
                if (t->s == 1)
                    for (ptrdiff_t j = jlo; j < jhi; ++j) dst[j] = image[base + j];
                else
                    for (ptrdiff_t j = jlo; j < jhi; ++j) dst[j] = image[base + j * t->s];
                for (ptrdiff_t j = jhi; j < t->Wo; ++j) dst[j] = (T)0;
            }
        }
    }
}

static void NAME(im2col_part)(void *ctx, int part, int parts) {
    const struct NAME(im_task) *t = ctx;
    const ptrdiff_t rows = t->C * t->k * t->k;
    NAME(im2col_rows)(t, rows * part / parts, rows * (part + 1) / parts);
}

/* cols (C·k·k, b·H'·W') from x (b, C, H, W), over ``parts`` threads (rows split among them). */
void NAME(xpnet_im2col)(T *cols, const T *x, ptrdiff_t b, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W, ptrdiff_t k,
                        ptrdiff_t s, ptrdiff_t p, ptrdiff_t Ho, ptrdiff_t Wo, int parts) {
    struct NAME(im_task) task = {cols, x, NULL, NULL, b, C, H, W, k, s, p, Ho, Wo};
    xpnet_pool_run(NAME(im2col_part), &task, parts);
}

/* The adjoint of im2col on planes [lo, hi) of dx (b·C planes of H × W): each plane set to 0,
   then every column entry that was read from it added back, offset (u, v) after offset, as the
   reference's strided-slice sums do (the same order of additions at every position). */
static void NAME(col2im_planes)(const struct NAME(im_task) *t, ptrdiff_t lo, ptrdiff_t hi) {
    const ptrdiff_t kk = t->k * t->k, plane = t->Ho * t->Wo, ld = t->b * plane;
    for (ptrdiff_t q = lo; q < hi; ++q) {
        const ptrdiff_t n = q / t->C, c = q % t->C;
        T *image = t->out + q * t->H * t->W;
        for (ptrdiff_t e = 0; e < t->H * t->W; ++e) image[e] = (T)0;
        for (ptrdiff_t u = 0; u < t->k; ++u)
            for (ptrdiff_t v = 0; v < t->k; ++v) {
                ptrdiff_t jlo, jhi;
                NAME(valid_range)(v, t->s, t->p, t->W, t->Wo, &jlo, &jhi);
                const T *src = t->in + (c * kk + u * t->k + v) * ld + n * plane;
                for (ptrdiff_t i = 0; i < t->Ho; ++i, src += t->Wo) {
                    const ptrdiff_t y = i * t->s + u - t->p;
                    if (y < 0 || y >= t->H) continue;
                    const ptrdiff_t base = y * t->W + v - t->p;
                    if (t->s == 1)
                        for (ptrdiff_t j = jlo; j < jhi; ++j) image[base + j] += src[j];
                    else
                        for (ptrdiff_t j = jlo; j < jhi; ++j) image[base + j * t->s] += src[j];
                }
            }
    }
}

static void NAME(col2im_part)(void *ctx, int part, int parts) {
    const struct NAME(im_task) *t = ctx;
    const ptrdiff_t planes = t->b * t->C;
    NAME(col2im_planes)(t, planes * part / parts, planes * (part + 1) / parts);
}

/* dx (b, C, H, W) from the columns' gradient (C·k·k, b·H'·W'), over ``parts`` threads (planes
   split among them: no two write the same plane). */
void NAME(xpnet_col2im)(T *dx, const T *cols, ptrdiff_t b, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W, ptrdiff_t k,
                        ptrdiff_t s, ptrdiff_t p, ptrdiff_t Ho, ptrdiff_t Wo, int parts) {
    struct NAME(im_task) task = {dx, cols, NULL, NULL, b, C, H, W, k, s, p, Ho, Wo};
    xpnet_pool_run(NAME(col2im_part), &task, parts);
}

/* The product's (O, b·P) result as images: y[n, o, :] = Y[o, n·P : (n + 1)·P] + bias[o], then
   max(·, 0) where relu is set (k holds it), for the (n, o) rows of part ``part``; here C is O,
   and Ho·Wo is P. */
static void NAME(from_columns_part)(void *ctx, int part, int parts) {
    const struct NAME(im_task) *t = ctx;
    const ptrdiff_t rows = t->b * t->C, P = t->Ho * t->Wo;
    for (ptrdiff_t q = rows * part / parts; q < rows * (part + 1) / parts; ++q) {
        const ptrdiff_t n = q / t->C, o = q % t->C;
        const T *src = t->in + (o * t->b + n) * P;
        T *dst = t->out + q * P;
        const T bias = t->bias ? t->bias[o] : (T)0;
        if (t->bias && t->k)
            for (ptrdiff_t e = 0; e < P; ++e) {
                T z = src[e];
                XPNET_BIAS_RELU(z, bias);
                dst[e] = z;
            }
        else if (t->bias)
            for (ptrdiff_t e = 0; e < P; ++e) dst[e] = src[e] + bias;
        else if (t->k)
            for (ptrdiff_t e = 0; e < P; ++e) dst[e] = src[e] < (T)0 ? (T)0 : src[e];
        else
            for (ptrdiff_t e = 0; e < P; ++e) dst[e] = src[e];
    }
}

/* y (b, O, P) = Y (O, b·P) rearranged, plus bias (O,) when it is not NULL, then max(y, 0) when
   relu is not 0. */
void NAME(xpnet_from_columns)(T *y, const T *Y, const T *bias, ptrdiff_t b, ptrdiff_t O, ptrdiff_t P, int relu,
                              int parts) {
    struct NAME(im_task) task = {y, Y, bias, NULL, b, O, 0, 0, relu != 0, 0, 0, P, 1};
    xpnet_pool_run(NAME(from_columns_part), &task, parts);
}

/* The reverse, for the rows o of part ``part``: D[o, n·P : (n + 1)·P] = dy[n, o, :], and (when
   sums is not NULL) sums[o] += the sum of those values, added in order in double precision. */
static void NAME(to_columns_part)(void *ctx, int part, int parts) {
    const struct NAME(im_task) *t = ctx;
    const ptrdiff_t P = t->Ho * t->Wo;
    for (ptrdiff_t o = t->C * part / parts; o < t->C * (part + 1) / parts; ++o) {
        double total = 0;
        for (ptrdiff_t n = 0; n < t->b; ++n) {
            const T *src = t->in + (n * t->C + o) * P;
            T *dst = t->out + (o * t->b + n) * P;
            for (ptrdiff_t e = 0; e < P; ++e) {
                dst[e] = src[e];
                total += (double)src[e];
            }
        }
        if (t->sums) t->sums[o] += (T)total;
    }
}

/* D (O, b·P) = dy (b, O, P) rearranged; sums (O,) += Σ_{n,e} dy[n, o, e] unless sums is NULL. */
void NAME(xpnet_to_columns)(T *D, T *sums, const T *dy, ptrdiff_t b, ptrdiff_t O, ptrdiff_t P, int parts) {
    struct NAME(im_task) task = {D, dy, NULL, sums, b, O, 0, 0, 0, 0, 0, P, 1};
    xpnet_pool_run(NAME(to_columns_part), &task, parts);
}

/* Max pooling of planes [lo, hi) (each H × W, windows size × size at stride s, Ho × Wo of them):
   y the maximum of each window and winner its offset u·size + v in the window. The first
   maximum in row-major order wins; a NaN makes the maximum NaN and keeps the winner found before
   it, as the reference's running comparisons (view > best, then maximum) do. */
/* One step of the running maximum: value at window offset ``at`` against best and found. An
   equal value takes best's place without winning (NumPy's maximum returns its second argument
   on a tie, which shows only in the sign of a zero: max(-0.0, +0.0) is +0.0, as the reference's). */
#define XPNET_POOL_STEP(value_, at)                   \
    do {                                              \
        const T value = (value_);                     \
        if (value > best) {                           \
            best = value;                             \
            found = (at);                             \
        } else if (value != value || value == best)   \
            best = value;                             \
    } while (0)

static void NAME(max_pool_planes)(const struct NAME(im_task) *t, int *winner, ptrdiff_t lo, ptrdiff_t hi) {
    const ptrdiff_t size = t->k, P = t->Ho * t->Wo;
    if (size == 2 && t->s == 2) { /* the usual 2 × 2 windows side by side, unrolled */
        for (ptrdiff_t q = lo; q < hi; ++q) {
            const T *image = t->in + q * t->H * t->W;
            T *y = t->out + q * P;
            int *w = winner + q * P;
            for (ptrdiff_t i = 0; i < t->Ho; ++i) {
                const T *top = image + 2 * i * t->W, *bottom = top + t->W;
                for (ptrdiff_t j = 0; j < t->Wo; ++j) {
                    T best = top[2 * j];
                    int found = 0;
                    XPNET_POOL_STEP(top[2 * j + 1], 1);
                    XPNET_POOL_STEP(bottom[2 * j], 2);
                    XPNET_POOL_STEP(bottom[2 * j + 1], 3);
                    y[i * t->Wo + j] = best;
                    w[i * t->Wo + j] = found;
                }
            }
        }
        return;
    }
    for (ptrdiff_t q = lo; q < hi; ++q) {
        const T *image = t->in + q * t->H * t->W;
        T *y = t->out + q * P;
        int *w = winner + q * P;
        for (ptrdiff_t i = 0; i < t->Ho; ++i)
            for (ptrdiff_t j = 0; j < t->Wo; ++j) {
                const T *corner = image + i * t->s * t->W + j * t->s;
                T best = corner[0];
                int found = 0;
                for (ptrdiff_t u = 0; u < size; ++u)
                    for (ptrdiff_t v = (u == 0); v < size; ++v) XPNET_POOL_STEP(corner[u * t->W + v], (int)(u * size + v));
                y[i * t->Wo + j] = best;
                w[i * t->Wo + j] = found;
            }
    }
}

struct NAME(pool_task) {
    struct NAME(im_task) im;
    int *winner;
    const int *winner_in;
};

static void NAME(max_pool_part)(void *ctx, int part, int parts) {
    const struct NAME(pool_task) *t = ctx;
    const ptrdiff_t planes = t->im.b;
    NAME(max_pool_planes)(&t->im, t->winner, planes * part / parts, planes * (part + 1) / parts);
}

/* y, winner (planes, Ho, Wo) from x (planes, H, W). */
void NAME(xpnet_max_pool)(T *y, int *winner, const T *x, ptrdiff_t planes, ptrdiff_t H, ptrdiff_t W, ptrdiff_t size,
                          ptrdiff_t s, ptrdiff_t Ho, ptrdiff_t Wo, int parts) {
    struct NAME(pool_task) task = {{y, x, NULL, NULL, planes, 1, H, W, size, s, 0, Ho, Wo}, winner, NULL};
    xpnet_pool_run(NAME(max_pool_part), &task, parts);
}

/* dx of planes [lo, hi): 0, then each δ added at its window's winner, offset after offset (the
   reference's order of additions where windows overlap). */
static void NAME(max_pool_backward_part)(void *ctx, int part, int parts) {
    const struct NAME(pool_task) *t = ctx;
    const struct NAME(im_task) *m = &t->im;
    const ptrdiff_t size = m->k, P = m->Ho * m->Wo;
    for (ptrdiff_t q = m->b * part / parts; q < m->b * (part + 1) / parts; ++q) {
        T *image = m->out + q * m->H * m->W;
        const T *dy = m->in + q * P;
        const int *w = t->winner_in + q * P;
        for (ptrdiff_t e = 0; e < m->H * m->W; ++e) image[e] = (T)0;
        if (m->s >= size) { /* no two windows share a position: each δ goes straight to its winner */
            for (ptrdiff_t i = 0; i < m->Ho; ++i)
                for (ptrdiff_t j = 0; j < m->Wo; ++j) {
                    const int at = w[i * m->Wo + j];
                    if (at >= 0 && at < size * size)
                        image[(i * m->s + at / size) * m->W + j * m->s + at % size] = dy[i * m->Wo + j];
                }
            continue;
        }
        for (ptrdiff_t offset = 0; offset < size * size; ++offset) {
            const ptrdiff_t u = offset / size, v = offset % size;
            for (ptrdiff_t i = 0; i < m->Ho; ++i)
                for (ptrdiff_t j = 0; j < m->Wo; ++j)
                    if (w[i * m->Wo + j] == offset) image[(i * m->s + u) * m->W + j * m->s + v] += dy[i * m->Wo + j];
        }
    }
}

#undef XPNET_POOL_STEP

/* dx (planes, H, W) from dy and winner (planes, Ho, Wo). */
void NAME(xpnet_max_pool_backward)(T *dx, const T *dy, const int *winner, ptrdiff_t planes, ptrdiff_t H, ptrdiff_t W,
                                   ptrdiff_t size, ptrdiff_t s, ptrdiff_t Ho, ptrdiff_t Wo, int parts) {
    struct NAME(pool_task) task = {{dx, dy, NULL, NULL, planes, 1, H, W, size, s, 0, Ho, Wo}, NULL, winner};
    xpnet_pool_run(NAME(max_pool_backward_part), &task, parts);
}

/* Batch normalization of x viewed as (B, C, P): per channel c, over its B·P values (P = H·W for
   images, 1 for rows of features). The reference's operations in T, in its order; only its sums
   are taken here in double precision, in order. With ``batch`` set, mean and var are written
   (the batch's mean and biased variance); else they are read (the running estimates). */
struct NAME(bn_task) {
    T *y, *x_hat, *inv_std, *mean, *var;
    const T *x, *gamma, *beta;
    ptrdiff_t B, C, P;
    T eps;
    int batch;
};

static void NAME(batch_norm_part)(void *ctx, int part, int parts) {
    const struct NAME(bn_task) *t = ctx;
    const ptrdiff_t N = t->B * t->P, step = t->C * t->P;
    for (ptrdiff_t c = t->C * part / parts; c < t->C * (part + 1) / parts; ++c) {
        const T *x = t->x + c * t->P;
        if (t->batch) {
            double total = 0;
            for (ptrdiff_t n = 0; n < t->B; ++n)
                for (ptrdiff_t e = 0; e < t->P; ++e) total += (double)x[n * step + e];
            const T mean = (T)(total / (double)N);
            double squares = 0;
            for (ptrdiff_t n = 0; n < t->B; ++n)
                for (ptrdiff_t e = 0; e < t->P; ++e) {
                    const T centred = x[n * step + e] - mean;
                    squares += (double)(centred * centred);
                }
            t->mean[c] = mean;
            t->var[c] = (T)(squares / (double)N);
        }
        const T mean = t->mean[c], inv_std = (T)1 / SQRT(t->var[c] + t->eps), gamma = t->gamma[c], beta = t->beta[c];
        t->inv_std[c] = inv_std;
        for (ptrdiff_t n = 0; n < t->B; ++n)
            for (ptrdiff_t e = 0; e < t->P; ++e) {
                const ptrdiff_t at = c * t->P + n * step + e;
                const T x_hat = (t->x[at] - mean) * inv_std;
                t->x_hat[at] = x_hat;
                t->y[at] = gamma * x_hat + beta;
            }
    }
}

/* y, x̂ (B, C, P) and 1/σ (C,), with mean and var (C,) written (batch) or read (not batch). */
void NAME(xpnet_batch_norm)(T *y, T *x_hat, T *inv_std, T *mean, T *var, const T *x, const T *gamma, const T *beta,
                            ptrdiff_t B, ptrdiff_t C, ptrdiff_t P, T eps, int batch, int parts) {
    struct NAME(bn_task) task = {y, x_hat, inv_std, mean, var, x, gamma, beta, B, C, P, eps, batch};
    xpnet_pool_run(NAME(batch_norm_part), &task, parts);
}

/* The backward pass, per channel: ∂L/∂γ = Σ δ x̂, ∂L/∂β = Σ δ, g = γ δ; with the batch's
   statistics ∂L/∂x = (1/σ)(1/N) (N g − Σ g − x̂ Σ g x̂), else ∂L/∂x = g / σ. */
struct NAME(bn_backward_task) {
    T *dx, *dgamma, *dbeta;
    const T *dy, *x_hat, *inv_std, *gamma;
    ptrdiff_t B, C, P;
    int batch;
};

static void NAME(batch_norm_backward_part)(void *ctx, int part, int parts) {
    const struct NAME(bn_backward_task) *t = ctx;
    const ptrdiff_t N = t->B * t->P, step = t->C * t->P;
    for (ptrdiff_t c = t->C * part / parts; c < t->C * (part + 1) / parts; ++c) {
        const T gamma = t->gamma[c], scale = t->inv_std[c];
        double sum_dy = 0, sum_dyx = 0, sum_g = 0, sum_gx = 0;
        for (ptrdiff_t n = 0; n < t->B; ++n)
            for (ptrdiff_t e = 0; e < t->P; ++e) {
                const ptrdiff_t at = c * t->P + n * step + e;
                const T dy = t->dy[at], x_hat = t->x_hat[at], g = dy * gamma;
                sum_dy += (double)dy;
                sum_dyx += (double)(dy * x_hat);
                sum_g += (double)g;
                sum_gx += (double)(g * x_hat);
            }
        t->dgamma[c] = (T)sum_dyx;
        t->dbeta[c] = (T)sum_dy;
        const T count = (T)N, factor = scale * (T)(1.0 / (double)N), sg = (T)sum_g, sgx = (T)sum_gx;
        for (ptrdiff_t n = 0; n < t->B; ++n)
            for (ptrdiff_t e = 0; e < t->P; ++e) {
                const ptrdiff_t at = c * t->P + n * step + e;
                const T g = t->dy[at] * gamma;
                t->dx[at] = t->batch ? factor * (count * g - sg - t->x_hat[at] * sgx) : g * scale;
            }
    }
}

/* dx (B, C, P), ∂L/∂γ and ∂L/∂β (C,) from δ and the forward's x̂ and 1/σ. */
void NAME(xpnet_batch_norm_backward)(T *dx, T *dgamma, T *dbeta, const T *dy, const T *x_hat, const T *inv_std,
                                     const T *gamma, ptrdiff_t B, ptrdiff_t C, ptrdiff_t P, int batch, int parts) {
    struct NAME(bn_backward_task) task = {dx, dgamma, dbeta, dy, x_hat, inv_std, gamma, B, C, P, batch};
    xpnet_pool_run(NAME(batch_norm_backward_part), &task, parts);
}
