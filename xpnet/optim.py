"""Optimizers and learning-rate schedules.

Every optimizer applies θ ← θ − η·(update) to each parameter after the whole backward pass has
filled the gradients. Hyperparameter arithmetic — the schedule's η for this step, Adam's bias
corrections — is done on the host in Python floats, so no step waits on the device. Updates are
made in place when the namespace allows it (``is_writeable_array``) and rebound otherwise.

* L2 weight decay (SGD, momentum, Adam): g ← g + λθ, for weights only (arrays of 2+ axes).
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

from array_api_compat import array_namespace, is_writeable_array

from .backend import dtype_name
from .checks import checked_count, checked_number, real, shown
from .model import dtype_kind
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
#: The key of the update that covers every parameter at once (flat storage).
FLAT = "*"


def _subtract(p, update):
    """p − update, in place when the array library allows it (rebind the result either way)."""
    if is_writeable_array(p):
        p -= update
        return p
    return p - update


class Optimizer:
    """Base class: the schedule, the step counter, weight decay, clipping and the state dict.

    ``step(model)`` updates every parameter of ``model`` from the gradients its last backward
    pass stored. Subclasses implement ``update(key, p, g, lr) -> new p``.

    The first model stepped (or loaded into) is the optimizer's for good (``bound_model``): its
    slots and step count belong to that model's parameters, and a step on any other model raises
    ValueError. ``load_state_dict(state, model)`` replaces the whole state and binds to ``model``.
    """

    slot_names: tuple[str, ...] = ()

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
        self.state: dict[str, dict] = {}
        self._flat_slots = None  # flat slot arrays when the model keeps flat parameters
        self._flat_owner = None  # the FlatParameters they are laid out for
        self._decay_mask = self._fast = None
        self._buffers: dict = {}  # scratch space of fused updates
        self._device = None  # the model's, from the first step or load: CuPy copies need its context

    @property
    def lr(self) -> float:
        """η for the next step."""
        return self.schedule(self.steps)

    @property
    def bound_model(self):
        """The model this optimizer steps (None before its first step or load)."""
        return None if self._model_ref is None else self._model_ref()

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
        if not callable(getattr(model, "parameter_slots", None)):
            raise TypeError(f"an optimizer steps an xpnet Sequential, got {shown(model)}")
        self._model_ref = weakref.ref(model)

    def step(self, model) -> None:
        ref = self._model_ref
        if ref is None or ref() is not model:  # the first step, or another model (refused)
            self.bind(model)
        slots = model.parameter_slots()
        flat = model.flat if model.flat is not None and model.flat.intact() else None
        if flat is not None:  # the gradient arrays always exist there: has backward filled them?
            missing = [] if model.has_gradients else [key for key, _, _ in slots]
        else:
            missing = [key for key, layer, name in slots if name not in layer.grads]
        if missing:
            raise RuntimeError(f"no gradient for {', '.join(missing)}: call model.backward before optimizer.step")
        lr = self.lr
        self.steps += 1
        self._device = model.device
        with model.device:
            if flat is not None:  # every parameter at once, in the flat storage the model keeps
                self._flat_step(flat, lr)
                return
            grads = [layer.grads[name] for _, layer, name in slots]
            if self.clip_norm is not None:
                grads = clip_by_global_norm(grads, self.clip_norm)
            for (key, layer, name), g in zip(slots, grads):
                layer.params[name] = self.update(key, layer.params[name], g, lr)

    def _flat_step(self, flat, lr) -> None:
        """The same update on the flat parameter and gradient arrays (slots flat too, with
        per-parameter views in ``state`` for state_dict)."""
        if self._flat_owner is not flat:  # the first flat step, or the first after a load
            stale = [
                key
                for key, slots in self.state.items()
                if key not in flat.offsets or any(tuple(a.shape) != flat.offsets[key][2] for a in slots.values())
            ]
            if stale:
                raise ValueError(f"optimizer state for {', '.join(stale)} does not fit this model's parameters")
            self._flat_slots, self._flat_owner = None, flat
        if self.slot_names and self._flat_slots is None:
            self._flat_slots = {
                name: flat.fast.flat(flat.params.shape[0], flat.params.dtype) for name in self.slot_names
            }
            views = {name: flat.views(array) for name, array in self._flat_slots.items()}
            for key in flat.offsets:
                for name in self.slot_names:
                    if key in self.state:  # slots from earlier per-parameter steps or a load
                        views[name][key][...] = self.state[key][name]
                self.state[key] = {name: views[name][key] for name in self.slot_names}
        g = flat.grads
        if self.clip_norm is not None:
            g = clip_by_global_norm([g], self.clip_norm)[0]
        self._decay_mask, self._fast = flat.decay, flat.fast
        try:
            self.update(FLAT, flat.params, g, lr)
        finally:
            self._decay_mask = self._fast = None

    def _decayed(self, p, g, key=None):
        """g + λθ for weights (L2 weight decay); biases and other vectors are not decayed."""
        if not self.weight_decay:
            return g
        if key == FLAT:
            return g + self.weight_decay * (self._decay_mask * p)
        return g + self.weight_decay * p if p.ndim >= 2 else g

    def _slots(self, key, p) -> dict:
        if key == FLAT:
            return self._flat_slots
        state = self.state.get(key)
        if state is None:
            xp = array_namespace(p)
            state = {name: xp.zeros_like(p) for name in self.slot_names}
            self.state[key] = state
        return state

    def update(self, key, p, g, lr):
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
        if not callable(getattr(model, "named_parameters", None)):
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
        self.state = staged
        self._flat_slots = self._flat_owner = None  # rebuilt around the loaded values at the next flat step
        self.steps = int(steps)
        self._device = model.device
        self._model_ref = weakref.ref(model)

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
    """

    def __init__(self, lr=0.01, *, momentum: float = 0.0, nesterov: bool = False, **kwargs):
        super().__init__(lr, **kwargs)
        self.momentum = checked_number("momentum", momentum, "fraction")
        if nesterov and self.momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.slot_names = ("velocity",) if momentum else ()

    def update(self, key, p, g, lr):
        g = self._decayed(p, g, key)
        if not self.momentum:
            return _subtract(p, lr * g)
        slots = self._slots(key, p)
        v = slots["velocity"]
        if is_writeable_array(v):
            v *= self.momentum
            v += g
        else:
            v = self.momentum * v + g
        slots["velocity"] = v
        return _subtract(p, lr * (g + self.momentum * v) if self.nesterov else lr * v)

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
    η_t = η √(1 − β₂ᵗ) / (1 − β₁ᵗ) and ε_t = ε √(1 − β₂ᵗ) — the same number, fewer passes.
    """

    slot_names = ("m", "v")

    def __init__(self, lr=0.001, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, **kwargs):
        super().__init__(lr, **kwargs)
        self.beta1 = checked_number("beta1", beta1, "fraction")
        self.beta2 = checked_number("beta2", beta2, "fraction")
        self.eps = checked_number("eps", eps, "positive")  # ε > 0 keeps m / (√v + ε) finite

    def _corrected(self, lr) -> tuple[float, float]:
        """η_t and ε_t for this step: host floats."""
        correction = math.sqrt(1.0 - self.beta2**self.steps)
        return lr * correction / (1.0 - self.beta1**self.steps), self.eps * correction

    def _adam_direction(self, key, p, g, lr):
        """Update the moments of ``key`` and return η_t m / (√v + ε_t)."""
        b1, b2 = self.beta1, self.beta2
        slots = self._slots(key, p)
        m, v = slots["m"], slots["v"]
        xp = array_namespace(p)
        # m ← β₁ m + (1 − β₁) g and v ← β₂ v + (1 − β₂) g², written as m + (1 − β₁)(g − m) and
        # v + (1 − β₂)(g² − v): the same numbers, rounded as the fused kernels round them
        if is_writeable_array(m):
            m += (1.0 - b1) * (g - m)
            v += (1.0 - b2) * (g * g - v)
        else:
            m = m + (1.0 - b1) * (g - m)
            v = v + (1.0 - b2) * (g * g - v)
        slots["m"], slots["v"] = m, v
        lr_t, eps_t = self._corrected(lr)
        return lr_t * m / (xp.sqrt(v) + eps_t)

    def _fused(self, p, g, lr):
        """The backend's one-pass-per-operation Adam on the flat arrays (same numbers)."""
        slots = self._flat_slots
        scratch = self._fast.buffer(self._buffers, "scratch", p.shape, p.dtype)
        lr_t, eps_t = self._corrected(lr)
        self._fast.adam_(p, g, slots["m"], slots["v"], scratch, lr_t, self.beta1, self.beta2, eps_t)
        return p

    def update(self, key, p, g, lr):
        g = self._decayed(p, g, key)
        if key == FLAT and self._fast is not None:
            return self._fused(p, g, lr)
        return _subtract(p, self._adam_direction(key, p, g, lr))

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def _check_slot(self, label, slot, array, device, xp):
        if slot == "v" and array.size and device.item(xp.min(array)) < 0:
            raise ValueError(f"optimizer slot {label} holds negative values (v, a mean of squared gradients, cannot)")


@register_optimizer
class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): θ ← θ − η λ θ − (Adam step).

    The decay is not fed through the moments; it applies to weights only, like the L2 decay.
    """

    def __init__(self, lr=0.001, *, weight_decay: float = 0.01, **kwargs):
        super().__init__(lr, weight_decay=weight_decay, **kwargs)

    def update(self, key, p, g, lr):
        if key == FLAT:  # decay first (θ ← θ − ηλθ on weights), then the Adam step, which ignores θ
            if self.weight_decay:
                p = _subtract(p, (lr * self.weight_decay) * (self._decay_mask * p))
            return (
                self._fused(p, g, lr) if self._fast is not None else _subtract(p, self._adam_direction(key, p, g, lr))
            )
        direction = self._adam_direction(key, p, g, lr)
        if self.weight_decay and p.ndim >= 2:
            direction = direction + (lr * self.weight_decay) * p
        return _subtract(p, direction)


def get_optimizer(name: str, **kwargs) -> Optimizer:
    """An optimizer by its registered name, any case: 'sgd', 'momentum', 'adam', 'adamw' or one
    of your own, made with ``kwargs``."""
    return optimizer_registry.lookup(name)(**kwargs)
