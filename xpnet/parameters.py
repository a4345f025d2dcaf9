"""The parameter store: where a model's parameters, their gradients and its optimizer's slots live.

A layer makes its parameters in ``build`` (``self.params["W"] = ...``). When the model is built,
its store takes them over and lays them out the way the device's Ops ask (``Ops.flat_storage``):
one flat array per kind (parameters, gradients, each optimizer slot) where the Ops update many
parameters in one pass, as on NumPy and CuPy; separate arrays elsewhere. The layout is the
store's alone. Each layer keeps dicts by name (``layer.params``, ``layer.grads``) that are
windows onto the store: reading them is reading a dict, and assigning to them
(``self.grads["W"] = delta.T @ x``, as reference code does) goes through the store, which checks
the array (device, shape, dtype) and copies it into its own array, on either layout (so an array
the caller keeps or changes later is not the store's, and the two layouts train alike). So no way
of filling a gradient can break the layout, and the model never drops to another path. A
gradient appears in ``layer.grads`` when a backward pass first gives it; each backward replaces it.

Optimizers see the parameters through ``groups``: one ``Parameter`` per parameter, or, for an
optimizer whose update treats every element alone (``Optimizer.elementwise``, declared by the
class that defines ``update``), on the flat layout, parameters with the same metadata laid out side
by side as one group, updated in one pass. The metadata is what
the layer declared: ``decay``, whether weight decay applies, is False for the parameters a layer
names in ``no_decay`` (Dense names its bias) and True for every other. Never inferred from shapes.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace, is_writeable_array

from .backend import dtype_name
from .layers import walk

__all__ = ["Parameter", "ParameterStore"]


class _Window(dict):
    """Arrays by name, read as a dict; every write of another array than the one held goes through
    ``put(name, value)``, which checks the value and returns the array to keep (the stored one,
    written into). Removing an entry is refused: the store's layout does not change after the
    model is built."""

    __slots__ = ("_put", "_what")

    def __init__(self, arrays: dict, put, what: str):
        super().__init__(arrays)
        self._put = put
        self._what = what

    def __setitem__(self, name, value):
        if value is not dict.get(self, name):  # (Dense hands back the array it wrote into)
            dict.__setitem__(self, name, self._put(name, value))

    def update(self, *args, **kwargs):
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def setdefault(self, name, default=None):
        if name not in self:
            self[name] = default
        return dict.__getitem__(self, name)

    def __ior__(self, other):
        self.update(other)
        return self

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            f"{self._what} belong to the model's parameter store: arrays can be replaced (d[name] = array), not removed"
        )

    __delitem__ = pop = popitem = clear = _refuse


class _Entry:
    """One parameter: where it is, what the layer declared of it, and its arrays now."""

    __slots__ = ("key", "layer", "name", "shape", "size", "decay", "value", "grad", "filled")

    def __init__(self, key, layer, name, value, decay):
        self.key, self.layer, self.name = key, layer, name
        self.shape = tuple(value.shape)
        self.size = math.prod(self.shape)
        self.decay = decay
        self.value, self.grad, self.filled = value, None, False


class Parameter:
    """What an optimizer's ``update(param, lr)`` is given: one parameter, or a group of them.

    * ``value``: the parameter's array (a group: its parameters side by side, one flat array);
    * ``grad``: ∂L/∂value, from the last backward pass (scaled, when the optimizer clips);
    * ``slots``: the optimizer's arrays for it by slot name (``slot_names``), zeros at first;
      assign to replace one (``param.slots["v"] = ...``): the store writes it into its arrays;
    * ``decay``: whether weight decay applies (declared by the layer, see ``Layer.no_decay``);
    * ``key``: its name in the model ("0.W"; a group: its keys joined by "+"), ``keys`` all of them;
    * ``scratch``: a dict where the Ops may keep arrays they reuse for this parameter (and
      ``scratch["flat"]``: whether its arrays are spans of the store's flat storage).

    ``update`` returns the new value (or the same array, updated in place).
    """

    __slots__ = ("keys", "key", "decay", "slots", "scratch", "clipped", "_entry", "_value", "_grad")

    def __init__(self, entries, decay, slots, flat: bool, value=None, grad=None):
        self.keys = tuple(entry.key for entry in entries)
        self.key = "+".join(self.keys)
        self.decay = decay
        self.slots = slots
        self.scratch: dict = {"flat": flat}
        self.clipped = None  # the scaled gradient of this step, when clipping
        self._entry = entries[0] if value is None else None  # one parameter, read through its entry
        self._value, self._grad = value, grad

    @property
    def value(self):
        return self._entry.value if self._entry is not None else self._value

    @property
    def grad(self):
        if self.clipped is not None:
            return self.clipped
        return self._entry.grad if self._entry is not None else self._grad

    def __repr__(self) -> str:
        return f"Parameter({self.key!r}, shape={tuple(self.value.shape)}, decay={self.decay})"


def _slot_name(names: tuple, name) -> None:
    if name not in names:
        raise KeyError(f"the optimizer has no slot {name!r} (its slots: {', '.join(names) or 'none'})")


def placed(current, value, writable: bool):
    """Where a checked value goes: copied into ``current`` when the array library lets arrays be
    written (so nothing else holds the store's array, and a view into flat storage stays one),
    else ``value`` itself is kept."""
    if value is current:
        return current
    if writable:
        current[...] = value
        return current
    return value


class ParameterStore:
    """Every parameter of a model, its gradient and the optimizer slots, in the layout the Ops ask
    for. Built by ``Sequential`` after its layers; see the module's docstring.

    ``owns(array)`` tells an array of the model's device (namespace and device) from others."""

    def __init__(self, layers, ops, dtype, owns, where: str):
        self.dtype, self._owns, self._where = dtype, owns, where
        self.entries: list[_Entry] = []
        every = [layer for _, layer in walk(layers)]  # blocks' inner layers too (Residual)
        for prefix, layer in walk(layers):
            exempt = _declared_exempt(layer, prefix)
            for name, value in layer.params.items():
                self._checked(value, f"parameter {name!r} of layer {prefix} ({type(layer).__name__})", None)
                self.entries.append(_Entry(f"{prefix}.{name}", layer, name, value, decay=name not in exempt))
        self.by_key = {entry.key: entry for entry in self.entries}
        self._unfilled = len(self.entries)  # parameters no backward pass has given a gradient yet
        # decayed parameters first, then the rest: each kind is one run of the flat layout
        self._order = sorted(self.entries, key=lambda entry: not entry.decay)
        self.total = sum(entry.size for entry in self.entries)
        self._ops = ops
        values = ops.flat_storage(self.total, dtype) if self.total else None
        self._flat_values = values
        self._flat_grads = ops.flat_storage(self.total, dtype) if values is not None else None
        #: Whether arrays of this namespace can be written in place (all but a few, such as JAX's)
        self.writable = values is not None or (bool(self.entries) and is_writeable_array(self.entries[0].value))
        self._offsets = {}
        offset = 0
        for entry in self._order:
            self._offsets[entry.key] = (offset, offset + entry.size)
            offset += entry.size
        if values is not None:
            for entry in self._order:
                view = self._view(values, entry)
                view[...] = entry.value
                entry.value = view
                entry.grad = self._view(self._flat_grads, entry)
        for layer in every:
            mine = [entry for entry in self.entries if entry.layer is layer]
            # gradients appear in the window once a backward pass has given them, on either layout
            layer._adopt(
                _Window({e.name: e.value for e in mine}, self._putter(layer, "value"), "a layer's parameters"),
                _Window({}, self._putter(layer, "grad"), "a layer's gradients"),
            )

    @property
    def flat(self) -> bool:
        return self._flat_values is not None

    @property
    def layout(self) -> str:
        """ "flat" (one array per kind, each parameter a view into it) or "separate"."""
        return "flat" if self.flat else "separate"

    def _view(self, flat, entry):
        lo, hi = self._offsets[entry.key]
        return array_namespace(flat).reshape(flat[lo:hi], entry.shape)

    def _checked(self, value, label: str, shape):
        """``value`` if it is an array of the model's device and dtype (and of ``shape``, unless None),
        else the error naming ``label``."""
        found = getattr(value, "shape", None)
        if found is None or not hasattr(value, "dtype"):
            want = "an array" if shape is None else f"an array of shape {shape}"
            raise TypeError(f"{label} must be {want}, got {type(value).__name__}")
        if not self._owns(value):
            raise TypeError(
                f"{label} must be an array of the model's device ({self._where}), got {type(value).__name__} "
                "of another array library or device: move it with model.device.to_device"
            )
        if shape is not None and tuple(found) != shape:
            raise ValueError(f"{label} must have shape {shape}, got {tuple(found)}")
        if value.dtype != self.dtype:
            raise TypeError(
                f"{label} must have the model's dtype {dtype_name(self.dtype)}, got {dtype_name(value.dtype)} "
                "(xpnet never casts silently)"
            )
        return value

    def _putter(self, layer, kind: str):
        """The write function of a layer's window: ``kind`` "value" or "grad"."""
        entries = {entry.name: entry for entry in self.entries if entry.layer is layer}
        xp = array_namespace(self.entries[0].value) if self.entries else None

        def put(name, value):
            entry = entries.get(name)
            if entry is None:
                raise KeyError(
                    f"{type(layer).__name__} has no parameter {name!r} (parameters are made in build, before the "
                    f"model takes them over; it has {sorted(entries) or 'none'})"
                )
            if kind == "value":
                checked = self._checked(value, f"the parameter {entry.key}", entry.shape)
                entry.value = placed(entry.value, checked, self.writable)
                return entry.value
            checked = self._checked(value, f"the gradient of {entry.key}", entry.shape)
            if entry.grad is None:  # the first gradient on the separate layout: a copy of its own
                entry.grad = xp.asarray(checked, copy=True) if self.writable else checked
            else:
                entry.grad = placed(entry.grad, checked, self.writable)
            if not entry.filled:
                entry.filled = True
                self._unfilled -= 1
            return entry.grad

        return put

    # ------------------------------------------------------------ reads
    def named_values(self) -> dict:
        return {entry.key: entry.value for entry in self.entries}

    def named_grads(self) -> dict:
        return {entry.key: entry.grad for entry in self.entries if entry.filled}

    def unfilled(self) -> list[str]:
        """Keys of parameters that no backward pass has given a gradient yet."""
        if not self._unfilled:  # (asked every step)
            return []
        return [entry.key for entry in self.entries if not entry.filled]

    @property
    def itemsize(self) -> int:
        """Bytes per number of the model's dtype."""
        return 8 if dtype_name(self.dtype) == "float64" else 4

    def buffers(self, kind: str) -> list:
        """The arrays that hold every parameter ("values") or every gradient ("grads"), for a
        collective that reads or writes them all: the one flat array on the flat layout, else one
        array per parameter, in the store's order (gradients a backward pass has not given yet are
        left out)."""
        if self.flat:
            return [self._flat_values if kind == "values" else self._flat_grads]
        if kind == "values":
            return [entry.value for entry in self._order]
        return [entry.grad for entry in self._order if entry.filled]

    def zero_grads(self) -> None:
        """Every gradient made 0 (a rank with no rows in a step adds nothing to the sum)."""
        for array in self.buffers("grads"):
            array[...] = 0

    # ------------------------------------------------------------ writes
    def assign(self, key: str, value) -> None:
        """Make ``value`` (checked) parameter ``key``: written into the store's array."""
        entry = self.by_key[key]
        entry.layer.params[entry.name] = value

    def set_value(self, param: Parameter, value) -> None:
        """What an optimizer's update returned, made the value of ``param``."""
        entry = param._entry
        if entry is not None:
            entry.layer.params[entry.name] = value
        elif value is not param._value:
            param._value[...] = self._checked(value, f"the update of {param.key}", tuple(param._value.shape))

    # ------------------------------------------------------------ optimizers
    def slots(self, names, initial: dict | None = None) -> Slots:
        """Fresh optimizer slots ``names`` for every parameter, zeros or the arrays of ``initial``
        ({key: {slot: array}}, already checked and on the device)."""
        return Slots(self, tuple(names), initial or {})

    def groups(self, slots: Slots, elementwise: bool) -> list[Parameter]:
        """What an optimizer updates: one Parameter per parameter, or, when ``elementwise`` and the
        layout is flat, one per run of parameters with the same ``decay``."""
        if not (elementwise and self.flat):
            return [Parameter([entry], entry.decay, slots.window(entry), self.flat) for entry in self.entries]
        groups = []
        for decay in (True, False):
            run = [entry for entry in self._order if entry.decay == decay]
            if run:
                lo, hi = self._offsets[run[0].key][0], self._offsets[run[-1].key][1]
                values, grads = self._flat_values[lo:hi], self._flat_grads[lo:hi]
                groups.append(Parameter(run, decay, slots.span(lo, hi), True, values, grads))
        return groups


def _declared_exempt(layer, prefix: str) -> set:
    """The names in ``layer.no_decay``, each one of its parameters (a typo would silently decay)."""
    declared = layer.no_decay
    if isinstance(declared, str) or not all(isinstance(name, str) for name in declared):
        raise TypeError(f"{type(layer).__name__}.no_decay must be a tuple of parameter names, got {declared!r:.200}")
    unknown = sorted(set(declared) - set(layer.params))
    if unknown and layer.params:
        raise ValueError(
            f"layer {prefix} ({type(layer).__name__}) lists {', '.join(map(repr, unknown))} in no_decay, which is "
            f"not one of its parameters ({', '.join(layer.params)})"
        )
    return set(declared)


class Slots:
    """An optimizer's arrays (``names``: "m", "v", "velocity", ...) for every parameter of one
    store, in its layout: flat arrays with a view per parameter, or one array per parameter."""

    def __init__(self, store: ParameterStore, names: tuple, initial: dict):
        self.store, self.names = store, names
        self._flat = {}
        self.by_key: dict = {}
        if store.flat:
            self.by_key = {entry.key: {} for entry in store.entries}
            for name in names:
                flat = self._flat[name] = store._ops.flat_storage(store.total, store.dtype)
                for entry in store.entries:
                    view = store._view(flat, entry)
                    if entry.key in initial and name in initial[entry.key]:
                        view[...] = initial[entry.key][name]
                    self.by_key[entry.key][name] = view
            return
        for entry in store.entries:
            given = initial.get(entry.key, {})
            arrays = {
                name: given[name] if name in given else array_namespace(entry.value).zeros_like(entry.value)
                for name in names
            }
            self.by_key[entry.key] = _Window(arrays, self._putter(entry), "an optimizer's slots")

    def _putter(self, entry):
        store = self.store

        def put(name, value):
            _slot_name(self.names, name)
            checked = store._checked(value, f"the optimizer slot {name} of {entry.key}", entry.shape)
            return placed(dict.get(self.by_key[entry.key], name), checked, store.writable)

        return put

    def window(self, entry) -> dict:
        """The slots of one parameter, as an optimizer's update may replace them."""
        if not self.store.flat:
            return self.by_key[entry.key]
        return self._span_window(dict(self.by_key[entry.key]), f" of {entry.key}", entry.shape)

    def span(self, lo: int, hi: int) -> dict:
        """The slots of a group laid out over flat positions lo:hi."""
        return self._span_window({name: flat[lo:hi] for name, flat in self._flat.items()}, "", (hi - lo,))

    def _span_window(self, views: dict, of: str, shape) -> dict:
        """A window over views into the flat slots: a write is copied into the view."""
        store = self.store

        def put(name, value):
            _slot_name(self.names, name)
            return placed(views[name], store._checked(value, f"the optimizer slot {name}{of}", shape), True)

        return _Window(dict(views), put, "an optimizer's slots")

    def buffers(self) -> list:
        """The arrays that hold every slot: one flat array per slot name on the flat layout, else
        one array per parameter and slot, in a fixed order."""
        if self.store.flat:
            return [self._flat[name] for name in self.names]
        return [dict.get(self.by_key[entry.key], name) for entry in self.store._order for name in self.names]

    def arrays(self) -> dict:
        """{key: {slot: array}}: every parameter's slots (views into the layout when it is flat)."""
        return {key: dict(slots) for key, slots in self.by_key.items() if slots}
