/* The fused kernels' arithmetic, written once for both backends: fused.c builds its C loops from
   these (at install time), and _fast_cupy.py hands this file to CuPy, whose CUDA kernels run the
   same text. So the tests that hold the compiled CPU kernels to the Array API reference on any
   machine also check the arithmetic the GPU runs.

   The includer defines T (the element type: float or double) and SQRT, EXP and LOG (T's math
   functions). An elementwise macro reads and assigns its operands by name, as CuPy's
   ElementwiseKernel binds them. Only the C preprocessor's and C's common ground with CUDA C++ is
   used here. */
#ifndef XPNET_KERNELS_H
#define XPNET_KERNELS_H

/* Adam on one element: m += (1 - b1)(g - m); v += (1 - b2)(g^2 - v); p -= lr_t m / (sqrt(v) + eps_t),
   with c1 = 1 - b1 and c2 = 1 - b2 rounded as NumPy rounds them. m and v are the reference's
   operations in its order, without fused multiply-adds, so they round alike; the step is
   lr_t * (m / (sqrt(v) + eps_t)), one rounding apart from the reference's (lr_t * m) / (...). */
#define XPNET_ADAM(p, m, v, g, lr_t, c1, c2, eps_t)                \
    do {                                                           \
        const T mi_ = (m) + (c1) * ((g) - (m));                    \
        const T vi_ = (v) + (c2) * ((g) * (g) - (v));              \
        (m) = mi_;                                                 \
        (v) = vi_;                                                 \
        (p) = (p) - (lr_t) * (mi_ / (SQRT(vi_) + (eps_t)));        \
    } while (0)

/* ReLU backward: out = da where a > 0, else 0. a > 0 exactly where z > 0, and da is not
   multiplied, so inf or NaN in da stays out of the positions where the unit was off. */
#define XPNET_RELU_BACKWARD(out, a, da) ((out) = (a) > (T)0 ? (da) : (T)0)

/* The bias and the ReLU after a matrix product, in place: z = max(z + b, 0). "s < 0 ? 0 : s"
   keeps NaN and -0.0 where NumPy's maximum(s, 0) keeps them. */
#define XPNET_BIAS_RELU(z, b)                     \
    do {                                          \
        const T s_ = (z) + (b);                   \
        (z) = s_ < (T)0 ? (T)0 : s_;              \
    } while (0)

/* The body of a function (const T *row, long long label, T *out, long long C, T inv_b) -> double:
   softmax cross-entropy of one row of C logits. Writes delta = (softmax(row) - onehot(label)) / B
   (inv_b = 1 / B) into out and returns log sum exp(z - max) - (z_label - max), the row's loss. */
#define XPNET_SOFTMAX_XENT_ROW_BODY                                                  \
    {                                                                                \
        T top = row[0];                                                              \
        for (long long c = 1; c < C; ++c) top = row[c] > top ? row[c] : top;         \
        T sum = 0;                                                                   \
        for (long long c = 0; c < C; ++c) {                                          \
            out[c] = EXP(row[c] - top);                                              \
            sum += out[c];                                                           \
        }                                                                            \
        const double loss = (double)LOG(sum) - (double)(row[label] - top);           \
        for (long long c = 0; c < C; ++c) out[c] = out[c] / sum;                     \
        out[label] -= 1;                                                             \
        for (long long c = 0; c < C; ++c) out[c] *= inv_b;                           \
        return loss;                                                                 \
    }

/* The body of a function (const T *row, long long label, long long C) -> int: is the largest of
   the row's C logits at label? The largest is NumPy's argmax: the first maximum, or the first NaN
   where there is one. (CPU only: on the GPU argmax and count_nonzero are already two device
   kernels with no host read between them.) */
#define XPNET_ARGMAX_ROW_IS_BODY                                   \
    {                                                              \
        long long best = 0;                                        \
        T top = row[0];                                            \
        if (top == top) {                                          \
            for (long long c = 1; c < C; ++c) {                    \
                if (row[c] != row[c]) {                            \
                    best = c;                                      \
                    break;                                         \
                }                                                  \
                if (row[c] > top) {                                \
                    top = row[c];                                  \
                    best = c;                                      \
                }                                                  \
            }                                                      \
        }                                                          \
        return best == label;                                      \
    }

#endif
