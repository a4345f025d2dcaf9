"""Sequential: layers applied in order, and backpropagation through them in reverse.

Forward:  a⁰ = x,  aˡ = layerˡ(aˡ⁻¹).
Backward: δ from the loss enters the last layer; each layer stores its parameter gradients and
hands ∂L/∂(its input) to the layer before it. All gradients are computed before any update.

``forward`` takes arrays on the model's device in its dtype, host NumPy arrays of that dtype
(moved to the device) and nested lists (made arrays in the model's dtype); ``backward`` takes a δ
of the shape and dtype of the last output. Anything else is refused with a message naming it.
"""

from __future__ import annotations

import contextlib
import math

from .backend import Device, dtype_name, get_device, is_device_array
from .layers import Dense, Dropout, Layer, build_in_order, layer_from_spec, layer_registry, layer_spec, walk
from .parameters import ParameterStore, placed

__all__ = ["Sequential", "mlp", "cnn"]


class Sequential:
    """A feed-forward network: ``Sequential([Dense(784, 128), ReLU(), ...], device="cpu")``.

    Parameters are named ``"{index}.{name}"`` after the layer's position, e.g. ``"0.W"``.
    ``seed`` (0 when a device string is given) restarts the device's random streams, so the
    initial weights, batch order and dropout masks follow from it.
    """

    def __init__(self, layers, *, device: Device | str = "cpu", dtype: str = "float32", seed: int | None = None):
        self.layers: list[Layer] = list(layers)
        for layer in self.layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer objects, got {layer!r}")
        seen: dict = {}
        for prefix, layer in walk(self.layers):  # one place in one model for each layer object
            if getattr(layer, "_adopted", False):
                raise ValueError(
                    f"layer {prefix} ({layer!r:.100}) is already in another model: a layer's parameters belong to one "
                    "model; make another layer (type(layer)(**layer.config()))"
                )
            if id(layer) in seen:
                raise ValueError(
                    f"layer {prefix} is the same {type(layer).__name__} object as layer {seen[id(layer)]}: each place "
                    "in a model needs its own layer"
                )
            seen[id(layer)] = prefix
        self.device = get_device(device, seed=seed)
        self.xp = self.device.xp
        self.dtype = self.device.dtype(dtype)
        with self.device:
            build_in_order(self.layers, self.device, self.dtype)
        first = [i for i, layer in enumerate(self.layers) if any(inner.params for _, inner in walk([layer]))]
        self._first_trainable = first[0] if first else len(self.layers)
        with self.device:
            #: Parameters, gradients and optimizer slots, in the layout the device's Ops ask for.
            self.store = ParameterStore(self.layers, self.device.ops, self.dtype, self.device.owns, self.device.name)
        self._slots = [(entry.key, entry.layer, entry.name) for entry in self.store.entries]
        self.named_state()  # layer state as built: arrays of the model's device, named apart from parameters
        self._array_type = _array_type(self.device)
        self._output_shape = None  # of the last forward pass: the shape backward's δ must have
        self._pending = False  # a training pass has run and its backward has not
        self._input_width, self._flattens = None, False
        for layer in self.layers:  # the features per example the first layer of fixed width takes, seen through ...
            if layer.flattens:
                self._flattens = True
            elif layer.input_features is not None:
                self._input_width = layer.input_features
                if not self._flattens:  # ... elementwise layers: its errors are then about x itself
                    layer.input_name = "x"
                break
            elif not layer.keeps_shape:
                break
        if self.layers and self.layers[0].input_name is None:  # the first layer's input is x itself
            self.layers[0].input_name = "x"
        #: Positions i where layer i can compute layer i + 1 (an activation) in its own pass: each
        #: layer declares what it is (``activation``) and what it can absorb (``fusable_activations``).
        self._fusable = {
            i for i, (layer, after) in enumerate(zip(self.layers, self.layers[1:])) if _fuses(layer, after)
        }
        #: (layer, the activation it is asked to compute, whether its own is applied already) for the
        #: fused training pass; only "relu" is ever fused, so one ``ops.fuses("relu")`` decides it.
        self._fused_plan = [
            (layer, self.layers[i + 1].activation if i in self._fusable else None, i - 1 in self._fusable)
            for i, layer in enumerate(self.layers)
        ]

    # -------------------------------------------------------------- passes
    def forward(self, x, training: bool = False):
        """The model's output for x. An evaluation pass that comes after a training pass and
        before its backward is an aside: it leaves what the training pass stored, so the backward
        gives that pass's gradients (``forget_pass`` when no backward will come)."""
        if type(x) is not self._array_type or x.dtype != self.dtype:  # (one check per step in fit)
            x = self._as_input(x)
        if not training and self._pending:  # between a training pass and its backward
            return self._forward_aside(x)
        with self.device:
            if training and self._fusable and self.device.ops.fuses("relu"):
                x = self._forward_fused(x)
            else:
                for layer in self.layers:
                    x = layer.forward(x, training)
        self._output_shape = x.shape
        self._pending = training
        return x

    def forget_pass(self) -> None:
        """Forget the pending training pass (one whose backward will not come): the next evaluation
        pass is then one a backward may follow, not an aside (see ``forward``)."""
        self._pending = False

    def _forward_aside(self, x):
        """An evaluation pass that leaves what the pending training pass stored for its backward
        (each layer's inputs, outputs and masks) as it was: the gradients come out the same."""
        every = [layer for _, layer in walk(self.layers)]
        kept = [_per_call_state(layer) for layer in every]
        shape, self._pending = self._output_shape, False
        try:
            return self.forward(x, training=False)
        finally:
            for layer, state in zip(every, kept):
                vars(layer).clear()
                vars(layer).update(state)
            self._output_shape, self._pending = shape, True

    def _forward_fused(self, x):
        """The training pass where the Ops compute a layer's activation in that layer's own pass:
        the layer (a Dense) is asked for it, and the activation layer told it is applied."""
        for layer, activation, applied in self._fused_plan:
            if activation is not None:
                x = layer.forward(x, True, activation=activation)
            elif applied:
                x = layer.forward(x, True, applied=True)
            else:
                x = layer.forward(x, True)
        return x

    def _as_input(self, x):
        """x made an input: lists become arrays in the model's dtype, host NumPy arrays of the
        model's dtype move to its device; arrays of another dtype are refused, never cast."""
        device, want = self.device, dtype_name(self.dtype)
        if x is None:
            raise TypeError("x must be an array of shape (batch, features) on the model's device, got None")
        if device.owns(x):
            host = x
        elif is_device_array(x):
            raise TypeError(
                f"x is an array on another device; forward takes an array on the model's device "
                f"({device.name}): move it with model.device.to_device(x, model.dtype)"
            )
        else:  # NumPy arrays as they are; lists, tuples and other array-likes as NumPy reads them
            try:
                host = device.to_host(x)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"x is not a rectangular array ({exc})") from None
            if host is not x and dtype_kind(host.dtype) in "biuf":  # not an array: made one, in the model's dtype
                return device.to_device(host, self.dtype)
        kind = dtype_kind(host.dtype)
        if kind not in "biuf":
            raise TypeError(f"x has dtype {host.dtype} ({_KINDS.get(kind, 'not numbers')}); the model takes numbers")
        if dtype_name(host.dtype) != want:
            raise TypeError(
                f"x has dtype {dtype_name(host.dtype)}, which does not match the model's {want}; move data with "
                "model.device.to_device(x, dtype=model.dtype) (xpnet never casts arrays silently)"
            )
        return host if device.owns(host) else device.to_device(host)

    def check_input_shape(self, shape, name: str = "x") -> None:
        """ValueError (naming ``name``) unless ``shape`` is that of a batch the model takes: one
        row per example with the first Dense layer's in_features (after any Flatten)."""
        shape, width = tuple(shape), self._input_width
        if len(shape) == 0:
            raise ValueError(f"{name} must have one row per example, got shape {shape}")
        if width is None:
            return
        if self._flattens:
            if len(shape) < 2 or math.prod(shape[1:]) != width:
                raise ValueError(
                    f"{name} has shape {shape}, but the model expects {width} values per example "
                    f"(flattened to shape (batch, {width}))"
                )
        elif len(shape) != 2 or shape[1] != width:
            raise ValueError(f"{name} has shape {shape}, but the model expects input of shape (batch, {width})")

    def backward(self, delta, *, input_grad: bool = False):
        """Backpropagate δ = ∂L/∂output; return ∂L/∂input when ``input_grad`` is set.

        Layers before the first one with parameters are skipped, and that layer does not
        compute its input gradient, unless ``input_grad`` asks for it.
        """
        expected = self._output_shape
        if expected is not None and (getattr(delta, "shape", None) != expected or delta.dtype != self.dtype):
            self._refuse_delta(delta, expected)
        stop = 0 if input_grad else self._first_trainable
        self._pending = False
        with self.device:
            for i in range(len(self.layers) - 1, stop - 1, -1):
                delta = self.layers[i].backward(delta, need_input_grad=input_grad or i > stop)
        return delta if input_grad else None

    def _refuse_delta(self, delta, expected) -> None:
        shape = getattr(delta, "shape", None)
        if shape is None:
            raise TypeError(
                f"delta must be an array of shape {tuple(expected)} (∂L/∂output), got {type(delta).__name__}"
            )
        if tuple(shape) != tuple(expected):
            raise ValueError(
                f"delta has shape {tuple(shape)}, expected {tuple(expected)}: backward takes ∂L/∂output, "
                "shaped like the output of the last forward pass"
            )
        raise TypeError(f"delta has dtype {dtype_name(delta.dtype)}, expected {dtype_name(self.dtype)} (the model's)")

    @contextlib.contextmanager
    def reusing_buffers(self):
        """Within this, training-mode outputs may live in buffers reused every step (fit's loop,
        which consumes each step's arrays before the next): the device's Ops in ``reusing()``."""
        with self.device.ops.reusing():  # (the store keeps every parameter at its shape)
            yield self

    # ---------------------------------------------------------- parameters
    def parameter_slots(self):
        """(key, layer, name) for every parameter, in order."""
        return self._slots

    def named_parameters(self) -> dict:
        return self.store.named_values()

    def named_gradients(self) -> dict:
        return self.store.named_grads()

    def named_state(self) -> dict:
        """Every layer's non-trainable arrays (``Layer.state``), by "{index}.{name}", as the layers
        hold them now (state a layer makes after it is built counts too). A name that is also a
        parameter's, or a value that is not an array of the model's device, is a ValueError."""
        found = {}
        for prefix, layer in walk(self.layers):
            for name, value in layer.state.items():
                if name in layer.params:
                    raise ValueError(
                        f"layer {prefix} ({type(layer).__name__}) has {name!r} both as a parameter and as state"
                    )
                if not (hasattr(value, "shape") and hasattr(value, "dtype")) or not self.device.owns(value):
                    raise ValueError(
                        f"layer {prefix} ({type(layer).__name__}) holds state {name!r} that is not an array of the "
                        f"model's device ({self.device.name}): {type(value).__name__}"
                    )
                found[f"{prefix}.{name}"] = value
        return found

    def num_parameters(self) -> int:
        return self.store.total

    def state_dict(self) -> dict:
        """A copy of every parameter and every layer's state (``Layer.state``), by key, on the
        model's device."""
        with self.device:
            arrays = {**self.named_parameters(), **self.named_state()}
            return {key: self.xp.asarray(p, copy=True) for key, p in arrays.items()}

    def load_state_dict(self, state: dict) -> None:
        """Copy parameters and layer state in from ``state`` (arrays of any backend); keys and
        shapes must match. Everything is checked before anything is written, so a mismatch
        leaves the model as it was."""
        if not isinstance(state, dict):
            raise TypeError(f"a state dict is a dict of arrays by key, got {type(state).__name__}")
        current = {**self.named_parameters(), **self.named_state()}
        missing, unexpected = set(current) - set(state), set(state) - set(current)
        if missing or unexpected:
            raise ValueError(
                f"state dict does not fit this model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        staged = {}
        for key, now in current.items():
            value = self.device.to_device(state[key], now.dtype, copy=True)
            if tuple(value.shape) != tuple(now.shape):
                kind = "parameter" if key in self.store.by_key else "state"
                raise ValueError(
                    f"{kind} {key!r} has shape {tuple(value.shape)} in the state dict but "
                    f"{tuple(now.shape)} in the model"
                )
            staged[key] = value
        with self.device:
            for key, _, _ in self._slots:
                self.store.assign(key, staged[key])
            states = {f"{prefix}.{name}": (layer, name) for prefix, layer in walk(self.layers) for name in layer.state}
            for key, (layer, name) in states.items():
                layer.state[name] = placed(layer.state[name], staged[key], self.store.writable)

    # -------------------------------------------------------- description
    def config(self) -> dict:
        """The architecture as plain data (JSON): ``Sequential.from_config`` rebuilds it.

        Each layer is ``{"type": <the name its class is registered under>, **layer.config()}``.
        A layer whose class is not registered, or whose config is not JSON constructor keyword
        arguments, is refused here (ValueError), not when the saved model fails to load.
        """
        specs = [layer_spec(layer, f"layer {i}") for i, layer in enumerate(self.layers)]
        return {"layers": specs, "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_config(cls, config: dict, *, device: Device | str = "cpu", seed: int | None = None) -> Sequential:
        """The model ``config`` describes (from ``Sequential.config``), each layer rebuilt through
        the layer registry with fresh parameters: load saved ones with ``load_state_dict``."""
        if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
            raise ValueError("a model config must be a dict with a list of layers under 'layers'")
        layers = []
        for i, spec in enumerate(config["layers"]):
            if not isinstance(spec, dict) or "type" not in spec:
                raise ValueError(f"layer {i} of the model config must be a dict with a 'type', got {spec!r:.200}")
            layers.append(layer_from_spec(spec, f"layer {i}"))
        return cls(layers, device=device, dtype=config.get("dtype", "float32"), seed=seed)

    def summary(self) -> str:
        rows = [f"{'#':>3}  {'layer':<34} {'parameters':>12}"]
        for i, layer in enumerate(self.layers):
            count = sum(math.prod(p.shape) for _, inner in walk([layer]) for p in inner.params.values())
            rows.append(f"{i:>3}  {layer!r:<34} {count:>12,}")
        rows.append(f"     {'total':<34} {self.num_parameters():>12,}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential([{inner}], device={self.device.name!r})"


def _per_call_state(layer) -> dict:
    """A copy of what a layer holds between its forward and backward: its attributes, dicts and
    lists among them copied one level (a cache dict filled in place); its parameters, gradients,
    state and Ops scratch as they are (they are not per-call state)."""
    state = dict(vars(layer))
    for key, value in state.items():
        if key not in ("_params", "_grads", "scratch", "state") and isinstance(value, (dict, list)):
            state[key] = type(value)(value)
    return state


def _fuses(layer, after) -> bool:
    """Whether ``layer`` can compute ``after`` in its own pass: both declare it on their own class
    (a subclass that changes forward does not inherit the capability)."""
    own = type(layer).__dict__.get("fusable_activations", ())
    activation = type(after).__dict__.get("activation")
    return activation is not None and activation in own


_KINDS = {"U": "text", "S": "bytes", "O": "Python objects", "M": "dates", "m": "time spans", "c": "complex numbers"}


def dtype_kind(dtype) -> str:
    """NumPy's kind letter for a dtype of any backend: 'f' floating, 'i' / 'u' integer, 'b' bool,
    'c' complex, 'U' text, 'O' objects, ... ('?' when it cannot be told)."""
    kind = getattr(dtype, "kind", None)  # NumPy's and CuPy's dtypes
    if isinstance(kind, str):
        return kind
    name = dtype_name(dtype)
    for prefix, letter in (("bool", "b"), ("uint", "u"), ("int", "i"), ("float", "f"), ("complex", "c")):
        if name.startswith(prefix):
            return letter
    return "?"


def _array_type(device: Device) -> type:
    """The array type of the device's namespace (what fit's batches are)."""
    return type(device.to_device([0.0], "float32"))


ACTIVATIONS = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def mlp(
    n_inputs: int,
    hidden: list[int] | tuple[int, ...],
    n_outputs: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    device: Device | str = "cpu",
    dtype: str = "float32",
    seed: int | None = None,
) -> Sequential:
    """A multilayer perceptron: Dense → activation (→ Dropout) per hidden size, then Dense to the
    outputs (logits: pair with SoftmaxCrossEntropy, or one output with BinaryCrossEntropy).

    ``mlp(784, [128, 64], 10)`` is the 784-128-64-10 ReLU network (109,386 parameters).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    layers: list[Layer] = []
    width = n_inputs
    for size in hidden:
        layers += [Dense(width, size), layer_registry.lookup(ACTIVATIONS[activation])()]
        if dropout:
            layers.append(Dropout(dropout))
        width = size
    layers.append(Dense(width, n_outputs))
    return Sequential(layers, device=device, dtype=dtype, seed=seed)


def cnn(
    *,
    batch_norm: bool = False,
    in_channels: int = 1,
    image_size: int = 28,
    n_outputs: int = 10,
    dropout: float = 0.5,
    device: Device | str = "cpu",
    dtype: str = "float32",
    seed: int | None = None,
) -> Sequential:
    """The well-known small MNIST convolutional network (34,826 parameters on 28×28 images):

        conv 32 3×3 → ReLU → max-pool 2 → conv 64 3×3 → ReLU → max-pool 2 → flatten → dropout 0.5 → dense 10

    With ``batch_norm``, a BatchNorm after each convolution (its bias then dropped: the batch mean
    takes it out). Images come as (batch, in_channels, image_size, image_size)."""
    from .conv import Conv2D, MaxPool2D
    from .layers import Flatten
    from .normalization import BatchNorm

    side = ((image_size - 2) // 2 - 2) // 2  # each 3×3 convolution takes 2, each pooling halves
    if side < 1:
        raise ValueError(f"cnn needs images of at least 10×10, got {image_size}×{image_size}")
    layers: list[Layer] = []
    for c_in, c_out in ((in_channels, 32), (32, 64)):
        layers.append(Conv2D(c_in, c_out, 3, bias=not batch_norm))
        if batch_norm:
            layers.append(BatchNorm(c_out))
        layers += [layer_registry.lookup("ReLU")(), MaxPool2D(2)]
    layers.append(Flatten())
    if dropout:
        layers.append(Dropout(dropout))
    layers.append(Dense(64 * side * side, n_outputs))
    return Sequential(layers, device=device, dtype=dtype, seed=seed)
