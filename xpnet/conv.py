"""Layers on images: a 2-D convolution and pooling, on NCHW batches (B, C, H, W).

Each computes through the device's Ops (``Ops.conv2d``, ``Ops.max_pool2d``, ...), whose reference
is plain Array API code (the standard has no convolution: im2col from the k·k strided views of the
image, one matrix product per chunk of images), as Dense computes through ``Ops.affine``.
"""

from __future__ import annotations

from .layers import Layer, _misshapen, _Weighted, register_layer

__all__ = ["Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D"]


def _positive(owner: str, label: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner} {label} must be a positive integer, got {value!r}")
    return value


def _images(layer, x, channels: int | None, smallest: int) -> None:
    """ValueError unless x is a batch of images (B, C, H, W) with ``channels`` channels (any when
    None) and H, W of at least ``smallest`` (after padding)."""
    who = layer.input_name or type(layer).__name__
    if x.ndim != 4:
        raise ValueError(
            f"{who} has shape {tuple(x.shape)}, but {layer!r} takes images of shape (batch, channels, height, width)"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{who} has {x.shape[1]} channels (shape {tuple(x.shape)}), but {layer!r} takes {channels}")
    if min(x.shape[2], x.shape[3]) < smallest:
        raise ValueError(
            f"{who} has images of {x.shape[2]}×{x.shape[3]}, smaller than the {smallest}×{smallest} {layer!r} needs"
        )


@register_layer
class Conv2D(_Weighted):
    """A 2-D convolution (cross-correlation, as in PyTorch) of NCHW images:

        y[n, o, i, j] = Σ_{c,u,v} W[o, c, u, v] · x̃[n, c, i·s + u, j·s + v] + b[o]

    with W shaped (out_channels, in_channels, k, k) and x̃ the input with ``padding`` zeros around
    it (an int, "valid" for 0, or "same" for (k − 1) / 2 with stride 1 and an odd k). The output
    is H' = ⌊(H + 2p − k) / s⌋ + 1 by W'. Backward, with δ = ∂L/∂y and cols the im2col matrix:
        ∂L/∂W = Σₙ δₙ colsₙᵀ,  ∂L/∂b = Σ_{n,i,j} δ,  ∂L/∂x = col2im(Wᵀ δ)
    He or Xavier initialization counts the receptive field in the fans: fan_in = C·k·k.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = 0,
        *,
        bias: bool = True,
        init: str = "auto",
    ):
        super().__init__()
        self.in_channels = _positive("Conv2D", "in_channels", in_channels)
        self.out_channels = _positive("Conv2D", "out_channels", out_channels)
        self.kernel_size = _positive("Conv2D", "kernel_size", kernel_size)
        self.stride = _positive("Conv2D", "stride", stride)
        if padding == "same":
            if self.stride != 1 or self.kernel_size % 2 == 0:
                raise ValueError(
                    f"Conv2D padding 'same' needs stride 1 and an odd kernel_size, got stride {self.stride} "
                    f"and kernel_size {self.kernel_size}"
                )
            self.pad = (self.kernel_size - 1) // 2
        elif padding == "valid":
            self.pad = 0
        elif isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
            self.pad = padding
        else:
            raise ValueError(f"Conv2D padding must be a non-negative integer, 'same' or 'valid', got {padding!r}")
        self.padding = padding
        self.bias = bool(bias)
        self.init = init
        self.x = None

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        k = self.kernel_size
        self._make_weights(device, dtype, next_layer, (self.out_channels, self.in_channels, k, k))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') for images of height × width."""
        k, s, p = self.kernel_size, self.stride, self.pad
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    #: The model may ask for the ReLU after it in the same pass (``Sequential``, ``Ops.fuses``).
    fusable_activations = ("relu",)

    def forward(self, x, training=False, *, activation=None):
        """y = W ⋆ x + b through ``Ops.conv2d``; with ``activation`` (asked by the model when the
        next layer is that activation and the Ops fuse it), the activation of y in the same pass."""
        _images(self, x, self.in_channels, self.kernel_size - 2 * self.pad)
        self.x = x
        W, b = self.params["W"], self.params.get("b")
        return self.ops.conv2d(x, W, b, stride=self.stride, padding=self.pad, activation=activation, site=self.scratch)

    def backward(self, delta, need_input_grad=True):
        if self.x is None:
            raise RuntimeError("Conv2D.backward called before forward: run model.forward on the batch first")
        expected = (self.x.shape[0], self.out_channels, *self.output_size(self.x.shape[2], self.x.shape[3]))
        if tuple(delta.shape) != expected:
            _misshapen(self, delta, expected)
        dW, db, dx = self.ops.conv2d_backward(
            delta,
            self.x,
            self.params["W"],
            stride=self.stride,
            padding=self.pad,
            bias=self.bias,
            need_dx=need_input_grad,
            dW=self.grads.get("W"),
            db=self.grads.get("b"),
            site=self.scratch,
        )
        return self._hand_over(dW, db, dx)

    def config(self):
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "bias": self.bias,
            "init": self.init,
        }


class _Pool(Layer):
    """A size × size window moved by ``stride`` (by default ``size``: windows side by side) over
    each channel; an edge too short for a whole window is left out (PyTorch's floor mode)."""

    default_init = None  # a layer before it takes the initializer of the layer after it

    def __init__(self, size: int = 2, stride: int | None = None):
        super().__init__()
        self.size = _positive(type(self).__name__, "size", size)
        self.stride = self.size if stride is None else _positive(type(self).__name__, "stride", stride)
        self.shape = None

    def _output_shape(self):
        b, c, h, w = self.shape
        return (b, c, (h - self.size) // self.stride + 1, (w - self.size) // self.stride + 1)

    def _checked_delta(self, dy):
        if self.shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        if tuple(dy.shape) != self._output_shape():
            _misshapen(self, dy, self._output_shape())

    def config(self):
        return {"size": self.size, "stride": self.stride}


@register_layer
class MaxPool2D(_Pool):
    """y = the largest value of each window; the first largest (row-major) wins ties, as in
    PyTorch, and receives the whole δ of its window in backward (the others 0)."""

    def forward(self, x, training=False):
        _images(self, x, None, self.size)
        self.shape = tuple(x.shape)
        y, self.winner = self.ops.max_pool2d(x, size=self.size, stride=self.stride, site=self.scratch)
        return y

    def backward(self, dy, need_input_grad=True):
        self._checked_delta(dy)
        return self.ops.max_pool2d_backward(
            dy, self.winner, self.shape, size=self.size, stride=self.stride, site=self.scratch
        )


@register_layer
class AvgPool2D(_Pool):
    """y = the mean of each window; backward spreads δ / size² over the window."""

    def forward(self, x, training=False):
        _images(self, x, None, self.size)
        self.shape = tuple(x.shape)
        return self.ops.avg_pool2d(x, size=self.size, stride=self.stride, site=self.scratch)

    def backward(self, dy, need_input_grad=True):
        self._checked_delta(dy)
        return self.ops.avg_pool2d_backward(dy, self.shape, size=self.size, stride=self.stride)


@register_layer
class GlobalAvgPool2D(Layer):
    """(B, C, H, W) → (B, C): the mean of each channel; backward spreads δ / (H·W) over it."""

    default_init = None

    def forward(self, x, training=False):
        _images(self, x, None, 1)
        self.shape = tuple(x.shape)
        return self.xp.mean(x, axis=(2, 3))

    def backward(self, dy, need_input_grad=True):
        b, c, h, w = self.shape
        if tuple(dy.shape) != (b, c):
            _misshapen(self, dy, (b, c))
        share = self.xp.reshape(dy * (1.0 / (h * w)), (b, c, 1, 1))
        return share + self.xp.zeros(self.shape, dtype=dy.dtype, device=self.device.native)
