"""Progress through an epoch's training batches, for `msa train` (`jobs.train` makes one and
hands it to `train_seed_group`; sweep trials and the ensembles' retrainings train without one).

On a terminal it keeps one line on the stream, redrawn in place (``\\r``) at most every
`REDRAW_S` seconds: a bar, batch n/N, percent, elapsed<ETA and rate, then what the epoch does
after its batches (predicting valid, test); when the epoch ends the line is cleared, so the
epoch's summary takes its place. Anywhere else (a log file, a pipe) it prints a plain line each
time another tenth of the epoch's batches is done, so a log holds at most ten lines per epoch,
the same ones on every run. A batch costs a counter increment and a comparison (on a terminal,
also a clock read, which makes no system call); the stream is written only when a line is due.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

REDRAW_S = 0.1
STEPS = 10  # plain lines per epoch
BAR_WIDTH = 16  # keeps the line within 80 columns: a wrapped line cannot be redrawn with \r


def clock_text(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate_text(batches: int, seconds: float) -> str:
    """Batches per second, or seconds per batch when a batch takes longer than a second."""
    if batches == 0 or seconds <= 0:
        return "? batch/s"
    rate = batches / seconds
    return f"{rate:.1f} batch/s" if rate >= 1 else f"{1 / rate:.1f} s/batch"


class EpochProgress:
    """Shows how far the current epoch's training has come; one instance serves every epoch
    (and every seed of a seed group) of a run, one epoch at a time."""

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic):
        """`stream`: where to write (standard error if None); a terminal gets the redrawn line."""
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        self.label, self.total, self.done = "", 0, 0
        self.started = self.drawn_at = 0.0
        self.due = 0  # the batch count at which the next plain line is printed
        self.width = 0  # of the line now on the terminal, to blank it out

    def start(self, label: str, total: int) -> None:
        """A new epoch (`label`, e.g. ``epoch 3/30``) of `total` training batches begins."""
        self.label, self.total, self.done = label, total, 0
        self.started = self.drawn_at = self.clock()
        self.due = self._next_due(0)
        if self.tty:
            self._draw(self._bar(self.started))

    def advance(self) -> None:
        """One more training batch is done."""
        self.done += 1
        if self.tty:
            now = self.clock()
            if now - self.drawn_at >= REDRAW_S or self.done == self.total:
                self.drawn_at = now
                self._draw(self._bar(now))
        elif self.done >= self.due:
            self.due = self._next_due(self.done)
            self.stream.write(self._plain(self.clock()) + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """What the epoch does after its batches (e.g. ``predicting valid``): shown on a terminal
        in place of the ETA; a plain log already has its 100% line."""
        if self.tty:
            self._draw(self._bar(self.clock(), text))

    def finish(self) -> None:
        """The epoch is over (or failed): clear the terminal line for what is printed next."""
        if self.tty and self.width:
            self._draw("")

    def _next_due(self, done: int) -> int:
        """The smallest batch count beyond `done` that completes another tenth of the epoch."""
        tenth = done * STEPS // self.total + 1 if self.total else STEPS
        return -(-tenth * self.total // STEPS)

    def _percent(self) -> int:
        return 100 * self.done // self.total if self.total else 100

    def _eta(self, elapsed: float) -> str:
        return clock_text(elapsed / self.done * (self.total - self.done)) if self.done else "?"

    def _bar(self, now: float, note: str = "") -> str:
        elapsed = now - self.started
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        head = f"{self.label} [{bar}] {self.done}/{self.total} {self._percent():3d}%"
        if note:
            return f"{head} {clock_text(elapsed)}, {note}"
        return f"{head} {clock_text(elapsed)}<{self._eta(elapsed)} {rate_text(self.done, elapsed)}"

    def _plain(self, now: float) -> str:
        elapsed = now - self.started
        return (f"{self.label}: batch {self.done}/{self.total} ({self._percent()}%), {clock_text(elapsed)} elapsed, "
                f"ETA {self._eta(elapsed)}, {rate_text(self.done, elapsed)}")

    def _draw(self, line: str) -> None:
        """Overwrite the terminal line with `line`, blanking what is left of a longer one."""
        self.stream.write("\r" + line.ljust(self.width) + ("" if line else "\r"))
        self.stream.flush()
        self.width = len(line)
