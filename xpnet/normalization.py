"""Batch normalization: over the features of (B, F) rows, over the channels of (B, C, H, W) images.

Conventions (PyTorch's): ``momentum`` 0.1 and ``eps`` 1e-5. In training the layer normalizes by
the batch's own mean and biased variance, and updates the running estimates
    μ_run ← (1 − m) μ_run + m μ_B,   σ²_run ← (1 − m) σ²_run + m σ²_B · N / (N − 1)
(the unbiased variance, N values per feature). In evaluation it normalizes by μ_run and σ²_run.
The running estimates are layer state (``layer.state``): saved in ``state_dict`` and checkpoints,
restored, never optimized. γ and β take no weight decay.

Data-parallel (``xpnet.distributed``): each rank normalizes its share of the global batch by that
share's own statistics (per-rank statistics, not synchronized across ranks), and ``fit``
averages the running estimates over the ranks after every epoch, which leaves them the same on
every rank (the running averages are linear in the batch statistics).
"""

from __future__ import annotations

import math

from .layers import Layer, _misshapen, register_layer

__all__ = ["BatchNorm"]


@register_layer
class BatchNorm(Layer):
    """y = γ (x − μ) / √(σ² + ε) + β per feature (the axis-1 entries: features or channels)."""

    default_init = None  # a layer before it takes the initializer of the layer after it
    keeps_shape = True
    no_decay = ("gamma", "beta")

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"BatchNorm features must be a positive integer, got {features!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
            raise ValueError(f"BatchNorm momentum must be a number in (0, 1], got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0.0:
            raise ValueError(f"BatchNorm eps must be a positive number, got {eps!r}")
        self.features, self.momentum, self.eps = features, float(momentum), float(eps)
        self._cache = None

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        xp, native = device.xp, device.native
        self.params["gamma"] = xp.ones((self.features,), dtype=dtype, device=native)
        self.params["beta"] = xp.zeros((self.features,), dtype=dtype, device=native)
        self.state["running_mean"] = xp.zeros((self.features,), dtype=dtype, device=native)
        self.state["running_var"] = xp.ones((self.features,), dtype=dtype, device=native)

    def _axes(self, x) -> tuple:
        who = self.input_name or "BatchNorm's input"
        if x.ndim not in (2, 4) or x.shape[1] != self.features:
            raise ValueError(
                f"{who} has shape {tuple(x.shape)}, but {self!r} takes (batch, {self.features}) or "
                f"(batch, {self.features}, height, width)"
            )
        return (0,) if x.ndim == 2 else (0, 2, 3)

    def forward(self, x, training=False):
        axes = self._axes(x)
        count = math.prod(x.shape) // self.features  # (torch's size is a method: the shape's product)
        if training and count < 2:
            raise ValueError(
                f"BatchNorm in training needs more than one value per feature, got input of shape {tuple(x.shape)}"
            )
        gamma, beta = self.params["gamma"], self.params["beta"]
        if training:
            y, x_hat, inv_std, mean, var = self.ops.batch_norm(
                x, gamma, beta, axes=axes, eps=self.eps, site=self.scratch
            )
            m = self.momentum
            self.state["running_mean"] = (1.0 - m) * self.state["running_mean"] + m * mean
            self.state["running_var"] = (1.0 - m) * self.state["running_var"] + m * (var * (count / (count - 1)))
        else:
            y, x_hat, inv_std, _, _ = self.ops.batch_norm(
                x,
                gamma,
                beta,
                axes=axes,
                eps=self.eps,
                mean=self.state["running_mean"],
                var=self.state["running_var"],
                site=self.scratch,
            )
        self._cache = (x_hat, inv_std, axes, training)
        return y

    def backward(self, dy, need_input_grad=True):
        if self._cache is None:
            raise RuntimeError("BatchNorm.backward called before forward: run model.forward on the batch first")
        x_hat, inv_std, axes, training = self._cache
        if dy.shape != x_hat.shape:
            _misshapen(self, dy, x_hat.shape)
        dx, self.grads["gamma"], self.grads["beta"] = self.ops.batch_norm_backward(
            dy, x_hat, inv_std, self.params["gamma"], axes=axes, batch_statistics=training, site=self.scratch
        )
        return dx

    def config(self):
        return {"features": self.features, "momentum": self.momentum, "eps": self.eps}
