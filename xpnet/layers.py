"""Layers: each one a function of its input with its own forward and backward pass.

Activations are batch-major: a batch of B examples with n features is a (B, n) array, so the
math of one example (a column vector x) becomes a row of the batch. A layer

* ``forward(x, training)`` computes its output and keeps what its backward pass needs;
* ``backward(dy)`` receives δ = ∂L/∂y for its output, stores ∂L/∂θ for each parameter θ in
  ``grads`` and returns ∂L/∂x for its input (skipped when ``need_input_grad`` is False, as it
  is for the first layer of a network: nothing uses it). A δ whose shape differs from the output
  of the last forward pass is refused with a ValueError (a shape comparison).

All computation goes through ``self.xp``, the namespace of the device the layer was built on, and
``self.ops`` (xpnet.ops): Dense and ReLU ask Ops for the affine map and the activation, whose
reference is plain Array API code and which a backend may run faster (buffers reused within fit,
Dense and ReLU in one pass). No layer knows which.

A layer class is saved and rebuilt by the name it is registered under: the built-in layers
register themselves, and a layer of your own joins them with ``@xpnet.register_layer``. Its
``config()`` returns the keyword arguments that rebuild it, as JSON values.
"""

from __future__ import annotations

import json
import math

from . import functional as F
from .initializers import get_initializer
from .registry import Registry

__all__ = [
    "Layer",
    "Residual",
    "walk",
    "layer_registry",
    "register_layer",
    "Dense",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Dropout",
    "Flatten",
]


def _misshapen(layer, delta, expected) -> None:
    """The ValueError for a δ that does not have the shape of the layer's last output."""
    raise ValueError(
        f"{type(layer).__name__}.backward: delta has shape {tuple(delta.shape)}, expected {tuple(expected)} "
        "(the shape of the output of its last forward pass)"
    )


class Layer:
    """Base class: parameters and their gradients by name, state, and the device computed on.

    * ``params``: the trainable arrays by name, made in ``build`` (``self.params["W"] = ...``).
      Once the layer is in a model, ``params`` and ``grads`` are windows onto the model's
      parameter store (xpnet.parameters): assign items as reference code does
      (``self.grads["W"] = delta.T @ x``); the store checks shape and dtype and keeps its layout.
    * ``no_decay``: the names of parameters weight decay does not apply to (Dense: its bias).
    * ``state``: non-trainable arrays by name (running statistics): saved in ``state_dict`` and
      checkpoints beside the parameters, under the same "{index}.{name}" keys, never optimized.
    """

    #: The initializer a Dense layer feeding this layer uses by default (None: look further on).
    default_init = "xavier_uniform"
    #: Parameters weight decay leaves alone (optimizers read it as ``Parameter.decay``).
    no_decay: tuple[str, ...] = ()
    #: Whether the output has the input's shape (elementwise layers): the model sees its input
    #: width through such layers.
    keeps_shape = False
    #: Whether the layer flattens each example to one row (Flatten).
    flattens = False
    #: The features per example the layer takes, when it takes rows of a fixed width (Dense).
    input_features: int | None = None
    #: Set by Sequential on the layer that receives the model's input: errors then name it "x".
    input_name: str | None = None
    #: The layers inside this one (a block such as Residual), whose parameters and state are the
    #: model's too, under the keys "{index}.{inner index}.{name}".
    sublayers: tuple = ()

    def __init__(self):
        self._params: dict = {}
        self._grads: dict = {}
        self._adopted = False
        self.state: dict = {}
        self.device = None
        self.xp = None
        #: The device's Ops (xpnet.ops): the primitives this layer computes with.
        self.ops = None
        #: Where the Ops may keep arrays they reuse from step to step for this layer (``site=``).
        self.scratch: dict = {}

    @property
    def params(self) -> dict:
        return self._params

    @params.setter
    def params(self, value) -> None:
        self._replace("params", value)

    @property
    def grads(self) -> dict:
        return self._grads

    @grads.setter
    def grads(self, value) -> None:
        self._replace("grads", value)

    def _replace(self, what: str, value) -> None:
        if getattr(self, "_adopted", False):
            raise AttributeError(
                f"{type(self).__name__}.{what} belongs to the model's parameter store: assign its items "
                f"(layer.{what}['W'] = array) or load with model.load_state_dict, not a new dict"
            )
        setattr(self, "_" + what, value)

    def _adopt(self, params: dict, grads: dict) -> None:
        """Called once by the model's parameter store: the windows onto it replace the dicts."""
        self._params, self._grads, self._adopted = params, grads, True

    def build(self, device, dtype, next_layer: Layer | None = None) -> None:
        """Attach the layer to ``device`` and create its parameters in ``dtype``."""
        self.device = device
        self.xp = device.xp
        self.dtype = dtype
        self.ops = device.ops

    #: What this layer is when it is an elementwise activation a layer before it may compute in
    #: its own pass ("relu"), else None.
    activation = None
    #: The ``activation`` values of a following layer this layer can compute in its own pass,
    #: when the model asks it to (``forward(x, training, activation=...)``) because the Ops fuse them.
    fusable_activations: tuple[str, ...] = ()

    def forward(self, x, training: bool = False):
        raise NotImplementedError

    def backward(self, dy, need_input_grad: bool = True):
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor keyword arguments that rebuild this layer, as JSON values (numbers,
        strings, booleans, None, lists, dicts): ``type(layer)(**layer.config())`` is the same
        layer before training. Saved architectures are these and the registered name."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


#: Layer classes by name: what a model config's ``"type"`` names (``Sequential.from_config``).
layer_registry = Registry("layer", Layer, noun="layer type", use="loaded")


def register_layer(cls=None, *, name: str | None = None):
    """Register a Layer subclass under ``name`` (by default its class name), so that saved
    configs and checkpoints that name it rebuild it: ``@xpnet.register_layer`` or
    ``@xpnet.register_layer(name="...")``. Returns the class unchanged.

    A different class under a taken name is refused with a ValueError naming both; registering
    the same class again does nothing."""
    return layer_registry.register(cls, name=name)


def walk(layers, prefix: str = ""):
    """(key prefix, layer) for each layer and, after it, each layer inside it: "0", "1", "1.0", ..."""
    for i, layer in enumerate(layers):
        name = f"{prefix}{i}"
        yield name, layer
        yield from walk(layer.sublayers, name + ".")


def layer_spec(layer: Layer, where: str) -> dict:
    """``{"type": <registered name>, **layer.config()}``, checked: a layer whose class is not
    registered, or whose config is not JSON constructor keyword arguments, is refused here
    (ValueError naming ``where``), not when a saved model fails to load."""
    kind = layer_registry.name_of(type(layer))
    if kind is None:
        raise ValueError(
            f"{where} ({type(layer).__qualname__}) cannot be saved: its class is not registered, so "
            "a saved model could not rebuild it; decorate the class with @xpnet.register_layer"
        )
    args = layer.config()
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args) or "type" in args:
        raise ValueError(
            f"{where} ({kind}): config() must return a dict of constructor keyword arguments "
            f"(not including 'type'), got {args!r:.200}"
        )
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where} ({kind}): config() must return JSON values (numbers, strings, booleans, None, "
            f"lists, dicts), got {args!r:.200} ({exc})"
        ) from None
    return {"type": kind, **args}


def layer_from_spec(spec, where: str) -> Layer:
    """The layer a ``layer_spec`` describes, its class found in the layer registry."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{where} must be a dict with a 'type', got {spec!r:.200}")
    spec = dict(spec)
    kind = spec.pop("type")
    layer_class = layer_registry.lookup(kind, where=" in the model config")
    try:
        return layer_class(**spec)
    except TypeError as exc:
        raise ValueError(f"{where} ({kind}) cannot be rebuilt from its config {spec!r:.200}: {exc}") from None


def build_in_order(layers, device, dtype, after: Layer | None = None) -> None:
    """Build each layer with the layer its weights feed: the next one with a ``default_init``
    (looking through Dropout, Flatten, pooling), else ``after`` (what follows the list)."""
    for i, layer in enumerate(layers):
        following = next((later for later in layers[i + 1 :] if later.default_init), after)
        layer.build(device, dtype, following)


class _Weighted(Layer):
    """A layer with a weight W and, when ``bias`` is set, a bias b per row of W (Dense, Conv2D):
    their initialization, their weight decay (W takes it, b does not) and their gradients."""

    @property
    def no_decay(self) -> tuple:
        return ("b",) if self.bias else ()

    def _make_weights(self, device, dtype, next_layer, shape) -> None:
        """W of ``shape`` from ``init`` ("auto": He before ReLU-like units, Xavier before the rest
        and at the output) and b of zeros."""
        name = self.init
        if name == "auto":
            name = next_layer.default_init if next_layer is not None else Layer.default_init
        self.params["W"] = get_initializer(name)(device, shape, dtype)
        if self.bias:
            self.params["b"] = get_initializer("zeros")(device, (shape[0],), dtype)

    def _hand_over(self, dW, db, dx):
        """Give the store ∂L/∂W and ∂L/∂b; return ∂L/∂x."""
        self.grads["W"] = dW
        if self.bias:
            self.grads["b"] = db
        return dx


@register_layer
class Dense(_Weighted):
    """A fully connected layer: z = W·x + b for each example, z = x Wᵀ + b for a batch.

    W is shaped (out_features, in_features): row j holds the weights of neuron j.
    Backward, with δ = ∂L/∂z of shape (B, out):
        ∂L/∂W = δᵀ x      (the sum over the batch of δ aᵀ)
        ∂L/∂b = Σ_batch δ
        ∂L/∂x = δ W       (the batch form of Wᵀ δ)
    """

    def __init__(self, in_features: int, out_features: int, *, init: str = "auto", bias: bool = True):
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Dense {label} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.bias = bias
        self.x = None

    @property
    def input_features(self) -> int:
        return self.in_features

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        self._make_weights(device, dtype, next_layer, (self.out_features, self.in_features))

    fusable_activations = ("relu",)

    def forward(self, x, training=False, *, activation=None):
        """z = x Wᵀ + b through ``Ops.affine``; with ``activation`` (asked by the model when the
        next layer is that activation and the Ops fuse it), the activation of z in the same pass."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            if self.input_name is not None:
                raise ValueError(
                    f"{self.input_name} has shape {tuple(x.shape)}, but the model expects input of shape "
                    f"(batch, {self.in_features}) (its first layer is {self!r})"
                )
            raise ValueError(
                f"Dense({self.in_features}, {self.out_features}) expects input of shape "
                f"(batch, {self.in_features}), got {tuple(x.shape)}"
            )
        self.x = x
        site = self.scratch if training else None  # evaluation outputs are always new arrays
        return self.ops.affine(x, self.params["W"], self.params.get("b"), activation=activation, site=site)

    def backward(self, delta, need_input_grad=True):
        """∂L/∂W = δᵀ x, ∂L/∂b = Σ δ, ∂L/∂x = δ W (``Ops.affine_backward``)."""
        if self.x is None:
            raise RuntimeError("Dense.backward called before forward: run model.forward on the batch first")
        if delta.shape != (self.x.shape[0], self.out_features):
            _misshapen(self, delta, (self.x.shape[0], self.out_features))
        dW, db, dx = self.ops.affine_backward(
            delta,
            self.x,
            self.params["W"],
            bias=self.bias,
            need_dx=need_input_grad,
            dW=self.grads.get("W"),
            db=self.grads.get("b"),
            site=self.scratch,
        )
        return self._hand_over(dW, db, dx)

    def config(self):
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "init": self.init,
            "bias": self.bias,
        }


@register_layer
class ReLU(Layer):
    """a = max(z, 0); σ'(z) = 1 where z > 0, else 0 (``Ops.relu``, ``Ops.relu_backward``)."""

    default_init = "he_normal"
    activation = "relu"
    keeps_shape = True

    def forward(self, z, training=False, *, applied=False):
        """``applied``: the layer before computed max(z, 0) in its own pass (the model asked it to)."""
        self.a = z if applied else self.ops.relu(z, site=self.scratch if training else None)
        return self.a  # a > 0 exactly where z > 0: backward needs only a

    def backward(self, da, need_input_grad=True):
        if da.shape != self.a.shape:
            _misshapen(self, da, self.a.shape)
        return self.ops.relu_backward(da, self.a, site=self.scratch)


@register_layer
class LeakyReLU(Layer):
    """a = z for z > 0, αz otherwise; σ'(z) = 1 or α."""

    default_init = "he_normal"
    keeps_shape = True

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, z, training=False):
        self.z = z
        return self.xp.where(z > 0, z, self.alpha * z)

    def backward(self, da, need_input_grad=True):
        if da.shape != self.z.shape:
            _misshapen(self, da, self.z.shape)
        return self.xp.where(self.z > 0, da, self.alpha * da)

    def config(self):
        return {"alpha": self.alpha}


@register_layer
class Sigmoid(Layer):
    """a = σ(z) = 1 / (1 + e^(−z)) (computed stably); σ'(z) = a (1 − a)."""

    keeps_shape = True

    def forward(self, z, training=False):
        self.a = F.sigmoid(self.xp, z)
        return self.a

    def backward(self, da, need_input_grad=True):
        if da.shape != self.a.shape:
            _misshapen(self, da, self.a.shape)
        return da * self.a * (1.0 - self.a)


@register_layer
class Tanh(Layer):
    """a = tanh(z); σ'(z) = 1 − a²."""

    keeps_shape = True

    def forward(self, z, training=False):
        self.a = self.xp.tanh(z)
        return self.a

    def backward(self, da, need_input_grad=True):
        if da.shape != self.a.shape:
            _misshapen(self, da, self.a.shape)
        return da * (1.0 - self.a * self.a)


@register_layer
class Softmax(Layer):
    """p = softmax(z) row by row, for inference. (Train on logits with SoftmaxCrossEntropy,
    whose fused gradient p − y is cheaper and more accurate than this layer's backward.)

    Backward, the Jacobian-vector product: ∂L/∂z = p ⊙ (∂L/∂p − Σ_j p_j ∂L/∂p_j).
    """

    keeps_shape = True

    def forward(self, z, training=False):
        self.p = F.softmax(self.xp, z)
        return self.p

    def backward(self, dp, need_input_grad=True):
        p = self.p
        if dp.shape != p.shape:
            _misshapen(self, dp, p.shape)
        return p * (dp - self.xp.sum(dp * p, axis=-1, keepdims=True))


@register_layer
class Dropout(Layer):
    """Inverted dropout: in training, each unit is kept with probability 1 − rate and scaled by
    1 / (1 − rate), so evaluation (which passes the input through unchanged) needs no rescaling.

    Masks come from the device's counter-based stream: reproducible from the seed, and the same
    on every backend.
    """

    def __init__(self, rate: float = 0.5):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.mask = None

    default_init = None
    keeps_shape = True

    def forward(self, x, training=False):
        if not training or self.rate == 0.0:
            self.mask = None
            return x
        draw = (*self.device.next_draw(), self.device.first_row)  # a rank's rows: from their row of the batch
        y, self.mask = self.ops.dropout(x, self.rate, draw, site=self.scratch)
        return y

    def backward(self, dy, need_input_grad=True):
        if self.mask is None:
            return dy
        if dy.shape != self.mask.shape:
            _misshapen(self, dy, self.mask.shape)
        return dy * self.mask

    def config(self):
        return {"rate": self.rate}


@register_layer
class Flatten(Layer):
    """(B, d1, d2, ...) → (B, d1·d2·...); backward restores the input's shape."""

    default_init = None
    flattens = True

    def forward(self, x, training=False):
        self.shape = tuple(x.shape)
        return self.xp.reshape(x, (x.shape[0], -1))

    def backward(self, dy, need_input_grad=True):
        if tuple(dy.shape) != (self.shape[0], math.prod(self.shape[1:])):
            _misshapen(self, dy, (self.shape[0], math.prod(self.shape[1:])))
        return self.xp.reshape(dy, self.shape)


@register_layer
class Residual(Layer):
    """A residual block: y = x + f(x), f the given layers applied in order (their output must
    have x's shape). Backward: ∂L/∂x = δ + ∂f/∂xᵀ δ, the gradient through both paths.

    Its layers' parameters and state are the model's, keyed "{block index}.{inner index}.{name}"."""

    default_init = None  # a layer before the block takes the initializer of the layer after it
    keeps_shape = True

    def __init__(self, layers):
        super().__init__()
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"Residual takes a list of layers, got {layers!r:.200}")
        inner = [
            layer if isinstance(layer, Layer) else layer_from_spec(layer, f"layer {j} of a Residual block")
            for j, layer in enumerate(layers)
        ]
        if not inner:
            raise ValueError("Residual needs at least one layer")
        self.sublayers = tuple(inner)

    def build(self, device, dtype, next_layer=None):
        super().build(device, dtype, next_layer)
        build_in_order(self.sublayers, device, dtype, next_layer)  # within the block, else what follows it

    def forward(self, x, training=False):
        out = x
        for layer in self.sublayers:
            out = layer.forward(out, training)
        if out.shape != x.shape:
            raise ValueError(
                f"Residual: its layers turn input of shape {tuple(x.shape)} into {tuple(out.shape)}; "
                "y = x + f(x) needs f(x) of x's shape"
            )
        self.shape = tuple(x.shape)
        return x + out

    def backward(self, dy, need_input_grad=True):
        if tuple(dy.shape) != getattr(self, "shape", None):
            _misshapen(self, dy, getattr(self, "shape", ()))
        delta = dy
        for layer in reversed(self.sublayers):
            delta = layer.backward(delta, need_input_grad=True)
        return dy + delta

    def config(self):
        return {
            "layers": [layer_spec(layer, f"layer {j} of a Residual block") for j, layer in enumerate(self.sublayers)]
        }

    def __repr__(self) -> str:
        return f"Residual([{', '.join(repr(layer) for layer in self.sublayers)}])"
