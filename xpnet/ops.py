"""Ops: the one seam between the math and the backends.

``Ops`` holds the Array API reference implementation of the primitives that ``fit``'s loop, the
losses and the metrics use: taking the batches, softmax cross-entropy with its gradient, and
counting correct predictions. A backend's Ops subclass (``NumpyOps``, ``CupyOps``) overrides
what it can do faster; each override is tested equal to the reference (tests/test_ops.py).
Callers never branch on whether a faster version exists.

Within ``reusing()`` (fit's loop, which consumes each step's arrays before the next) an Ops may
return arrays that live in buffers reused every step; outside it every call returns new arrays,
as the reference does. (Gradients are the exception: ``affine_backward`` may write into the
gradient arrays it is given, in any mode, so that a flat parameter layout stays intact.)
A ``site`` is a dict a layer keeps for one call of one kind (Dense passes its ``scratch`` to its
one ``affine`` call): a layer that makes two calls of a kind passes two dicts
(``self.scratch.setdefault("gate", {})``), or the second output lands in the first's buffer.

Losses and metrics find the Ops of the call through ``ops_for(array)``: the Ops that ``fit`` or
``evaluate`` made current (``active()``) when it computes in the array's namespace, else the
reference for that namespace. So a loss called directly runs the reference code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading

import array_api_compat

from . import _random
from . import functional as F

__all__ = ["Ops", "BufferedOps", "ops_for", "trust", "trusted", "untrust"]

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("xpnet_ops", default=None)


class _Mode(threading.local):
    """An Ops' mode, per thread: two threads training two models on one device never switch
    each other's (a class attribute is every new thread's default)."""

    reusing = False


#: The label array of the current batch that fit or evaluate checked (with the whole target
#: array, once): the only labels a loss skips its own range check for.
_TRUSTED: contextvars.ContextVar = contextvars.ContextVar("xpnet_trusted", default=None)


class Ops:
    """The reference: plain Array API code, on any backend."""

    def __init__(self, xp, native=None):
        self.xp = xp
        self.native = native  # the device arrays are created on (None: the namespace's default)
        self._mode = _Mode()
        self._own_types: set = set()  # array types of this namespace (``ops_for``)
        self._integral: dict = {}

    # ------------------------------------------------------------ modes
    @property
    def reusing_buffers(self) -> bool:
        """Whether this thread is inside ``reusing()``."""
        return self._mode.reusing

    @contextlib.contextmanager
    def reusing(self):
        """Within this (in this thread), outputs may live in buffers reused every step."""
        mode = self._mode
        before, mode.reusing = mode.reusing, True
        try:
            yield self
        finally:
            mode.reusing = before

    @staticmethod
    def trusting(labels):
        """Within this, ``labels`` count as checked (``trusted``): the caller checked them."""
        return _set_within(_TRUSTED, labels)

    def active(self):
        """Make this the Ops that losses and metrics use for arrays of its namespace."""
        return _set_within(_CURRENT, self)

    def computing(self):
        """A context for a whole computation (``fit``, ``evaluate``, ``predict``): within it the
        backend may hold process-wide resources it computes with, released on leaving (NumPy:
        OpenBLAS's products run on the pool of xpnet's kernels). The reference holds nothing."""
        return contextlib.nullcontext(self)

    def integral(self, dtype) -> bool:
        """Whether ``dtype`` is an integer dtype of this namespace (remembered per dtype: asked
        every step)."""
        known = self._integral.get(dtype)
        if known is None:
            known = self._integral[dtype] = bool(self.xp.isdtype(dtype, "integral"))
        return known

    def fuses(self, activation: str) -> bool:
        """Whether ``affine(..., activation=...)`` computes this activation in the same pass (the
        model then asks for it instead of running the activation layer's own code)."""
        return False

    # ------------------------------------------------------------ the affine map
    def affine(self, x, W, b, *, activation=None, site=None):
        """z = x Wᵀ + b for a batch x (B, in) and W (out, in); with ``activation="relu"``,
        max(z, 0). ``site``: a dict of the calling layer's (its ``scratch``) where a faster Ops
        may keep the arrays it reuses; the reference ignores it."""
        z = x @ W.T
        if b is not None:
            z = z + b
        if activation == "relu":
            z = self.xp.maximum(z, 0.0)
        return z

    def affine_backward(self, delta, x, W, *, bias: bool, need_dx: bool, dW=None, db=None, site=None):
        """(∂L/∂W, ∂L/∂b, ∂L/∂x) = (δᵀ x, Σ_batch δ, δ W) for δ = ∂L/∂z; the bias gradient is None
        without a bias, the input gradient None unless ``need_dx``. ``dW``, ``db``: the current
        gradient arrays, which a faster Ops may write into instead of making new ones."""
        grad_W = delta.T @ x
        grad_b = self.xp.sum(delta, axis=0) if bias else None
        return grad_W, grad_b, (delta @ W if need_dx else None)

    def relu(self, z, *, site=None):
        """a = max(z, 0)."""
        return self.xp.maximum(z, 0.0)

    def relu_backward(self, da, a, *, site=None):
        """∂L/∂z = ∂L/∂a where a > 0 (exactly where z > 0), else 0."""
        return self.xp.where(a > 0, da, 0.0)

    def dropout(self, x, rate: float, draw: tuple, *, site=None):
        """(y, mask) of inverted dropout: mask = [u ≥ rate] / (1 − rate), y = x · mask, for u the
        uniform numbers of ``draw`` = (key, k1) of the device's dropout stream (``Device.next_draw``,
        ``xpnet._random``), or (key, k1, first row): the same masks on every backend, and on a
        rank of a data-parallel job, whose rows start at ``first row`` of the global batch
        (``Device.first_row``), the masks those rows have on one process."""
        xp = self.xp
        first = _random.first_element(draw, tuple(x.shape))
        if first is None:
            raise ValueError(f"a dropout draw's first row must be an integer in [0, 2**31), got {draw[2]!r}")
        u = _random.uniform(xp, array_api_compat.device(x), draw[0], draw[1], tuple(x.shape), x.dtype, first)
        mask = xp.astype(u >= rate, x.dtype) * (1.0 / (1.0 - rate))
        return x * mask, mask

    # ------------------------------------------------------------ convolution and pooling
    #: Images per chunk of a convolution: the columns of a chunk, never of the whole batch, are held.
    conv_chunk = 8

    def conv2d(self, x, W, b, *, stride: int, padding: int, activation=None, site=None):
        """y = W ⋆ x + b (cross-correlation, as in PyTorch) for images x (B, C, H, W) and kernels
        W (O, C, k, k): y[n, o, i, j] = Σ_{c,u,v} W[o, c, u, v] · x̃[n, c, i·s + u, j·s + v] + b[o],
        x̃ being x with ``padding`` zeros on each side. As one product per chunk of images: the
        k·k shifted views of x̃ stacked into columns (im2col, (b, C·k·k, H'·W')), y = W₂ cols with
        W₂ = W as (O, C·k·k). With ``activation="relu"``, max(y, 0) (as ``affine``'s)."""
        xp = self.xp
        batch, _, height, width = x.shape
        out_channels, _, k, _ = W.shape
        rows, cols_out = _conv_size(height, k, stride, padding), _conv_size(width, k, stride, padding)
        W2 = xp.reshape(W, (out_channels, -1))
        outputs = []
        for start in range(0, batch, self.conv_chunk):
            stop = min(start + self.conv_chunk, batch)  # (a stop past the end is not the standard's)
            columns = self._columns(x[start:stop, ...], k, stride, padding, rows, cols_out)
            outputs.append(xp.matmul(W2, columns))  # (b, O, H'·W')
        y = xp.reshape(xp.concat(outputs, axis=0), (batch, out_channels, rows, cols_out))
        y = y if b is None else y + xp.reshape(b, (1, out_channels, 1, 1))
        return xp.maximum(y, 0.0) if activation == "relu" else y

    def conv2d_backward(
        self, dy, x, W, *, stride: int, padding: int, bias: bool, need_dx: bool, dW=None, db=None, site=None
    ):
        """(∂L/∂W, ∂L/∂b, ∂L/∂x) for δ = ∂L/∂y (B, O, H', W'), chunk by chunk:
        ∂L/∂W₂ = Σ_n δₙ colsₙᵀ, ∂L/∂b = Σ_{n,i,j} δ, and ∂L/∂x = col2im(W₂ᵀ δₙ): each column's
        gradient added back at the k·k offsets it was read from (then the padding cut off).
        ``dW``, ``db``: the current gradient arrays, which a faster Ops may write into (as in
        ``affine_backward``)."""
        xp = self.xp
        batch, channels, height, width = x.shape
        out_channels, _, k, _ = W.shape
        rows, cols_out = dy.shape[2], dy.shape[3]
        W2 = xp.reshape(W, (out_channels, -1))
        grad_W = xp.zeros(W2.shape, dtype=W.dtype, device=array_api_compat.device(W))
        pieces = []
        for start in range(0, batch, self.conv_chunk):
            stop = min(start + self.conv_chunk, batch)
            part = x[start:stop, ...]
            columns = self._columns(part, k, stride, padding, rows, cols_out)
            d = xp.reshape(dy[start:stop, ...], (stop - start, out_channels, rows * cols_out))
            grad_W = grad_W + xp.sum(xp.matmul(d, xp.matrix_transpose(columns)), axis=0)
            if need_dx:
                pieces.append(self._col2im(xp.matmul(xp.matrix_transpose(W2), d), part.shape, k, stride, padding))
        grad_b = xp.sum(dy, axis=(0, 2, 3)) if bias else None
        grad_x = xp.concat(pieces, axis=0) if need_dx else None
        return xp.reshape(grad_W, W.shape), grad_b, grad_x

    def _padded(self, x, padding: int):
        """x (b, C, H, W) with ``padding`` zeros around each image."""
        if not padding:
            return x
        xp = self.xp
        b, c, h, w = x.shape
        out = xp.zeros((b, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype, device=array_api_compat.device(x))
        out[:, :, padding : padding + h, padding : padding + w] = x
        return out

    def _columns(self, x, k: int, stride: int, padding: int, rows: int, cols: int):
        """im2col: (b, C·k·k, H'·W'), the entry (c·k·k + u·k + v, i·W' + j) = x̃[c, i·s + u, j·s + v]."""
        xp = self.xp
        padded = self._padded(x, padding)
        views = [padded[_window(u, v, stride, rows, cols)] for u in range(k) for v in range(k)]
        stacked = xp.stack(views, axis=2)  # (b, C, k·k, H', W')
        return xp.reshape(stacked, (x.shape[0], x.shape[1] * k * k, rows * cols))

    def _col2im(self, columns, shape, k: int, stride: int, padding: int):
        """The adjoint of ``_columns``: each column entry added back where it was read from."""
        xp = self.xp
        b, c, h, w = shape
        rows, cols = _conv_size(h, k, stride, padding), _conv_size(w, k, stride, padding)
        grads = xp.reshape(columns, (b, c, k, k, rows, cols))
        out = xp.zeros(
            (b, c, h + 2 * padding, w + 2 * padding), dtype=columns.dtype, device=array_api_compat.device(columns)
        )
        for u in range(k):
            for v in range(k):
                window = _window(u, v, stride, rows, cols)
                out[window] = out[window] + grads[:, :, u, v, :, :]
        return out[:, :, padding : padding + h, padding : padding + w] if padding else out

    def max_pool2d(self, x, *, size: int, stride: int, site=None):
        """(y, winner): y[n, c, i, j] = max over the size × size window at (i·s, j·s); ``winner`` the
        window offset of the first maximum (ties: the first in row-major order wins, as in PyTorch),
        which the backward pass needs."""
        xp = self.xp
        views = self._pool_views(x, size, stride)
        best = views[0]
        winner = xp.zeros(best.shape, dtype=xp.int32, device=array_api_compat.device(x))
        device = array_api_compat.device(x)
        for offset, view in enumerate(views[1:], start=1):
            larger = view > best  # strictly: an equal later value does not take the place
            winner = xp.where(larger, xp.asarray(offset, dtype=xp.int32, device=device), winner)
            best = xp.maximum(best, view)  # (where larger, the view; else best: the same values)
        return best, winner

    def max_pool2d_backward(self, dy, winner, shape, *, size: int, stride: int, site=None):
        """∂L/∂x: each δ added at its window's winner (where windows overlap, a value that wins
        several gets the sum)."""
        xp = self.xp
        out = xp.zeros(shape, dtype=dy.dtype, device=array_api_compat.device(dy))
        rows, cols = dy.shape[2], dy.shape[3]
        for offset in range(size * size):
            u, v = divmod(offset, size)
            window = _window(u, v, stride, rows, cols)
            share = xp.where(winner == offset, dy, 0.0)
            # windows side by side (stride = size) never share a position: assigned, not added
            out[window] = share if stride >= size else out[window] + share
        return out

    def avg_pool2d(self, x, *, size: int, stride: int, site=None):
        """y = the mean of each size × size window at (i·s, j·s)."""
        views = self._pool_views(x, size, stride)
        total = views[0]
        for view in views[1:]:
            total = total + view
        return total * (1.0 / (size * size))

    def avg_pool2d_backward(self, dy, shape, *, size: int, stride: int, site=None):
        """∂L/∂x: δ / size² added over each window."""
        xp = self.xp
        out = xp.zeros(shape, dtype=dy.dtype, device=array_api_compat.device(dy))
        share = dy * (1.0 / (size * size))
        for offset in range(size * size):
            u, v = divmod(offset, size)
            window = _window(u, v, stride, dy.shape[2], dy.shape[3])
            out[window] = out[window] + share
        return out

    def _pool_views(self, x, size: int, stride: int) -> list:
        """The size² strided views of x (B, C, H, W), one per window offset (u, v), row-major."""
        rows, cols = (x.shape[2] - size) // stride + 1, (x.shape[3] - size) // stride + 1
        return [x[_window(u, v, stride, rows, cols)] for u in range(size) for v in range(size)]

    # ------------------------------------------------------------ batch normalization
    def batch_norm(self, x, gamma, beta, *, axes: tuple, eps: float, mean=None, var=None, site=None):
        """(y, x̂, 1/σ, μ_B, σ²_B): y = γ x̂ + β with x̂ = (x − μ) / √(σ² + ε), over ``axes`` (the
        batch, and the image positions of each channel). With ``mean`` and ``var`` (the running
        statistics, evaluation) those are μ and σ², and μ_B, σ²_B are None; else the batch's own:
        μ_B = mean(x), σ²_B = mean((x − μ_B)²) (biased, as the normalization uses it). γ, β, μ
        and σ² are per feature (F,); ``shape`` puts them on the feature axis, 1."""
        xp = self.xp
        shape = [1] * x.ndim
        shape[1] = x.shape[1]
        shape = tuple(shape)
        batch_mean = batch_var = None
        if mean is None:
            batch_mean = xp.mean(x, axis=axes)
            centred = x - xp.reshape(batch_mean, shape)
            batch_var = xp.mean(centred * centred, axis=axes)
            inv_std = 1.0 / xp.sqrt(batch_var + eps)
        else:
            centred = x - xp.reshape(mean, shape)
            inv_std = 1.0 / xp.sqrt(var + eps)
        x_hat = centred * xp.reshape(inv_std, shape)
        y = xp.reshape(gamma, shape) * x_hat + xp.reshape(beta, shape)
        return y, x_hat, inv_std, batch_mean, batch_var

    def batch_norm_backward(self, dy, x_hat, inv_std, gamma, *, axes: tuple, batch_statistics: bool, site=None):
        """(∂L/∂x, ∂L/∂γ, ∂L/∂β): ∂L/∂γ = Σ δ x̂, ∂L/∂β = Σ δ over ``axes``; with the batch's own
        statistics (training), which depend on x, for N values per feature,
            ∂L/∂x = (1/σ) / N · (N ĝ − Σ ĝ − x̂ Σ ĝ x̂),  ĝ = γ δ,
        and with fixed statistics (evaluation) ∂L/∂x = γ δ / σ."""
        xp = self.xp
        shape = [1] * dy.ndim
        shape[1] = dy.shape[1]
        shape = tuple(shape)
        grad_gamma = xp.sum(dy * x_hat, axis=axes)
        grad_beta = xp.sum(dy, axis=axes)
        g = dy * xp.reshape(gamma, shape)
        scale = xp.reshape(inv_std, shape)
        if not batch_statistics:
            return g * scale, grad_gamma, grad_beta
        count = math.prod(dy.shape) // dy.shape[1]
        sum_g = xp.reshape(xp.sum(g, axis=axes), shape)
        sum_gx = xp.reshape(xp.sum(g * x_hat, axis=axes), shape)
        return scale * (1.0 / count) * (count * g - sum_g - x_hat * sum_gx), grad_gamma, grad_beta

    # ------------------------------------------------------------ batches
    def batches(self, X, Y, order, batch_size: int, share=None):
        """(start, stop, xb, yb) for each mini-batch: rows order[start:stop] of X and Y (rows
        start:stop when ``order`` is None). With ``share`` (a function of the batch's size that
        gives the rows [lo, hi) this process takes, ``Communicator.share``), xb and yb hold those
        rows of the batch alone (start and stop stay the whole batch's). A generator: close it
        (``contextlib.closing``) when the loop ends early, so that a faster Ops can finish any
        copy it runs ahead."""
        xp, n = self.xp, X.shape[0]
        for start, stop, first, last in _spans(n, batch_size, share):
            if order is None:
                yield start, stop, X[first:last, ...], Y[first:last, ...]
            else:
                idx = order[first:last]
                yield start, stop, xp.take(X, idx, axis=0), xp.take(Y, idx, axis=0)

    # ------------------------------------------------------------ losses
    def softmax_cross_entropy(self, z, labels):
        """(L, δ) for logits z (B, C) and integer labels (B,), already checked to be in range:
        L = −(1/B) Σᵢ log softmax(zᵢ)[cᵢ], δ = (softmax(z) − onehot(c)) / B, the one-hot never built
        (a boolean class mask stands in for it)."""
        xp = self.xp
        log_p = F.log_softmax(xp, z)
        is_true = F.class_mask(xp, labels, z.shape[1], array_api_compat.device(z))
        loss = -xp.mean(xp.sum(xp.where(is_true, log_p, 0.0), axis=1))
        p = xp.exp(log_p)
        delta = xp.where(is_true, p - 1.0, p)
        return loss, delta * (1.0 / z.shape[0])

    # ------------------------------------------------------------ metrics
    def count_correct(self, z, labels):
        """How many rows of z (B, C) have their largest value (the first, among equals) at the
        integer label: a 0-d device array, or a Python int."""
        xp = self.xp
        return xp.count_nonzero(xp.argmax(z, axis=1) == labels)

    # ------------------------------------------------------------ parameters and optimizers
    def flat_storage(self, size: int, dtype):
        """A zeroed flat array in which the parameter store lays out ``size`` numbers (parameters,
        gradients, optimizer slots, each parameter a view), or None for separate arrays, one per
        parameter: the reference, which gains nothing from a flat layout."""
        return None

    def sgd(self, p, g, lr: float, velocity=None, *, momentum: float = 0.0, nesterov: bool = False, site=None):
        """(new p, new velocity) for one SGD step: θ − η g; with momentum μ, v ← μ v + g and
        θ − η v (heavy ball) or θ − η (g + μ v) (Nesterov, with the new v). In place where the
        arrays can be written."""
        if not momentum:
            return _subtract(p, lr * g), velocity
        if array_api_compat.is_writeable_array(velocity):
            velocity *= momentum
            velocity += g
        else:
            velocity = momentum * velocity + g
        return _subtract(p, lr * (g + momentum * velocity) if nesterov else lr * velocity), velocity

    def adam(self, p, g, m, v, lr_t: float, beta1: float, beta2: float, eps_t: float, *, decay: float = 0.0, site=None):
        """(new p, m, v) for one Adam step with the bias corrections folded into the host floats
        η_t and ε_t (``optim.Adam``): m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g², written as
        m + (1 − β₁)(g − m) and v + (1 − β₂)(g² − v) (the same numbers, rounded as the fused
        kernels round them); θ ← θ − (η_t m / (√v + ε_t) + decay·θ) (``decay``: AdamW's ηλ, 0 for
        Adam). In place where the arrays can be written."""
        if array_api_compat.is_writeable_array(m):
            m += (1.0 - beta1) * (g - m)
            v += (1.0 - beta2) * (g * g - v)
        else:
            m = m + (1.0 - beta1) * (g - m)
            v = v + (1.0 - beta2) * (g * g - v)
        direction = lr_t * m / (self.xp.sqrt(v) + eps_t)
        if decay:
            direction = direction + decay * p
        return _subtract(p, direction), m, v

    # ------------------------------------------------------------ across processes
    def host_view(self, a):
        """A NumPy array sharing ``a``'s memory, C-contiguous and writable, or None where there
        is none (the reference: none; arrays then travel through a host copy)."""
        return None

    def all_sum(self, comm, arrays, scale: float, device) -> None:
        """Each array of ``arrays`` times ``scale``, summed over the ranks of ``comm``
        (``xpnet.distributed``), in place: one collective for all of them. Where the one array is
        a host view, MPI reads and writes it as it is; otherwise the arrays are packed into one
        host buffer, summed, and copied back (``device`` moves them)."""

        def summed(buffer):
            if scale != 1.0:
                buffer *= scale
            comm.all_sum_host(buffer)

        self._on_host(arrays, device, summed)

    def broadcast(self, comm, arrays, device, root: int = 0) -> None:
        """Rank ``root``'s values of every array of ``arrays``, in place on every rank (one
        collective for all of them, staged as ``all_sum`` stages)."""
        self._on_host(arrays, device, lambda buffer: comm.broadcast_host(buffer, root))

    def _on_host(self, arrays, device, collective) -> None:
        """``collective(buffer)`` on a host buffer that holds every array of ``arrays``: the one
        array's host view where it has one, else a packed copy, written back afterwards."""
        from .backend import pack_to_host, unpack_from_host

        view = self.host_view(arrays[0]) if len(arrays) == 1 else None
        if view is not None:
            collective(view)
            return
        host = pack_to_host(device, arrays)
        collective(host)
        unpack_from_host(device, host, arrays)


def _spans(n: int, batch_size: int, share):
    """(start, stop, first, last) of each mini-batch of n rows: the batch [start, stop), and the
    rows [first, last) of it this process takes (all of them without ``share``)."""
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if share is None:
            yield start, stop, start, stop
        else:
            lo, hi = share(stop - start)
            yield start, stop, start + lo, start + hi


def _subtract(p, update):
    """p − update, in place when the array library allows it (rebind the result either way)."""
    if array_api_compat.is_writeable_array(p):
        p -= update
        return p
    return p - update


class BufferedOps(Ops):
    """Overrides shared by the backends with fast paths (``fast``: NumPy's or CuPy's): within
    ``reusing()``, batches gathered into reused buffers (the next one copied ahead where the
    fast paths can) and softmax cross-entropy fused into one pass, δ in a reused buffer."""

    def __init__(self, xp, native, fast):
        super().__init__(xp, native)
        self.fast = fast

    def batches(self, X, Y, order, batch_size, share=None):
        if order is None or not self._mode.reusing:
            yield from super().batches(X, Y, order, batch_size, share)
            return
        fast, n, buffers = self.fast, X.shape[0], {}
        ahead = fast.gathers_ahead(X, batch_size)  # two input buffers in turn
        spans = list(_spans(n, batch_size, share))
        try:
            for step, (start, stop, first, last) in enumerate(spans):
                name = f"x{step % 2}" if ahead else "x"
                xb = fast.take_rows(
                    X, order, first, last, fast.buffer(buffers, name, (last - first, *X.shape[1:]), X.dtype)
                )
                yb = fast.take_rows(
                    Y, order, first, last, fast.buffer(buffers, "y", (last - first, *Y.shape[1:]), Y.dtype)
                )
                if ahead and step + 1 < len(spans):
                    _, _, after_first, after_last = spans[step + 1]
                    shape = (after_last - after_first, *X.shape[1:])
                    following = fast.buffer(buffers, f"x{(step + 1) % 2}", shape, X.dtype)
                    fast.take_rows_ahead(X, order, after_first, after_last, following)
                yield start, stop, xb, yb
        finally:  # however the loop ends, no copy may still be writing into a buffer
            if ahead:
                fast.finish_ahead()

    def computing(self):
        return self.fast.computing()

    def fuses(self, activation):
        return self._mode.reusing and activation == "relu"

    def affine(self, x, W, b, *, activation=None, site=None):
        if not self._mode.reusing or site is None or activation not in (None, "relu"):
            return super().affine(x, W, b, activation=activation, site=site)
        out = self.fast.buffer(site, "z", (x.shape[0], W.shape[0]), W.dtype)  # site: the layer's scratch
        return self.fast.linear(x, W, b, out, relu=activation == "relu")

    def affine_backward(self, delta, x, W, *, bias, need_dx, dW=None, db=None, site=None):
        if dW is None:  # no gradient arrays to write into yet (the first backward): new ones
            dW = self.fast.buffer({}, "dW", tuple(W.shape), W.dtype)
        if bias and db is None:
            db = self.fast.buffer({}, "db", (W.shape[0],), W.dtype)
        dx = None
        if need_dx and self._mode.reusing and site is not None:
            dx = self.fast.buffer(site, "dx", tuple(x.shape), delta.dtype)
        self.fast.linear_backward(delta, x, W, dW, db if bias else None, dx)
        if need_dx and dx is None:
            dx = delta @ W
        return dW, (db if bias else None), dx

    def relu(self, z, *, site=None):
        if not self._mode.reusing or site is None:
            return super().relu(z, site=site)
        return self.fast.relu(z, self.fast.buffer(site, "a", tuple(z.shape), z.dtype))

    def relu_backward(self, da, a, *, site=None):
        if not self._mode.reusing or site is None:
            return super().relu_backward(da, a, site=site)
        return self.fast.relu_backward(da, a, self.fast.buffer(site, "da", tuple(da.shape), da.dtype))

    def flat_storage(self, size, dtype):
        return self.fast.flat(size, dtype)

    def adam(self, p, g, m, v, lr_t, beta1, beta2, eps_t, *, decay=0.0, site=None):
        """One pass per operation on the flat store's arrays (the compiled kernel where there is
        one): the decoupled decay θ ← θ − decay·θ first, then the Adam step, which ignores θ."""
        if site is None or not site.get("flat"):  # not the flat store's spans, which are writable
            return super().adam(p, g, m, v, lr_t, beta1, beta2, eps_t, decay=decay, site=site)
        if decay:
            p -= decay * p
        xp, n = self.xp, math.prod(p.shape)
        flat = [a if a.ndim == 1 else xp.reshape(a, (n,)) for a in (p, g, m, v)]  # views of contiguous spans
        scratch = self.fast.buffer(site, "adam", (n,), p.dtype)
        self.fast.adam_(*flat, scratch, lr_t, beta1, beta2, eps_t)
        return p, m, v

    def softmax_cross_entropy(self, z, labels):
        # the compiled pass reads row[label]: only for labels fit checked (``trusted``), never others
        if not self._mode.reusing or z.ndim != 2 or labels.shape != (z.shape[0],) or not trusted(labels):
            return super().softmax_cross_entropy(z, labels)
        delta = self.fast.buffer({}, "delta", tuple(z.shape), z.dtype)  # new each call: δ is the caller's
        return self.fast.softmax_cross_entropy(z, labels, delta)


@contextlib.contextmanager
def _set_within(variable: contextvars.ContextVar, value):
    """``variable`` holds ``value`` within the block (and the block gets it), as before after it."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def trust(labels):
    """Make ``labels`` the batch that counts as checked, until ``untrust`` of the first token
    returned; cheaper than ``Ops.trusting`` in a loop that sets it every step."""
    return _TRUSTED.set(labels)


def untrust(token) -> None:
    """Undo the ``trust`` that returned ``token``."""
    _TRUSTED.reset(token)


def trusted(labels) -> bool:
    """Whether ``labels`` is the batch fit or evaluate vouches for (``Ops.trusting``)."""
    return labels is _TRUSTED.get()


def ops_for(x) -> Ops:
    """The Ops for computing on ``x``: the active one if it computes in x's namespace, else the
    reference for that namespace. (Called twice a training step: the array types seen to be the
    active Ops' own are remembered, so the namespace is looked up once, not per call.)"""
    current = _CURRENT.get()
    if current is not None and type(x) in current._own_types:
        return current
    xp = array_api_compat.array_namespace(x)
    if current is not None and current.xp is xp:
        current._own_types.add(type(x))
        return current
    return _reference(xp)


_REFERENCE: dict = {}


def _reference(xp) -> Ops:
    ops = _REFERENCE.get(xp)
    if ops is None:
        ops = _REFERENCE[xp] = Ops(xp)
    return ops


def _conv_size(n: int, k: int, stride: int, padding: int) -> int:
    """The output length of a convolution over n positions: ⌊(n + 2p − k) / s⌋ + 1."""
    return (n + 2 * padding - k) // stride + 1


def _window(u: int, v: int, stride: int, rows: int, cols: int) -> tuple:
    """The index of the positions that kernel or window offset (u, v) reads, for rows × cols outputs
    at stride s: rows u, u + s, ..., and columns v, v + s, ..."""
    return (
        slice(None),
        slice(None),
        slice(u, u + stride * (rows - 1) + 1, stride),
        slice(v, v + stride * (cols - 1) + 1, stride),
    )
