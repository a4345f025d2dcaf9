"""Optimizers and learning-rate schedules.

Every optimizer applies θ ← θ − η·(update) to each parameter after the whole backward pass has
filled the gradients. Hyperparameter arithmetic — the schedule's η for this step, Adam's bias
corrections — is done on the host in Python floats, so no step waits on the device. Updates are
made in place when the namespace allows it (``is_writeable_array``) and rebound otherwise.

* L2 weight decay (SGD, momentum, Adam): g ← g + λθ, for the parameters whose layer says they
  take it (``Parameter.decay``: Dense's weights, not its bias; see ``Layer.no_decay``).
* AdamW: decoupled decay, θ ← θ − ηλθ, applied beside the Adam step instead of through g.
* Clipping by global norm: if ‖g‖ = √(Σ_θ Σ g²) exceeds c, every g is scaled by c / ‖g‖
  (computed on the device: the norm is never read back).

Optimizers are found by name (``get_optimizer("adam")``, ``fit(..., "sgd", ...)``) and saved
states name theirs, through the optimizer registry; one of your own joins it with
``@xpnet.register_optimizer``. ``optimizer.config()`` is its construction as JSON values and
``Optimizer.from_config`` rebuilds it (the state, with ``state_dict``, goes beside it).

An optimizer belongs to one model: the first one it steps or is loaded into (``bind``). Its slots
and step count are that model's; stepping another model is refused (create one optimizer per model).
Hyperparameters are checked when they are given, and again when a saved state is loaded.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref

from array_api_compat import array_namespace

from .backend import dtype_name
from .checks import checked_count, checked_number, real, shown
from .model import dtype_kind
from .parameters import ParameterStore
from .registry import Registry

__all__ = [
    "Optimizer",
    "SGD",
    "Momentum",
    "Adam",
    "AdamW",
    "Schedule",
    "Constant",
    "StepDecay",
    "ExponentialDecay",
    "CosineDecay",
    "Warmup",
    "get_optimizer",
    "optimizer_registry",
    "register_optimizer",
]


_NO_CLIPPING = " (or None for no clipping)"


def _checked_hyperparameter(name: str, value, label: str):
    """A saved hyperparameter checked as the constructors check it (``label`` prefixes the name)."""
    if name == "clip_norm":
        if value is not None:
            checked_number(label + name, value, "positive", note=_NO_CLIPPING)
    elif name == "nesterov":
        if not isinstance(value, bool):
            raise ValueError(f"{label}nesterov must be true or false, got {shown(value)}")
    elif name in _HYPERPARAMETER_RULES:
        checked_number(label + name, value, _HYPERPARAMETER_RULES[name])


_HYPERPARAMETER_RULES = {
    "weight_decay": "non-negative",
    "momentum": "fraction",
    "beta1": "fraction",
    "beta2": "fraction",
    "eps": "positive",
}
#: The step counter of a saved state lies in [0, 2**53): every such integer is exact as a float.
_MAX_STEPS = 2**53


# ------------------------------------------------------------------ schedules
class Schedule:
    """η as a function of the step number (0 for the first update). Plain Python floats."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor keyword arguments that rebuild this schedule, as JSON values (the
        built-in schedules; ``Optimizer.config`` records them)."""
        raise NotImplementedError(f"{type(self).__name__} has no config(): it cannot be saved in an optimizer config")


class Constant(Schedule):
    def __init__(self, lr: float):
        self.lr = checked_number("Constant lr", lr, "positive")

    def __call__(self, step):
        return self.lr

    def config(self):
        return {"lr": self.lr}


class StepDecay(Schedule):
    """η = η₀ · γ^⌊step / step_size⌋."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr = checked_number("StepDecay lr", lr, "positive")
        self.step_size = checked_count("StepDecay step_size", step_size)
        self.gamma = checked_number("StepDecay gamma", gamma, "positive")

    def __call__(self, step):
        return self.lr * self.gamma ** (step // self.step_size)

    def config(self):
        return {"lr": self.lr, "step_size": self.step_size, "gamma": self.gamma}


class ExponentialDecay(Schedule):
    """η = η₀ · γ^step."""

    def __init__(self, lr: float, gamma: float):
        self.lr = checked_number("ExponentialDecay lr", lr, "positive")
        self.gamma = checked_number("ExponentialDecay gamma", gamma, "positive")

    def __call__(self, step):
        return self.lr * self.gamma**step

    def config(self):
        return {"lr": self.lr, "gamma": self.gamma}


class CosineDecay(Schedule):
    """η = η_min + ½ (η₀ − η_min)(1 + cos(π · min(step, T) / T)) over T = total_steps."""

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0):
        self.lr = checked_number("CosineDecay lr", lr, "positive")
        self.total_steps = checked_count("CosineDecay total_steps", total_steps)
        low = real(min_lr)
        if low is None or not 0.0 <= low <= self.lr:
            raise ValueError(
                f"CosineDecay min_lr must be a finite number from 0 to lr ({self.lr!r}), got {shown(min_lr)}"
            )
        self.min_lr = low

    def __call__(self, step):
        progress = min(step, self.total_steps) / self.total_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def config(self):
        return {"lr": self.lr, "total_steps": self.total_steps, "min_lr": self.min_lr}


class Warmup(Schedule):
    """Linear warm-up over the first ``warmup_steps`` steps, then ``after`` (restarted at 0).

    During warm-up η = after(0) · (step + 1) / warmup_steps.
    """

    def __init__(self, after: Schedule | float, warmup_steps: int):
        self.after = after if isinstance(after, Schedule) else Constant(checked_number("Warmup lr", after, "positive"))
        self.warmup_steps = checked_count("Warmup warmup_steps", warmup_steps)

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.after(0) * (step + 1) / self.warmup_steps
        return self.after(step - self.warmup_steps)

    def config(self):
        return {"after": _schedule_config(self.after), "warmup_steps": self.warmup_steps}


_SCHEDULES = {cls.__name__: cls for cls in (Constant, StepDecay, ExponentialDecay, CosineDecay, Warmup)}


def _schedule_config(schedule: Schedule):
    """A learning rate for a config: the number of a Constant, else {"schedule": name, **args}."""
    if type(schedule) is Constant:
        return schedule.lr
    if _SCHEDULES.get(type(schedule).__name__) is not type(schedule):
        raise ValueError(
            f"the schedule {type(schedule).__qualname__} cannot be saved in an optimizer config (only "
            f"{', '.join(_SCHEDULES)} can)"
        )
    return {"schedule": type(schedule).__name__, **schedule.config()}


def _schedule_from_config(spec):
    """The learning rate or Schedule that ``_schedule_config`` recorded."""
    if not isinstance(spec, dict):
        return spec  # a number: checked by the optimizer as any lr is
    spec = dict(spec)
    name = spec.pop("schedule", None)
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {shown(name)} in the optimizer config; known: {', '.join(_SCHEDULES)}")
    if name == "Warmup" and "after" in spec:
        spec["after"] = _schedule_from_config(spec["after"])
    try:
        return _SCHEDULES[name](**spec)
    except TypeError as exc:
        raise ValueError(f"the schedule {name} cannot be rebuilt from its config: {exc}") from None


# ----------------------------------------------------------------- optimizers
class Optimizer:
    """Base class: the schedule, the step counter, weight decay, clipping and the state dict.

    ``step(model)`` updates every parameter of ``model`` from the gradients its last backward
    pass stored. Subclasses implement ``update(param, lr) -> new value``: ``param`` is an
    ``xpnet.Parameter`` (its ``value``, ``grad``, ``slots`` by the names in ``slot_names``, and
    the metadata its layer declared, such as ``decay``), and the returned array, or the value
    updated in place, becomes the parameter. An optimizer whose update treats every element on
    its own sets ``elementwise = True``: on a flat layout the store may then hand it several
    parameters of the same metadata as one group (one pass instead of one per parameter).

    The first model stepped (or loaded into) is the optimizer's for good (``bound_model``): its
    slots and step count belong to that model's parameters, and a step on any other model raises
    ValueError. ``load_state_dict(state, model)`` replaces the whole state and binds to ``model``.
    """

    slot_names: tuple[str, ...] = ()
    #: Whether ``update`` treats each element alone (then groups of parameters may come at once).
    #: Read from the class that defines ``update``: a subclass with an update of its own declares it again.
    elementwise = False

    def __init__(self, lr: float | Schedule = 0.01, *, weight_decay: float = 0.0, clip_norm: float | None = None):
        if isinstance(lr, Schedule):
            self.schedule = lr
        else:
            self.schedule = Constant(checked_number("lr (the learning rate)", lr, "positive"))
        self.weight_decay = checked_number("weight_decay", weight_decay, "non-negative")
        self.clip_norm = (
            None if clip_norm is None else checked_number("clip_norm", clip_norm, "positive", note=_NO_CLIPPING)
        )
        self.steps = 0
        self._model_ref = None  # a weak reference to the bound model (see ``bind``)
        self._slots = None  # the slots, laid out by the bound model's parameter store
        self._groups = None  # what ``update`` is called with, made once per binding
        self._device = None  # the model's, from the first step or load: CuPy copies need its context
        self.ops = None  # the bound model's device's Ops: the update primitives

    @property
    def lr(self) -> float:
        """η for the next step."""
        return self.schedule(self.steps)

    @property
    def bound_model(self):
        """The model this optimizer steps (None before its first step or load)."""
        return None if self._model_ref is None else self._model_ref()

    @property
    def state(self) -> dict:
        """{key: {slot: array}} for every parameter (empty before the optimizer is bound, and for
        an optimizer without slots): the arrays themselves, in the store's layout."""
        return {} if self._slots is None else self._slots.arrays()

    def slot_buffers(self) -> list:
        """The arrays that hold every slot, in the store's layout (one flat array per slot name
        on the flat layout): what a collective reads or writes (``xpnet.distributed``)."""
        return [] if self._slots is None else self._slots.buffers()

    def bind(self, model) -> None:
        """Make ``model`` this optimizer's model; a no-op for that model, ValueError for another.

        ``step`` and ``load_state_dict`` bind (fit too, before it trains), so a call is seldom needed.
        """
        if self._model_ref is not None and self._model_ref() is model:
            return
        if self._model_ref is not None:
            raise ValueError(
                f"this {type(self).__name__} is bound to another model (the one it first stepped or was loaded "
                "into), and its state does not fit this model: create a new optimizer for each model"
            )
        if not isinstance(getattr(model, "store", None), ParameterStore):
            raise TypeError(f"an optimizer steps an xpnet Sequential, got {shown(model)}")
        self._attach(model, {})

    def _attach(self, model, initial: dict) -> None:
        """Slots for ``model``'s parameters (``initial``: checked arrays by key and slot name)."""
        with model.device:
            self._slots = model.store.slots(self.slot_names, initial)
            self._groups = model.store.groups(self._slots, _declared_elementwise(type(self)))
        self._device, self.ops = model.device, model.device.ops
        self._model_ref = weakref.ref(model)

    def step(self, model) -> None:
        ref = self._model_ref
        if ref is None or ref() is not model:  # the first step, or another model (refused)
            self.bind(model)
        missing = model.store.unfilled()
        if missing:
            raise RuntimeError(f"no gradient for {', '.join(missing)}: call model.backward before optimizer.step")
        lr = self.lr
        self.steps += 1
        groups, store = self._groups, model.store
        with model.device:
            if self.clip_norm is None:
                self._update_all(groups, store, lr)
                return
            for param, g in zip(groups, clip_by_global_norm([p.grad for p in groups], self.clip_norm)):
                param.clipped = g
            try:
                self._update_all(groups, store, lr)
            finally:
                for param in groups:
                    param.clipped = None

    def _update_all(self, groups, store, lr) -> None:
        for param in groups:
            new = self.update(param, lr)
            if new is not param.value:
                store.set_value(param, new)

    def _decayed(self, param):
        """g + λθ for parameters that take weight decay (``param.decay``, declared by the layer:
        Dense's weights do, its bias does not)."""
        g = param.grad
        if not self.weight_decay or not param.decay:
            return g
        return g + self.weight_decay * param.value

    def update(self, param, lr):
        raise NotImplementedError

    # --------------------------------------------------------------- state
    def hyperparameters(self) -> dict:
        """Every constructor keyword argument but ``lr``, as JSON values: saved with the state
        (a loaded state must match them) and in ``config``. A subclass with arguments of its own
        adds them."""
        return {"weight_decay": self.weight_decay, "clip_norm": self.clip_norm}

    def config(self) -> dict:
        """``{"type": <registered name>, "lr": <number or schedule>, **hyperparameters()}``, JSON
        values from which ``Optimizer.from_config`` builds a fresh optimizer like this one (its
        slots and step count are the state: ``state_dict``, checkpoints). ValueError for a class
        that is not registered or a schedule of one's own, which could not be rebuilt."""
        kind = optimizer_registry.name_of(type(self))
        if kind is None:
            raise ValueError(
                f"{type(self).__qualname__} cannot be saved in a config: its class is not registered; "
                "decorate it with @xpnet.register_optimizer"
            )
        return {"type": kind, "lr": _schedule_config(self.schedule), **self.hyperparameters()}

    @classmethod
    def from_config(cls, config: dict) -> Optimizer:
        """A new optimizer from ``config()``'s output, its class found in the optimizer registry."""
        if not isinstance(config, dict) or "type" not in config:
            raise ValueError(f"an optimizer config must be a dict with a 'type', got {shown(config)}")
        args = dict(config)
        kind = args.pop("type")
        found = optimizer_registry.lookup(kind, where=" in the optimizer config")
        if not issubclass(found, cls):
            raise ValueError(
                f"the optimizer config is for {found.__name__}, not for {cls.__name__} or a subclass of it"
            )
        if "lr" in args:
            args["lr"] = _schedule_from_config(args["lr"])
        try:
            return found(**args)
        except TypeError as exc:
            raise ValueError(f"{kind} cannot be rebuilt from its config: {exc}") from None

    def _saved_name(self) -> str:
        """What a state dict's "type" holds: the registered name (the class name if unregistered)."""
        return optimizer_registry.name_of(type(self)) or type(self).__name__

    def state_dict(self, *, copy: bool = True) -> dict:
        """{"type", "steps", "hyperparameters", "slots": {key: {slot: array on the device}}}.

        The slots are copies, unless ``copy=False`` (for a caller that reads them at once, such as
        a checkpoint writer, which then needs no second copy on the device).
        """
        slots = {}
        with contextlib.nullcontext() if self._device is None else self._device:
            for key, arrays in self.state.items():
                xp = array_namespace(*arrays.values())
                slots[key] = {name: xp.asarray(a, copy=True) if copy else a for name, a in arrays.items()}
        return {
            "type": self._saved_name(),
            "steps": self.steps,
            "hyperparameters": self.hyperparameters(),
            "slots": slots,
        }

    def load_state_dict(self, state: dict, model) -> None:
        """Restore from ``state_dict()`` output; slot arrays move to ``model``'s device and dtype.

        Everything is checked first (ValueError naming the field), so a mismatch leaves the
        optimizer as it was. On success the optimizer is bound to ``model`` (its whole state was
        replaced: nothing of a model it stepped before remains).
        """
        if not isinstance(state, dict):
            raise TypeError(f"optimizer state must be a dict (from state_dict()), got {shown(state)}")
        if not isinstance(getattr(model, "store", None), ParameterStore):
            raise TypeError(f"optimizer state loads into an xpnet Sequential, got {shown(model)}")
        name = self._saved_name()
        kind = state.get("type")
        if not isinstance(kind, str):
            raise ValueError(f"optimizer state field type must be the optimizer's registered name, got {shown(kind)}")
        if kind != name:
            hint = (
                ""
                if kind in optimizer_registry
                else " (an optimizer of your own is saved under the name it is registered under: "
                "@xpnet.register_optimizer)"
            )
            raise ValueError(f"optimizer state is for {shown(kind)}, not {name}{hint}")
        for field in ("steps", "slots"):
            if field not in state:
                raise ValueError(f"optimizer state has no field {field}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 0 <= steps < _MAX_STEPS:
            raise ValueError(f"optimizer state field steps must be an integer in [0, 2**53), got {shown(steps)}")
        saved = state.get("hyperparameters", {})
        if not isinstance(saved, dict):
            raise ValueError(f"optimizer state field hyperparameters must be a dict, got {shown(saved)}")
        mine = self.hyperparameters()
        for key, value in saved.items():
            if key not in mine:
                raise ValueError(f"optimizer state has a hyperparameter {shown(key)}, which {name} does not have")
            _checked_hyperparameter(key, value, "optimizer state hyperparameter ")
            if mine[key] != value:
                raise ValueError(
                    f"optimizer state was saved with {key}={shown(value)}, this optimizer has {key}={shown(mine[key])}"
                )
        if not isinstance(state["slots"], dict):
            raise ValueError(f"optimizer state field slots must be a dict, got {shown(state['slots'])}")
        params = model.named_parameters()
        staged = {}
        device, xp = model.device, model.xp
        for key, slots in state["slots"].items():
            if key not in params:
                raise ValueError(f"optimizer state has slots for {shown(key)}, which the model does not have")
            if not isinstance(slots, dict):
                raise ValueError(
                    f"optimizer slots for {key!r} must be a dict of arrays by slot name, got {shown(slots)}"
                )
            if set(slots) != set(self.slot_names):
                raise ValueError(
                    f"optimizer state for {key!r} has slots {sorted(map(shown, slots))}, "
                    f"expected {sorted(self.slot_names)}"
                )
            staged[key] = {}
            for slot, value in slots.items():
                staged[key][slot] = self._staged_slot(f"{key}.{slot}", slot, value, params[key], device, xp)
        self._attach(model, staged)  # parameters without saved slots start from zeros
        self.steps = int(steps)

    def _staged_slot(self, label, slot, value, param, device, xp):
        """One saved slot array, checked (a float array of the parameter's shape, finite) and moved."""
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):  # lists and the like: as NumPy reads them
            try:
                value = device.to_host(value)
            except (ValueError, TypeError, RecursionError, OverflowError):
                raise ValueError(f"optimizer slot {label} is not an array, got {shown(value)}") from None
        if dtype_kind(value.dtype) != "f":
            shown_dtype = value.dtype if hasattr(value.dtype, "kind") else dtype_name(value.dtype)
            raise ValueError(f"optimizer slot {label} has dtype {shown_dtype}: it must hold floating-point numbers")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"optimizer slot {label} has shape {tuple(value.shape)}, parameter has {tuple(param.shape)}"
            )
        moved = device.to_device(value, param.dtype, copy=True)
        with device:
            if not device.item(xp.all(xp.isfinite(moved))):
                raise ValueError(f"optimizer slot {label} holds NaN or infinite values")
            self._check_slot(label, slot, moved, device, xp)
        return moved

    def _check_slot(self, label, slot, array, device, xp) -> None:
        """What else a saved slot must satisfy (Adam's second moment: never negative)."""


def _declared_elementwise(cls) -> bool:
    """``elementwise`` as the class that defines ``update`` declares it: a subclass that writes its
    own update (per-parameter norms, say) does not inherit the declaration of the update it replaces."""
    for klass in cls.__mro__:
        if "update" in klass.__dict__:
            return bool(klass.__dict__.get("elementwise", False))
    return False


#: Optimizer classes by name, matched ignoring case ("adamw" finds AdamW): ``get_optimizer``,
#: ``Optimizer.from_config`` and the "type" of a saved state.
optimizer_registry = Registry("optimizer", Optimizer)


def register_optimizer(cls=None, *, name: str | None = None):
    """Register an Optimizer subclass under ``name`` (by default its class name), so that
    ``get_optimizer``, ``fit(..., name, ...)``, ``Optimizer.from_config`` and saved states find it:
    ``@xpnet.register_optimizer`` or ``@xpnet.register_optimizer(name="...")``. Returns the class
    unchanged; a different class under a taken name is refused (ValueError naming both)."""
    return optimizer_registry.register(cls, name=name)


def clip_by_global_norm(grads, max_norm: float):
    """Scale all gradients by min(1, c / ‖g‖) where ‖g‖ is the norm of all of them together."""
    xp = array_namespace(*grads)
    total = sum(xp.sum(g * g) for g in grads)
    scale = xp.minimum(1.0, max_norm / (xp.sqrt(total) + 1e-12))
    return [g * scale for g in grads]


@register_optimizer
class SGD(Optimizer):
    """Plain gradient descent, θ ← θ − η g; with ``momentum`` μ > 0 (PyTorch's convention):

    v ← μ v + g,   θ ← θ − η v            (heavy ball)
    θ ← θ − η (g + μ v)                    (Nesterov, with the new v)

    (``Ops.sgd`` computes it.)
    """

    elementwise = True

    def __init__(self, lr=0.01, *, momentum: float = 0.0, nesterov: bool = False, **kwargs):
        super().__init__(lr, **kwargs)
        self.momentum = checked_number("momentum", momentum, "fraction")
        if nesterov and self.momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.slot_names = ("velocity",) if momentum else ()

    def update(self, param, lr):
        g = self._decayed(param)
        slots = param.slots
        p, velocity = self.ops.sgd(
            param.value, g, lr, slots.get("velocity"), momentum=self.momentum, nesterov=self.nesterov
        )
        if self.momentum:
            slots["velocity"] = velocity
        return p

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum, "nesterov": self.nesterov}


@register_optimizer
class Momentum(SGD):
    """SGD with momentum 0.9 by default (``nesterov=True`` for Nesterov's variant)."""

    def __init__(self, lr=0.01, *, momentum: float = 0.9, nesterov: bool = False, **kwargs):
        super().__init__(lr, momentum=momentum, nesterov=nesterov, **kwargs)


@register_optimizer
class Adam(Optimizer):
    """Adam (Kingma & Ba): moment estimates m, v of g and g², bias-corrected.

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
        θ ← θ − η m̂ / (√v̂ + ε),  m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)

    computed as θ ← θ − η_t m / (√v + ε_t) with the host floats
    η_t = η √(1 − β₂ᵗ) / (1 − β₁ᵗ) and ε_t = ε √(1 − β₂ᵗ) — the same number, fewer passes
    (``Ops.adam``; one pass per operation over a whole group where the Ops can).
    """

    slot_names = ("m", "v")
    elementwise = True

    def __init__(self, lr=0.001, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, **kwargs):
        super().__init__(lr, **kwargs)
        self.beta1 = checked_number("beta1", beta1, "fraction")
        self.beta2 = checked_number("beta2", beta2, "fraction")
        self.eps = checked_number("eps", eps, "positive")  # ε > 0 keeps m / (√v + ε) finite

    def _corrected(self, lr) -> tuple[float, float]:
        """η_t and ε_t for this step: host floats."""
        correction = math.sqrt(1.0 - self.beta2**self.steps)
        return lr * correction / (1.0 - self.beta1**self.steps), self.eps * correction

    def _step(self, param, g, lr, decay: float = 0.0):
        slots = param.slots
        lr_t, eps_t = self._corrected(lr)
        p, slots["m"], slots["v"] = self.ops.adam(
            param.value, g, slots["m"], slots["v"], lr_t, self.beta1, self.beta2, eps_t, decay=decay, site=param.scratch
        )
        return p

    def update(self, param, lr):
        return self._step(param, self._decayed(param), lr)

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def _check_slot(self, label, slot, array, device, xp):
        if slot == "v" and array.size and device.item(xp.min(array)) < 0:
            raise ValueError(f"optimizer slot {label} holds negative values (v, a mean of squared gradients, cannot)")


@register_optimizer
class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): θ ← θ − η λ θ − (Adam step).

    The decay is not fed through the moments; it applies to the parameters that take weight
    decay (``param.decay``), like the L2 decay.
    """

    def __init__(self, lr=0.001, *, weight_decay: float = 0.01, **kwargs):
        super().__init__(lr, weight_decay=weight_decay, **kwargs)

    def update(self, param, lr):
        decay = lr * self.weight_decay if self.weight_decay and param.decay else 0.0
        return self._step(param, param.grad, lr, decay)


def get_optimizer(name: str, **kwargs) -> Optimizer:
    """An optimizer by its registered name, any case: 'sgd', 'momentum', 'adam', 'adamw' or one
    of your own, made with ``kwargs``."""
    return optimizer_registry.lookup(name)(**kwargs)
