"""A progress bar for fit: live on a terminal, plain lines otherwise.

It reads the running loss from the device only when it redraws (10 times a second on a terminal,
every 10 seconds in a log), never per batch.
"""

from __future__ import annotations

import time

from xpnet.train import Callback


def format_logs(logs: dict) -> str:
    parts = []
    for key in ("loss", "accuracy", "binary_accuracy", "val_loss", "val_accuracy", "val_binary_accuracy"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4f}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar(Callback):
    """One bar per epoch (loss, samples/s, time left) and a summary line at the end of each epoch."""

    def __init__(self, stream, *, interactive: bool, width: int = 24, refresh: float | None = None):
        self.stream = stream
        self.interactive = interactive
        self.width = width
        self.refresh = refresh if refresh is not None else (0.1 if interactive else 10.0)

    def on_epoch_begin(self, state):
        self.started = self.last_draw = time.perf_counter()

    def on_batch_end(self, state):
        now = time.perf_counter()
        last_batch = state.step == state.steps_per_epoch - 1
        if now - self.last_draw < self.refresh or (last_batch and not self.interactive):
            return
        self.last_draw = now
        done = state.samples_seen / state.num_samples
        rate = state.samples_seen / max(now - self.started, 1e-9)
        left = (state.num_samples - state.samples_seen) / rate
        text = (
            f"epoch {state.epoch + 1}/{state.epochs} {100 * done:3.0f}%  loss {state.running_loss():.4f}  "
            f"{rate:,.0f} samples/s  {_duration(left)} left"
        )
        if self.interactive:
            filled = int(round(self.width * done))
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {text}\033[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def on_epoch_end(self, state, logs):
        seconds = logs.get("seconds", time.perf_counter() - self.started)
        rate = state.num_samples / max(seconds, 1e-9)
        prefix = "\r\033[K" if self.interactive else ""
        self.stream.write(
            f"{prefix}epoch {state.epoch + 1}/{state.epochs}  {format_logs(logs)}  "
            f"{seconds:.1f}s  {rate:,.0f} samples/s\n"
        )
        self.stream.flush()
