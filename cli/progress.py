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
    """One bar per epoch (loss, samples/s, time left) and a summary line at the end of each epoch.

    On a terminal the bar is rich's (``rich.progress``, which typer brings): redrawn by this
    callback at most every ``refresh`` seconds, with no refresh thread of rich's own, so that a
    training step costs what it costs without a bar. Elsewhere (a log file, a pipe) plain lines,
    one every ``refresh`` seconds (10 by default)."""

    def __init__(self, stream, *, interactive: bool, width: int = 24, refresh: float | None = None):
        self.stream = stream
        self.interactive = interactive
        self.width = width
        self.refresh = refresh if refresh is not None else (0.1 if interactive else 10.0)
        self._bar = None  # (rich Progress, its task) while an epoch's bar is live

    def on_epoch_begin(self, state):
        self.started = self.last_draw = time.perf_counter()
        if self.interactive:
            self._bar = _rich_bar(self.stream, self.width, state)

    def on_batch_end(self, state):
        now = time.perf_counter()
        last_batch = state.step == state.steps_per_epoch - 1
        if now - self.last_draw < self.refresh or (last_batch and not self.interactive):
            return
        self.last_draw = now
        done = state.samples_seen / state.num_samples
        rate = state.samples_seen / max(now - self.started, 1e-9)
        left = (state.num_samples - state.samples_seen) / rate
        loss = state.running_loss()
        if self._bar is not None:
            progress, task = self._bar
            info = f"loss {loss:.4f}  {rate:,.0f} samples/s  {_duration(left)} left"
            progress.update(task, completed=state.samples_seen, info=info)
            progress.refresh()
            return
        self.stream.write(
            f"epoch {state.epoch + 1}/{state.epochs} {100 * done:3.0f}%  loss {loss:.4f}  "
            f"{rate:,.0f} samples/s  {_duration(left)} left\n"
        )
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            progress, self._bar = self._bar[0], None
            progress.stop()

    def on_epoch_end(self, state, logs):
        self._close_bar()
        seconds = logs.get("seconds", time.perf_counter() - self.started)
        rate = state.num_samples / max(seconds, 1e-9)
        self.stream.write(
            f"epoch {state.epoch + 1}/{state.epochs}  {format_logs(logs)}  {seconds:.1f}s  {rate:,.0f} samples/s\n"
        )
        self.stream.flush()

    def on_train_end(self, state):
        self._close_bar()  # an epoch cut short (Ctrl-C, an error): the terminal's cursor back


def _rich_bar(stream, width: int, state):
    """A started rich Progress on ``stream`` with one task for this epoch; transient, so that the
    epoch's summary line takes its place."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    progress = Progress(
        TextColumn(f"epoch {state.epoch + 1}/{state.epochs}"),
        BarColumn(bar_width=width),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(file=stream, force_terminal=True),
        auto_refresh=False,
        transient=True,
    )
    task = progress.add_task("train", total=state.num_samples, info="")
    progress.start()
    return progress, task
