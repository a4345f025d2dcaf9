"""PyTorch tensors through array-api-compat: ``torch`` (the CPU) or ``torch:cuda:N``.

Reference Ops only: every layer, loss and optimizer runs its Array API code on torch tensors,
which proves that code is the standard's and not NumPy's. (xpnet does its own backpropagation:
autograd is never used, and tensors are created without ``requires_grad``.)
"""

from __future__ import annotations

import re
import sys
import threading

import numpy as np

from .base import Backend, DeviceError


def _load():
    try:
        import torch
    except ImportError as exc:
        raise DeviceError("device 'torch' needs PyTorch: pip install torch") from exc
    return torch


class TorchBackend(Backend):
    kind = "torch"
    forms = ("'torch'", "'torch:cuda:N'")

    def __init__(self, index):
        self.torch = _load()
        import array_api_compat.torch

        self.xp = array_api_compat.torch
        self._local = threading.local()  # each thread's stack of what enter() changed
        if index is True:
            self.native, self.name = self.torch.device("cpu"), "torch"
        else:
            if not self.torch.cuda.is_available():
                raise DeviceError(f"device 'torch:cuda:{index}' is not usable: PyTorch sees no CUDA GPU")
            count = self.torch.cuda.device_count()
            if index >= count:
                raise DeviceError(
                    f"device 'torch:cuda:{index}' does not exist: PyTorch sees {count} GPU(s), "
                    f"torch:cuda:0 to torch:cuda:{count - 1}"
                )
            self.native, self.name = self.torch.device("cuda", index), f"torch:cuda:{index}"

    @classmethod
    def claims(cls, text):
        lowered = text.lower()
        if lowered in ("torch", "torch:cpu"):
            return True
        if not lowered.startswith("torch:"):
            return None
        match = re.fullmatch(r"torch:cuda(?::(\d+))?", lowered)
        if match is None:
            raise DeviceError(f"unknown PyTorch device in {text!r}; use 'torch' (the CPU) or 'torch:cuda:N'")
        return int(match.group(1) or 0)

    @classmethod
    def available(cls):
        try:
            import torch  # noqa: F401
        except ImportError:
            return []
        names = ["torch"]
        if torch.cuda.is_available():
            names += [f"torch:cuda:{i}" for i in range(torch.cuda.device_count())]
        return names

    @classmethod
    def is_array(cls, x):
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    def owns(self, a):
        return isinstance(a, self.torch.Tensor) and a.device == self.native

    def from_host(self, host, copy):
        # native byte order, C order, the same shape (0-d stays 0-d): what torch.tensor copies
        host = np.require(host.astype(host.dtype.newbyteorder("="), copy=False), requirements="C")
        return self.torch.tensor(host, device=self.native)

    @classmethod
    def host_copy(cls, x):
        return x.detach().cpu().numpy()

    switches = True

    def enter(self):
        """No autograd while xpnet computes (it does its own backpropagation: a tensor that
        requires grad must not grow one graph across all steps), and on a GPU this device current.
        Nested, per thread: each exit restores what its enter found."""
        stack = self._stack()
        stack.append((self.torch.is_grad_enabled(), self._current_cuda()))
        self.torch.set_grad_enabled(False)
        if self.native.type == "cuda":
            self.torch.cuda.set_device(self.native)

    def exit(self, *exc):
        grad, device = self._stack().pop()
        if device is not None:
            self.torch.cuda.set_device(device)
        self.torch.set_grad_enabled(grad)

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current_cuda(self):
        return self.torch.cuda.current_device() if self.native.type == "cuda" else None

    def sync(self):
        if self.native.type == "cuda":
            self.torch.cuda.synchronize(self.native)

    def describe(self, fast):
        return f"PyTorch {self.torch.__version__} on {self.native} through array-api-compat; Array API code only"
