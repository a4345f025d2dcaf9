"""Networks written as one line of text: ``from_arch("conv(32,3),relu,maxpool(2),flatten,dense(10)")``.

The grammar (whitespace is allowed around every token; names ignore case)::

    spec   := layer ("," layer)*
    layer  := NAME ["(" [arg ("," arg)*] ")"]  |  "res" "[" spec "]"
    arg    := [NAME "="] (NUMBER | NAME)

The layers, with their arguments in order (each may also be given by name, as in Python):

    conv(channels, kernel, stride=1, pad=0, bias=1)   Conv2D; pad is an integer, same or valid
    maxpool(size, stride=size)                        MaxPool2D
    avgpool(size, stride=size)                        AvgPool2D
    gap                                               GlobalAvgPool2D: (C, H, W) → (C,)
    bn(momentum=0.1, eps=1e-5)                        BatchNorm over the channels (or features)
    flatten                                           Flatten: (C, H, W) → (C·H·W,)
    dense(units, bias=1)                              Dense
    dropout(rate)                                     Dropout
    relu, leaky_relu(alpha=0.01), tanh, sigmoid       the activations (the names of --activation)
    res[layer, ...]                                   Residual: y = x + f(x), f the layers inside

The shape of one example is followed through the layers from ``input_shape``: (C, H, W) images or
(F,) rows. It gives conv and bn their input channels and dense its input features. Each problem is
an ``ArchError`` (a ValueError) of one line naming the character (1-based) where the layer or token
starts: an unknown layer, a missing, extra or malformed argument, an unbalanced bracket, an empty
spec, a kernel or window larger than the image it gets, dense on images (add flatten), a residual
block whose layers change the shape, and a last layer other than dense(n_outputs).
"""

from __future__ import annotations

import dataclasses
import math
import re

from .conv import AvgPool2D, Conv2D, GlobalAvgPool2D, MaxPool2D
from .layers import Dense, Dropout, Flatten, Layer, Residual, layer_registry
from .model import ACTIVATIONS, Sequential
from .normalization import BatchNorm

__all__ = ["ArchError", "ArchPlan", "from_arch", "plan_arch", "canonical_arch", "arch_takes_images", "LAYER_NAMES"]


class ArchError(ValueError):
    """An architecture spec that cannot be read or built: one line, naming where."""


#: How deep res blocks may nest.
MAX_DEPTH = 32
#: The layers that take images (C, H, W): a spec with any of them starts from images.
IMAGE_LAYERS = ("conv", "maxpool", "avgpool", "gap", "flatten")


# ------------------------------------------------------------------ tokens
@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str  # "name", "number", "punct" or "end"
    text: str
    pos: int  # 1-based character where it starts


_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[()\[\],=]))"
)
_CLOSES = {"(": ")", "[": "]"}


def _describe(token: _Token) -> str:
    return "the end of the spec" if token.kind == "end" else repr(token.text)


def _tokens(spec: str) -> list[_Token]:
    found, i = [], 0
    while True:
        rest = spec[i:]
        if not rest.strip():
            found.append(_Token("end", "", len(spec) + 1))
            return found
        match = _TOKEN.match(spec, i)
        if match is None:
            at = i + len(rest) - len(rest.lstrip())
            raise ArchError(f"unexpected character {spec[at]!r} at character {at + 1}")
        kind = match.lastgroup
        text = match.group(kind)
        text = text.lower() if kind == "name" else text
        found.append(_Token(kind, text, match.start(kind) + 1))
        i = match.end()


def _check_brackets(tokens: list[_Token]) -> None:
    """Every ( and [ closed by its own kind, nothing closed that was not opened, res nested at most MAX_DEPTH."""
    open_: list[_Token] = []
    for token in tokens:
        if token.text in _CLOSES:
            open_.append(token)
            if sum(t.text == "[" for t in open_) > MAX_DEPTH:
                raise ArchError(f"res blocks nest more than {MAX_DEPTH} deep at character {token.pos}")
        elif token.text in (")", "]"):
            if not open_:
                raise ArchError(f"{token.text!r} at character {token.pos} closes nothing")
            opener = open_.pop()
            if _CLOSES[opener.text] != token.text:
                raise ArchError(
                    f"{opener.text!r} at character {opener.pos} is closed by {token.text!r} at character {token.pos}"
                )
    if open_:
        raise ArchError(f"{open_[-1].text!r} at character {open_[-1].pos} is never closed")


# ------------------------------------------------------------------ parsing
@dataclasses.dataclass(frozen=True)
class _Node:
    name: str
    args: tuple  # (keyword or None, value token) per argument
    body: tuple | None  # the layers of a res block
    pos: int
    text: str  # the layer as written, without whitespace

    @property
    def where(self) -> str:
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"{text} at character {self.pos}"


class _Parser:
    def __init__(self, tokens: list[_Token]):
        self.tokens, self.i = tokens, 0

    @property
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def text_since(self, start: int) -> str:
        return "".join(token.text for token in self.tokens[start : self.i])

    def layers(self, closing: str | None) -> tuple:
        nodes = [self.layer()]
        while self.peek.text == ",":
            self.take()
            nodes.append(self.layer())
        token = self.peek
        if (closing is None and token.kind == "end") or (token.kind == "punct" and token.text == closing):
            return tuple(nodes)
        raise ArchError(f"expected ',' between layers at character {token.pos}, got {_describe(token)}")

    def layer(self) -> _Node:
        start = self.i
        token = self.take()
        if token.kind != "name":
            raise ArchError(f"expected a layer at character {token.pos}, got {_describe(token)}")
        name = token.text
        if name == "res":
            if self.peek.text != "[":
                raise ArchError(
                    f"res at character {token.pos} needs its layers in brackets, such as res[conv(16,3,pad=same),relu]"
                )
            self.take()
            if self.peek.text == "]":
                raise ArchError(f"res[] at character {token.pos} is empty: a residual block needs at least one layer")
            body = self.layers("]")
            self.take()
            return _Node(name, (), body, token.pos, self.text_since(start))
        if name not in _KINDS:
            raise ArchError(f"unknown layer {name!r} at character {token.pos}; the layers are {', '.join(LAYER_NAMES)}")
        args = []
        if self.peek.text == "(":
            self.take()
            if self.peek.text != ")":
                while True:
                    args.append(self.argument())
                    after = self.take()
                    if after.text == ")":
                        break
                    if after.text != ",":
                        raise ArchError(f"expected ',' or ')' at character {after.pos}, got {_describe(after)}")
            else:
                self.take()
        elif self.peek.text == "[":
            raise ArchError(
                f"'[' at character {self.peek.pos}: only res takes layers in brackets; "
                f"{name} takes its arguments in parentheses"
            )
        return _Node(name, tuple(args), None, token.pos, self.text_since(start))

    def argument(self) -> tuple:
        token = self.take()
        key = None
        if token.kind == "name" and self.peek.text == "=":
            self.take()
            key, token = token.text, self.take()
        if token.kind not in ("name", "number"):
            raise ArchError(f"expected an argument at character {token.pos}, got {_describe(token)}")
        return key, token


def _parse(spec) -> tuple:
    if not isinstance(spec, str):
        raise ArchError(f"an architecture spec is text, such as 'flatten,dense(10)', got {type(spec).__name__}")
    tokens = _tokens(spec)
    if tokens[0].kind == "end":
        raise ArchError(
            "the architecture is empty: give its layers separated by commas, such as conv(32,3),relu,flatten,dense(10)"
        )
    _check_brackets(tokens)
    return _Parser(tokens).layers(None)


# ------------------------------------------------------------------ arguments
class _Bad(Exception):
    """A value that does not fit an argument; the message says what would."""


#: The largest size, stride or padding a spec may give: far beyond any network that fits in
#: memory, and small enough that no product of them overflows the kernels' 64-bit arithmetic.
LARGEST = 1 << 20


def _positive_int(token: _Token) -> int:
    if token.kind == "number" and token.text.isdigit() and 0 < int(token.text) <= LARGEST:
        return int(token.text)
    raise _Bad(f"a positive integer up to {LARGEST:,}")


def _padding(token: _Token):
    if token.kind == "number" and token.text.isdigit() and int(token.text) <= LARGEST:
        return int(token.text)
    if token.text in ("same", "valid"):
        return token.text
    raise _Bad(f"a non-negative integer up to {LARGEST:,}, same or valid")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise _Bad("a finite number")
    return value


def _flag(token: _Token) -> bool:
    if token.text in ("0", "1"):
        return token.text == "1"
    raise _Bad("0 or 1")


def _number(token: _Token) -> float:
    if token.kind == "number":
        return _finite(float(token.text))
    raise _Bad("a finite number")


def _rate(token: _Token) -> float:
    if token.kind == "number" and 0.0 <= float(token.text) < 1.0:
        return float(token.text)
    raise _Bad("a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    read: object  # token -> value, raising _Bad
    default: str | None = None  # shown in the signature; None: required


@dataclasses.dataclass(frozen=True)
class _Kind:
    params: tuple
    make: object  # (values, shape, node) -> (layer, shape)

    def signature(self, name: str) -> str:
        if not self.params:
            return name
        words = [p.name if p.default is None else f"{p.name}={p.default}" for p in self.params]
        return f"{name}({', '.join(words)})"


def _bind(node: _Node) -> dict:
    """The node's arguments by parameter name, each read and checked."""
    kind = _KINDS[node.name]
    signature = kind.signature(node.name)
    if node.args and not kind.params:
        raise ArchError(f"{node.where}: {node.name} takes no arguments")
    if len(node.args) > len(kind.params):
        raise ArchError(
            f"{node.where}: {node.name} takes at most {len(kind.params)} arguments ({signature}), got {len(node.args)}"
        )
    values: dict = {}
    named = False
    for i, (key, token) in enumerate(node.args):
        if key is None:
            if named:
                raise ArchError(f"{node.where}: an unnamed argument after a named one ({signature})")
            param = kind.params[i]
        else:
            named = True
            param = next((p for p in kind.params if p.name == key), None)
            if param is None:
                raise ArchError(f"{node.where}: {node.name} has no argument {key!r} ({signature})")
            if param.name in values:
                raise ArchError(f"{node.where}: {param.name} is given twice")
        try:
            values[param.name] = param.read(token)
        except _Bad as exc:
            raise ArchError(f"{node.where}: {param.name} must be {exc}, got {token.text!r}") from None
    missing = [p.name for p in kind.params if p.default is None and p.name not in values]
    if missing:
        raise ArchError(f"{node.where}: {node.name} needs {' and '.join(missing)} ({signature})")
    return values


# ------------------------------------------------------------------ shapes and layers
def _shape_words(shape: tuple) -> str:
    if len(shape) == 3:
        return f"{shape[0]} channel{'s' * (shape[0] != 1)} of {shape[1]}×{shape[2]}"
    return f"{shape[0]} feature{'s' * (shape[0] != 1)}"


def _images(node: _Node, shape: tuple) -> tuple:
    if len(shape) != 3:
        raise ArchError(
            f"{node.where}: {node.name} takes images (channels, height, width), but gets rows of "
            f"{_shape_words(shape)} (image layers come before flatten and dense)"
        )
    return shape


def _built(node: _Node, make):
    """The layer ``make()`` returns; its own ValueError becomes one naming the node."""
    try:
        return make()
    except ValueError as exc:
        raise ArchError(f"{node.where}: {exc}") from None


def _conv(values, shape, node):
    c, h, w = _images(node, shape)
    k = values["kernel"]
    layer = _built(
        node,
        lambda: Conv2D(
            c, values["channels"], k, values.get("stride", 1), values.get("pad", 0), bias=values.get("bias", True)
        ),
    )
    if min(h, w) + 2 * layer.pad < k:
        padded = f" (padded by {layer.pad} on each side)" if layer.pad else ""
        raise ArchError(f"{node.where}: its {k}×{k} kernel is larger than the {h}×{w} images it gets{padded}")
    return layer, (values["channels"], *layer.output_size(h, w))


def _pool(cls):
    def make(values, shape, node):
        c, h, w = _images(node, shape)
        size = values["size"]
        if min(h, w) < size:
            raise ArchError(f"{node.where}: its {size}×{size} window is larger than the {h}×{w} images it gets")
        layer = _built(node, lambda: cls(size, values.get("stride")))
        return layer, (c, (h - size) // layer.stride + 1, (w - size) // layer.stride + 1)

    return make


def _gap(values, shape, node):
    return GlobalAvgPool2D(), (_images(node, shape)[0],)


def _flatten(values, shape, node):
    return Flatten(), (math.prod(shape),)


def _bn(values, shape, node):
    return _built(node, lambda: BatchNorm(shape[0], **values)), shape


def _dropout(values, shape, node):
    return _built(node, lambda: Dropout(values["rate"])), shape


def _dense(values, shape, node):
    if len(shape) != 1:
        raise ArchError(
            f"{node.where}: dense takes rows of features, but gets images ({_shape_words(shape)}): "
            "add flatten (or gap) before it"
        )
    return _built(node, lambda: Dense(shape[0], values["units"], bias=values.get("bias", True))), (values["units"],)


def _activation(class_name):
    def make(values, shape, node):
        return _built(node, lambda: layer_registry.lookup(class_name)(**values)), shape

    return make


_KINDS = {
    "conv": _Kind(
        (
            _Param("channels", _positive_int),
            _Param("kernel", _positive_int),
            _Param("stride", _positive_int, "1"),
            _Param("pad", _padding, "0"),
            _Param("bias", _flag, "1"),
        ),
        _conv,
    ),
    "maxpool": _Kind((_Param("size", _positive_int), _Param("stride", _positive_int, "size")), _pool(MaxPool2D)),
    "avgpool": _Kind((_Param("size", _positive_int), _Param("stride", _positive_int, "size")), _pool(AvgPool2D)),
    "gap": _Kind((), _gap),
    "bn": _Kind((_Param("momentum", _number, "0.1"), _Param("eps", _number, "1e-5")), _bn),
    "flatten": _Kind((), _flatten),
    "dense": _Kind((_Param("units", _positive_int), _Param("bias", _flag, "1")), _dense),
    "dropout": _Kind((_Param("rate", _rate),), _dropout),
    **{
        name: _Kind((_Param("alpha", _number, "0.01"),) if name == "leaky_relu" else (), _activation(cls))
        for name, cls in ACTIVATIONS.items()
    },
}
#: Every layer name a spec may use.
LAYER_NAMES = (*_KINDS, "res")


def _parameters(layer: Layer) -> int:
    """The parameters a layer will have once built (computed from its config, before it is built)."""
    if isinstance(layer, Conv2D):
        return layer.out_channels * (layer.in_channels * layer.kernel_size**2 + layer.bias)
    if isinstance(layer, Dense):
        return layer.out_features * (layer.in_features + layer.bias)
    if isinstance(layer, BatchNorm):
        return 2 * layer.features
    return 0


@dataclasses.dataclass
class ArchPlan:
    """A spec laid out for one input shape: its layers (not yet built), and what they will need."""

    layers: list
    input_shape: tuple
    output_shape: tuple
    #: Trainable parameters of all the layers.
    parameters: int
    #: Values per example of every layer's output (the layers inside res blocks too).
    activations: int


def _lay_out(nodes: tuple, shape: tuple, plan: ArchPlan) -> tuple[list, tuple]:
    layers = []
    for node in nodes:
        if node.body is not None:
            inner, out = _lay_out(node.body, shape, plan)
            if out != shape:
                raise ArchError(
                    f"{node.where}: its layers turn {_shape_words(shape)} into {_shape_words(out)}, but a residual "
                    "block adds its input to their output, so they must keep the shape (pad=same, stride 1, "
                    "the same channels)"
                )
            layer = Residual(inner)
        else:
            layer, shape = _KINDS[node.name].make(_bind(node), shape, node)
            plan.parameters += _parameters(layer)
        plan.activations += math.prod(shape)
        layers.append(layer)
    return layers, shape


def _input_shape(input_shape) -> tuple:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) not in (1, 3)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ValueError(
            f"input_shape must be (channels, height, width) or (features,), positive integers; got {input_shape!r}"
        )
    return shape


def plan_arch(spec: str, input_shape=(1, 28, 28), n_outputs: int | None = 10) -> ArchPlan:
    """The layers of ``spec`` for examples of ``input_shape``, checked, unbuilt. With
    ``n_outputs`` (None: any ending), the last layer must be dense(n_outputs)."""
    nodes = _parse(spec)
    shape = _input_shape(input_shape)
    plan = ArchPlan([], shape, shape, 0, 0)
    plan.layers, plan.output_shape = _lay_out(nodes, shape, plan)
    last = nodes[-1]
    if n_outputs is not None and (last.name != "dense" or plan.output_shape != (n_outputs,)):
        before = "flatten," if len(plan.output_shape) == 3 else ""
        raise ArchError(
            f"the last layer must be dense({n_outputs}), which gives the {n_outputs} outputs the loss reads; "
            f"the spec ends with {last.where}" + ("" if last.name == "dense" else f": add {before}dense({n_outputs})")
        )
    return plan


def from_arch(
    spec: str,
    input_shape=(1, 28, 28),
    n_outputs: int | None = 10,
    *,
    device="cpu",
    dtype: str = "float32",
    seed: int | None = None,
) -> Sequential:
    """The Sequential network ``spec`` describes (the grammar: this module's docstring), for
    examples of ``input_shape``: (channels, height, width) images, or (features,) rows.

    ``from_arch("conv(32,3),relu,maxpool(2),conv(64,3),relu,maxpool(2),flatten,dropout(0.5),dense(10)")``
    is ``xn.cnn()``'s network. A spec that cannot be built is an ArchError (a ValueError)."""
    return Sequential(plan_arch(spec, input_shape, n_outputs).layers, device=device, dtype=dtype, seed=seed)


def canonical_arch(spec: str) -> str:
    """``spec`` read and written back without whitespace, names in lower case (its syntax checked)."""
    return ",".join(node.text for node in _parse(spec))


def _names(nodes) -> set:
    return {name for node in nodes for name in ({node.name} | _names(node.body or ()))}


def arch_takes_images(spec: str) -> bool:
    """Whether ``spec`` has an image layer (conv, maxpool, avgpool, gap, flatten): then its
    examples are images; a spec of dense, bn, dropout and activations alone takes rows."""
    return bool(_names(_parse(spec)) & set(IMAGE_LAYERS))
