"""Optimizers and learning-rate schedules.

Every optimizer applies θ ← θ − η·(update) to each parameter after the whole backward pass has
filled the gradients. Hyperparameter arithmetic — the schedule's η for this step, Adam's bias
corrections — is done on the host in Python floats, so no step waits on the device. Updates are
made in place when the namespace allows it (``is_writeable_array``) and rebound otherwise.

* L2 weight decay (SGD, momentum, Adam): g ← g + λθ, for weights only (arrays of 2+ axes).
* AdamW: decoupled decay, θ ← θ − ηλθ, applied beside the Adam step instead of through g.
* Clipping by global norm: if ‖g‖ = √(Σ_θ Σ g²) exceeds c, every g is scaled by c / ‖g‖
  (computed on the device: the norm is never read back).
"""

from __future__ import annotations

import contextlib
import math

from array_api_compat import array_namespace, is_writeable_array

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
]


# ------------------------------------------------------------------ schedules
class Schedule:
    """η as a function of the step number (0 for the first update). Plain Python floats."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def __init__(self, lr: float):
        self.lr = float(lr)

    def __call__(self, step):
        return self.lr


class StepDecay(Schedule):
    """η = η₀ · γ^⌊step / step_size⌋."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"StepDecay step_size must be at least 1, got {step_size}")
        self.lr, self.step_size, self.gamma = float(lr), int(step_size), float(gamma)

    def __call__(self, step):
        return self.lr * self.gamma ** (step // self.step_size)


class ExponentialDecay(Schedule):
    """η = η₀ · γ^step."""

    def __init__(self, lr: float, gamma: float):
        self.lr, self.gamma = float(lr), float(gamma)

    def __call__(self, step):
        return self.lr * self.gamma**step


class CosineDecay(Schedule):
    """η = η_min + ½ (η₀ − η_min)(1 + cos(π · min(step, T) / T)) over T = total_steps."""

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"CosineDecay total_steps must be at least 1, got {total_steps}")
        self.lr, self.total_steps, self.min_lr = float(lr), int(total_steps), float(min_lr)

    def __call__(self, step):
        progress = min(step, self.total_steps) / self.total_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class Warmup(Schedule):
    """Linear warm-up over the first ``warmup_steps`` steps, then ``after`` (restarted at 0).

    During warm-up η = after(0) · (step + 1) / warmup_steps.
    """

    def __init__(self, after: Schedule | float, warmup_steps: int):
        if warmup_steps < 1:
            raise ValueError(f"Warmup warmup_steps must be at least 1, got {warmup_steps}")
        self.after = after if isinstance(after, Schedule) else Constant(after)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.after(0) * (step + 1) / self.warmup_steps
        return self.after(step - self.warmup_steps)


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
    """

    slot_names: tuple[str, ...] = ()

    def __init__(self, lr: float | Schedule = 0.01, *, weight_decay: float = 0.0, clip_norm: float | None = None):
        if not isinstance(lr, Schedule) and not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")
        self.schedule = lr if isinstance(lr, Schedule) else Constant(lr)
        self.weight_decay = float(weight_decay)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.steps = 0
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

    def step(self, model) -> None:
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
        if self._flat_owner is not flat:  # first flat step, or the optimizer moved to another model
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
        return {"weight_decay": self.weight_decay, "clip_norm": self.clip_norm}

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
            "type": type(self).__name__,
            "steps": self.steps,
            "hyperparameters": self.hyperparameters(),
            "slots": slots,
        }

    def load_state_dict(self, state: dict, model) -> None:
        """Restore from ``state_dict()`` output; slot arrays move to ``model``'s device and dtype.

        Everything is checked first, so a mismatch leaves the optimizer as it was.
        """
        if state.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {state.get('type')!r}, not {type(self).__name__}")
        for name, value in state.get("hyperparameters", {}).items():
            if self.hyperparameters().get(name) != value:
                raise ValueError(
                    f"optimizer state was saved with {name}={value!r}, this optimizer has "
                    f"{name}={self.hyperparameters().get(name)!r}"
                )
        params = model.named_parameters()
        staged = {}
        for key, slots in state["slots"].items():
            if key not in params:
                raise ValueError(f"optimizer state has slots for {key!r}, which the model does not have")
            if set(slots) != set(self.slot_names):
                raise ValueError(
                    f"optimizer state for {key!r} has slots {sorted(slots)}, expected {sorted(self.slot_names)}"
                )
            staged[key] = {}
            for name, value in slots.items():
                moved = model.device.to_device(value, model.dtype, copy=True)
                if tuple(moved.shape) != tuple(params[key].shape):
                    raise ValueError(
                        f"optimizer slot {key}.{name} has shape {tuple(moved.shape)}, "
                        f"parameter has {tuple(params[key].shape)}"
                    )
                staged[key][name] = moved
        self.state = staged
        self._flat_slots = self._flat_owner = None  # rebuilt around the loaded values at the next flat step
        self.steps = int(state["steps"])
        self._device = model.device


def clip_by_global_norm(grads, max_norm: float):
    """Scale all gradients by min(1, c / ‖g‖) where ‖g‖ is the norm of all of them together."""
    xp = array_namespace(*grads)
    total = sum(xp.sum(g * g) for g in grads)
    scale = xp.minimum(1.0, max_norm / (xp.sqrt(total) + 1e-12))
    return [g * scale for g in grads]


class SGD(Optimizer):
    """Plain gradient descent, θ ← θ − η g; with ``momentum`` μ > 0 (PyTorch's convention):

    v ← μ v + g,   θ ← θ − η v            (heavy ball)
    θ ← θ − η (g + μ v)                    (Nesterov, with the new v)
    """

    def __init__(self, lr=0.01, *, momentum: float = 0.0, nesterov: bool = False, **kwargs):
        super().__init__(lr, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum = float(momentum)
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


class Momentum(SGD):
    """SGD with momentum 0.9 by default (``nesterov=True`` for Nesterov's variant)."""

    def __init__(self, lr=0.01, *, momentum: float = 0.9, nesterov: bool = False, **kwargs):
        super().__init__(lr, momentum=momentum, nesterov=nesterov, **kwargs)


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
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {beta!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive (it keeps m / (√v + ε) finite), got {eps!r}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

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


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "adamw": AdamW}


def get_optimizer(name: str, **kwargs) -> Optimizer:
    """An optimizer by name: 'sgd', 'momentum', 'adam' or 'adamw'."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(**kwargs)
