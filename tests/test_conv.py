"""Convolution and pooling layers: gradcheck on random shapes, equality with PyTorch autograd,
every backend, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_on_device, host, on
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import xpnet as xn


def _reads_the_image(n: int, k: int, stride: int, padding: int, outputs: int) -> bool:
    """Whether some window of a convolution over n positions reads one of them (not padding)."""
    return any(0 <= i * stride + u - padding < n for i in range(outputs) for u in range(k))


def _model(layers, device="cpu"):
    return xn.Sequential(layers, device=device, dtype="float64", seed=0)


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 3),
    out_channels=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    extra=st.integers(0, 4),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_conv2d_passes_gradcheck_on_random_shapes(channels, out_channels, kernel, stride, padding, extra, batch, seed):
    size = max(kernel - 2 * padding, 1) + extra
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, channels, size, size + 1))
    conv = xn.Conv2D(channels, out_channels, kernel, stride=stride, padding=padding)
    rows, cols = conv.output_size(size, size + 1)
    # Where every window lies in the padding (k = 1, stride 3, padding 1 on 1 × 2 images), y = b
    # for every example: two examples labelled apart then cancel, ∂L/∂b is exactly 0, and a
    # relative error of 0 against central differences' rounding (1e-17) reads 1. Not a geometry
    # that tells backprop from a wrong formula: left out.
    assume(
        _reads_the_image(size, kernel, stride, padding, rows)
        and _reads_the_image(size + 1, kernel, stride, padding, cols)
    )
    model = _model([conv, xn.Tanh(), xn.Flatten(), xn.Dense(out_channels * rows * cols, 2)])
    report = xn.gradcheck(model, "cross_entropy", x, rng.integers(0, 2, batch))
    assert report.max_error < 1e-6, report.table()


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["max", "avg"]),
    size=st.integers(1, 3),
    stride=st.integers(1, 3),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_pooling_passes_gradcheck_on_random_shapes(kind, size, stride, extra, seed):
    rng = np.random.default_rng(seed)
    h, w = size + extra, size + extra + 1
    x = rng.normal(size=(2, 2, h, w))  # distinct values: a maximum is not at a tie, where it has no derivative
    pool = (xn.MaxPool2D if kind == "max" else xn.AvgPool2D)(size, stride)
    rows, cols = (h - size) // stride + 1, (w - size) // stride + 1
    model = _model([xn.Conv2D(2, 2, 1), pool, xn.Flatten(), xn.Dense(2 * rows * cols, 2)])
    report = xn.gradcheck(model, "cross_entropy", x, rng.integers(0, 2, 2))
    assert report.max_error < 1e-6, report.table()


def test_global_average_pooling_passes_gradcheck():
    rng = np.random.default_rng(3)
    model = _model([xn.Conv2D(2, 3, 3, padding="same"), xn.ReLU(), xn.GlobalAvgPool2D(), xn.Dense(3, 2)])
    report = xn.gradcheck(model, "cross_entropy", rng.normal(size=(3, 2, 5, 6)), [0, 1, 1])
    assert report.max_error < 1e-6, report.table()


# ---------------------------------------------------------------- PyTorch autograd
@pytest.mark.parametrize(
    "shape, out_channels, kernel, stride, padding",
    [
        ((3, 2, 9, 8), 4, 3, 1, 0),
        ((2, 3, 10, 10), 5, 5, 2, 2),
        ((4, 1, 28, 28), 32, 3, 1, "same"),
        ((2, 2, 7, 7), 3, 1, 3, 0),
    ],
)
def test_conv2d_equals_pytorch_autograd(shape, out_channels, kernel, stride, padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    layer = xn.Conv2D(shape[1], out_channels, kernel, stride=stride, padding=padding)
    model = _model([layer])
    W, b = np.array(layer.params["W"]), np.array(layer.params["b"])
    y = model.forward(x, training=True)
    tx, tW, tb = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
    ty = torch.nn.functional.conv2d(tx, tW, tb, stride=stride, padding=layer.pad)
    dy = rng.normal(size=tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    dx = model.backward(dy, input_grad=True)
    for mine, theirs in ((y, ty), (dx, tx.grad), (layer.grads["W"], tW.grad), (layer.grads["b"], tb.grad)):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("size, stride", [(2, None), (3, 2), (2, 1), (3, 3)])
def test_pooling_equals_pytorch_autograd_ties_included(kind, size, stride):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=(2, 3, 8, 9)), 0)  # many ties: the first maximum must win, as in PyTorch
    layer = (xn.MaxPool2D if kind == "max" else xn.AvgPool2D)(size, stride)
    model = _model([layer])
    y = model.forward(x, training=True)
    tx = torch.tensor(x, requires_grad=True)
    pool = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    ty = pool(tx, size, stride or size)
    dy = rng.normal(size=tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.backward(dy, input_grad=True), tx.grad.numpy(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ every backend
def test_the_layers_keep_namespace_device_and_dtype_on_every_backend(backend):
    device = xn.Device(backend)
    rng = np.random.default_rng(4)
    layers = [
        xn.Conv2D(1, 4, 3, padding=1),
        xn.ReLU(),
        xn.MaxPool2D(2),
        xn.Conv2D(4, 4, 3, stride=2),
        xn.AvgPool2D(1),
        xn.GlobalAvgPool2D(),
        xn.Dense(4, 3),
    ]
    model = xn.Sequential(layers, device=device, seed=0)
    reference = xn.Sequential([type(layer)(**layer.config()) for layer in layers], seed=0)
    x = rng.normal(size=(5, 1, 11, 11)).astype(np.float32)
    out = model.forward(on(device, x), training=True)
    assert_on_device(device, out, "float32")
    dx = model.backward(on(device, np.ones((5, 3))), input_grad=True)
    assert_on_device(device, dx, "float32")
    for layer in model.layers:
        for grad in layer.grads.values():
            assert_on_device(device, grad, "float32")
    np.testing.assert_allclose(host(device, out), reference.forward(x, training=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        host(device, dx), reference.backward(np.ones((5, 3), np.float32), input_grad=True), rtol=1e-4, atol=1e-6
    )


def test_a_cnn_trains_and_round_trips_through_config_and_checkpoint(tmp_path):
    from xpnet.io import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].sum(axis=(1, 2)) > x[:, 0, 4:].sum(axis=(1, 2))).astype(int)
    model = xn.Sequential(
        [xn.Conv2D(1, 4, 3, padding="same"), xn.ReLU(), xn.MaxPool2D(2), xn.Flatten(), xn.Dense(64, 2)], seed=0
    )
    history = xn.fit(model, "cross_entropy", xn.Adam(0.01), x, y, epochs=8, batch_size=16)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    save_checkpoint(tmp_path / "cnn.safetensors", model)
    rebuilt = load_checkpoint(tmp_path / "cnn.safetensors").build_model()
    assert rebuilt.config() == model.config()
    np.testing.assert_array_equal(xn.predict(rebuilt, x), xn.predict(model, x))


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: xn.Conv2D(0, 2, 3), r"^Conv2D in_channels must be a positive integer, got 0$"),
        (lambda: xn.Conv2D(1, 2, 2, padding="same"), r"^Conv2D padding 'same' needs stride 1 and an odd kernel_size"),
        (lambda: xn.Conv2D(1, 2, 3, padding=-1), r"^Conv2D padding must be a non-negative integer, 'same' or 'valid'"),
        (lambda: xn.Conv2D(1, 2, 3, stride=True), r"^Conv2D stride must be a positive integer, got True$"),
        (lambda: xn.MaxPool2D(0), r"^MaxPool2D size must be a positive integer, got 0$"),
        (lambda: xn.AvgPool2D(2, stride=2.5), r"^AvgPool2D stride must be a positive integer, got 2.5$"),
    ],
)
def test_bad_layer_arguments_are_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_images_name_the_input_and_what_the_layer_takes():
    model = xn.Sequential([xn.Conv2D(1, 2, 3), xn.ReLU(), xn.Flatten(), xn.Dense(2 * 3 * 3, 2)], seed=0)
    with pytest.raises(ValueError, match=r"^x has shape \(2, 25\), but Conv2D\(.*\) takes images of shape"):
        model.forward(np.zeros((2, 25), np.float32))
    with pytest.raises(ValueError, match=r"^x has 3 channels \(shape \(2, 3, 5, 5\)\), but Conv2D\(.*\) takes 1$"):
        model.forward(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"^x has images of 2×2, smaller than the 3×3 Conv2D"):
        model.forward(np.zeros((2, 1, 2, 2), np.float32))
    pool = xn.Sequential([xn.MaxPool2D(3)])
    with pytest.raises(ValueError, match=r"^x has images of 2×4, smaller than the 3×3 MaxPool2D"):
        pool.forward(np.zeros((1, 1, 2, 4), np.float32))


def test_the_mnist_cnn_has_the_well_known_shape():
    model = xn.cnn(seed=0)
    assert model.num_parameters() == 34_826
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten", "Dropout", "Dense"]
    with_bn = xn.cnn(batch_norm=True, seed=0)
    assert [type(layer).__name__ for layer in with_bn.layers][:3] == ["Conv2D", "BatchNorm", "ReLU"]
    assert with_bn.num_parameters() == 34_826 - 32 - 64 + 2 * (32 + 64)  # no conv bias; γ and β per channel
    out = model.forward(np.zeros((2, 1, 28, 28), np.float32))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match=r"^cnn needs images of at least 10×10, got 8×8$"):
        xn.cnn(image_size=8)


@pytest.mark.parametrize("chunk", [1, 3, 8, 128])
def test_the_reference_convolution_is_the_same_at_any_chunk_size(chunk):
    """The Array API convolution goes a chunk of images at a time (8 on the CPU, CupyOps' 128 on a
    GPU): the chunk changes how many columns are held, not the result."""
    import array_api_compat.numpy as anp

    from xpnet.backends.cupy import CupyOps
    from xpnet.ops import Ops

    assert CupyOps.conv_chunk == 128 and Ops.conv_chunk == 8
    ops = Ops(anp)
    ops.conv_chunk = chunk
    rng = np.random.default_rng(chunk)
    x, W, b = rng.normal(size=(11, 3, 9, 8)), rng.normal(size=(5, 3, 3, 3)), rng.normal(size=5)
    dy = rng.normal(size=(11, 5, 5, 4))  # (9 + 2 − 3) // 2 + 1 by (8 + 2 − 3) // 2 + 1
    whole = Ops(anp)
    whole.conv_chunk = 11
    np.testing.assert_allclose(
        ops.conv2d(x, W, b, stride=2, padding=1), whole.conv2d(x, W, b, stride=2, padding=1), rtol=1e-12
    )
    got = ops.conv2d_backward(dy, x, W, stride=2, padding=1, bias=True, need_dx=True)
    want = whole.conv2d_backward(dy, x, W, stride=2, padding=1, bias=True, need_dx=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
