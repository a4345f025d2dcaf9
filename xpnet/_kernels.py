"""The fused kernels' arithmetic, written once as C text that both backends compile.

The Array API code in layers, losses and optimizers is the reference. These bodies do the same
arithmetic in one pass, and two backend modules wrap them: ``_fast_numpy`` in C loops built with
the system's compiler, ``_fast_cupy`` in CUDA kernels built by CuPy. So the tests that hold the
compiled CPU kernels to the reference on this machine also check the text the GPU runs.

Conventions: ``T`` is the element type (float or double); ``SQRT``, ``EXP`` and ``LOG`` are the
math functions for T; an elementwise body reads and assigns its operands by name.
"""

from __future__ import annotations

#: Adam on one element: m += (1 − β₁)(g − m); v += (1 − β₂)(g² − v); p −= η_t m / (√v + ε_t),
#: with c1 = 1 − β₁ and c2 = 1 − β₂ rounded as NumPy rounds them.
ADAM = {
    "inputs": ("g",),
    "outputs": ("p", "m", "v"),
    "scalars": ("lr_t", "c1", "c2", "eps_t"),
    "body": """
        const T mi = m + c1 * (g - m);
        const T vi = v + c2 * (g * g - v);
        m = mi;
        v = vi;
        p = p - lr_t * (mi / (SQRT(vi) + eps_t));
    """,
}

#: ReLU backward: δ = where(a > 0, da, 0). a > 0 exactly where z > 0, and da is not multiplied,
#: so inf or NaN in da stays out of the positions where the unit was off, as in the reference.
RELU_BACKWARD = {
    "inputs": ("a", "da"),
    "outputs": ("out",),
    "scalars": (),
    "body": "out = a > (T)0 ? da : (T)0;",
}

#: The bias and the ReLU after a matrix product, in place: z = max(z + b, 0). ``v < 0 ? 0 : v``
#: keeps NaN and −0.0 where NumPy's maximum(v, 0) keeps them.
BIAS_RELU = {
    "inputs": ("b",),
    "outputs": ("z",),
    "scalars": (),
    "body": "const T s = z + b; z = s < (T)0 ? (T)0 : s;",
}

#: Softmax cross-entropy of one row of logits ``row`` (C values) with label ``label``: writes
#: δ = (softmax(row) − onehot(label)) / B into ``out`` and returns log Σ exp(z − max) − (z_label − max),
#: the row's loss, in double.
SOFTMAX_XENT_ROW = """
    T top = row[0];
    for (long long c = 1; c < C; ++c) top = row[c] > top ? row[c] : top;
    T sum = 0;
    for (long long c = 0; c < C; ++c) { out[c] = EXP(row[c] - top); sum += out[c]; }
    const double loss = (double)LOG(sum) - (double)(row[label] - top);
    for (long long c = 0; c < C; ++c) out[c] = out[c] / sum;
    out[label] -= 1;
    for (long long c = 0; c < C; ++c) out[c] *= inv_b;
    return loss;
"""

#: Is the largest of one row of logits ``row`` (C values) at ``label``? The largest is NumPy's
#: argmax: the first maximum, or the first NaN where there is one. (CPU only: on the GPU argmax and
#: count_nonzero are already two device kernels with no host read between them.)
ARGMAX_ROW_IS = """
    long long best = 0;
    T top = row[0];
    if (top == top) {
        for (long long c = 1; c < C; ++c) {
            if (row[c] != row[c]) { best = c; break; }
            if (row[c] > top) { top = row[c]; best = c; }
        }
    }
    return best == label;
"""

#: The C names of the math functions, per element type.
MATH = {
    "float": {"SQRT": "sqrtf", "EXP": "expf", "LOG": "logf"},
    "double": {"SQRT": "sqrt", "EXP": "exp", "LOG": "log"},
}


def math_defines(type_name: str) -> str:
    """#define lines that name T's math functions (and T itself)."""
    lines = [f"#define T {type_name}"] + [f"#define {k} {v}" for k, v in MATH[type_name].items()]
    return "\n".join(lines) + "\n"


def math_undefines() -> str:
    return "\n".join(f"#undef {k}" for k in ("T", *MATH["float"])) + "\n"
