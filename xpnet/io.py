"""Checkpoints: tensors in safetensors (loading a file cannot run code), everything else as JSON.

One file holds a whole training state: the model's parameters and its layers' non-trainable state
(``model/<key>``, the keys of ``state_dict``), the optimizer's slots (``optimizer/<key>/<slot>``),
any extra tensors (``extra/<name>``: early stopping's best weights, the data's standardization
statistics) and, in the safetensors metadata, one JSON
document with the architecture, the optimizer's step count and hyperparameters, and whatever the
caller adds (epoch, history, random state). It is written to a temporary file in the same folder
and renamed over the old one, so a crash leaves either the old checkpoint or the new one, never
half of one. A checkpoint written on any device loads on any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .model import Sequential

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "write_json_atomic",
    "write_text_atomic",
]

_FORMAT = "xpnet-checkpoint-2"  # 2: the SHA-256 covers the metadata as well as the tensors


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, truncated or made for another architecture."""


@dataclasses.dataclass
class Checkpoint:
    """What ``load_checkpoint`` read: host arrays by group, and the JSON metadata."""

    path: Path
    model: dict
    optimizer: dict
    extra: dict
    meta: dict

    def build_model(self, device="cpu") -> Sequential:
        """The saved architecture on ``device``, with the saved parameters. Each layer is rebuilt
        through the layer registry by the name it was saved under: a layer of your own must be
        registered (``@xpnet.register_layer``) before the checkpoint is loaded."""
        try:
            model = Sequential.from_config(self.meta["model"], device=device)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: the saved architecture cannot be rebuilt ({exc})") from exc
        self.load_model_into(model)
        return model

    def load_model_into(self, model: Sequential) -> None:
        try:
            model.load_state_dict(self.model)
        except ValueError as exc:
            raise CheckpointError(f"{self.path} does not fit this model: {exc}") from exc

    def load_optimizer_into(self, optimizer, model: Sequential) -> None:
        """The saved optimizer state into ``optimizer`` (whose registered name must be the one the
        state was saved under, and its hyperparameters the saved ones), bound to ``model``."""
        state = dict(self.meta.get("optimizer", {}))
        state["slots"] = self.optimizer
        try:
            optimizer.load_state_dict(state, model)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: the optimizer state does not fit: {exc}") from exc


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and a rename."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path, document) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path, model: Sequential, optimizer=None, *, extra: dict | None = None, meta: dict | None = None):
    """Write model (and optimizer) state, extra host arrays and JSON metadata to one file."""
    from safetensors.numpy import save_file

    device = model.device
    arrays = {**model.named_parameters(), **model.named_state()}  # the parameters and every layer's state
    tensors = {f"model/{key}": device.to_host(value) for key, value in arrays.items()}
    document = {"format": _FORMAT, "model": model.config(), **(meta or {})}
    if optimizer is not None:
        state = optimizer.state_dict(copy=False)
        for key, slots in state.pop("slots").items():
            for slot, value in slots.items():
                tensors[f"optimizer/{key}/{slot}"] = device.to_host(value)
        document["optimizer"] = state
    for name, value in (extra or {}).items():
        tensors[f"extra/{name}"] = device.to_host(value)
    tensors = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    document["sha256"] = _digest(tensors, document)
    metadata = {"xpnet": json.dumps(document)}
    _atomic_write(Path(path), lambda tmp: _save_file(save_file, tensors, tmp, metadata))


def _save_file(save_file, tensors, tmp, metadata) -> None:
    """safetensors' writer, its failures (a full disk among them) as OSError."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as exc:
        raise OSError(f"could not write the checkpoint ({exc})") from exc


#: The largest safetensors header xpnet reads (its own hold a few kilobytes of metadata).
_MAX_HEADER = 64 << 20


def _check_layout(path: Path, handle) -> None:
    """Before any tensor is read: the header's length, and the tensors it declares, must account
    for the file's size exactly, and fit in memory (a sparse or padded file is refused unread)."""
    from .data.limits import format_bytes, memory_limit

    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < length <= min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{path} is corrupted or truncated (no safetensors header of a sane length)")
    try:
        header = json.loads(handle.read(length))
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is corrupted or truncated (its safetensors header is not readable)") from exc
    data = max(ends, default=0)
    if 8 + length + data != size:
        raise CheckpointError(
            f"{path} is corrupted or truncated: its header accounts for {8 + length + data:,} bytes, "
            f"the file has {size:,}"
        )
    limit = memory_limit()
    if limit is not None and data > limit:
        raise CheckpointError(
            f"{path}: its tensors need {format_bytes(data)}, more than the {format_bytes(limit)} here"
        )


def _digest(tensors: dict, document: dict) -> str:
    """SHA-256 over the metadata (as canonical JSON, without the digest itself) and every
    tensor's name, dtype, shape and bytes: damage anywhere in the file shows."""
    digest = hashlib.sha256()
    body = {key: value for key, value in document.items() if key != "sha256"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        digest.update(f"|{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError names what is wrong.

    Refused: a file that cannot be read, is not safetensors, has no xpnet metadata or another
    format, whose SHA-256 does not match its metadata and tensors, or whose tensors hold NaN or
    infinity (training stops before it would save such weights).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as handle:  # a clear reason for an unreadable file, before safetensors' own
            _check_layout(path, handle)
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path} ({exc.strerror or exc})") from exc
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupted or truncated ({exc})") from exc
    try:
        meta = json.loads(metadata["xpnet"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not an xpnet checkpoint (no readable metadata)") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        older = (
            " (written by an older xpnet, which did not checksum the metadata)" if found == "xpnet-checkpoint-1" else ""
        )
        raise CheckpointError(f"{path} has format {found!r}, expected {_FORMAT!r}{older}")
    try:
        intact = meta.get("sha256") == _digest(tensors, meta)
    except (ValueError, TypeError, RecursionError):
        intact = False
    if not intact:
        raise CheckpointError(f"{path} is corrupted or truncated (its metadata and tensors do not match their SHA-256)")
    groups: dict = {"model": {}, "optimizer": {}, "extra": {}}
    for name, value in tensors.items():
        group, _, rest = name.partition("/")
        if group not in groups or not rest:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")
        if group == "optimizer":
            key, _, slot = rest.rpartition("/")
            groups["optimizer"].setdefault(key, {})[slot] = value
        else:
            groups[group][rest] = value
    return Checkpoint(path=path, model=groups["model"], optimizer=groups["optimizer"], extra=groups["extra"], meta=meta)
