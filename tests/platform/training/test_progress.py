"""The epoch progress printer (`progress.py`) on a fake clock: plain lines at each tenth of the
batches with exact elapsed, ETA and rate when the stream is not a terminal; on a terminal one
line redrawn at most ten times a second and cleared at the end of the epoch. `train_loop` shows
it only when given one; `msa train` gives one (test_cli.py)."""
from __future__ import annotations

import io
import re

import pytest

from msa.platform.training.loop import train_loop
from msa.platform.training.progress import EpochProgress, clock_text, rate_text


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_epoch(progress: EpochProgress, clock: FakeClock, batches: int, seconds_per_batch: float) -> None:
    progress.start("epoch 1/3", batches)
    for _ in range(batches):
        clock.now += seconds_per_batch
        progress.advance()


@pytest.mark.parametrize(
    ("batches", "printed_at"),
    [
        (24, [3, 5, 8, 10, 12, 15, 17, 20, 22, 24]),  # the first batch count in each tenth
        (10, list(range(1, 11))),
        (3, [1, 2, 3]),  # fewer batches than tenths: every batch
        (1, [1]),
    ],
)
def test_plain_lines_at_each_tenth_of_the_batches(batches, printed_at):
    clock, stream = FakeClock(), io.StringIO()
    run_epoch(EpochProgress(stream, clock=clock), clock, batches, 0.5)
    found = [re.match(rf"epoch 1/3: batch (\d+)/{batches} \((\d+)%\), ", line).groups()
             for line in stream.getvalue().splitlines()]
    assert [int(done) for done, _ in found] == printed_at
    assert [int(percent) for _, percent in found] == [100 * done // batches for done in printed_at]


def test_plain_line_has_elapsed_eta_and_rate():
    clock, stream = FakeClock(), io.StringIO()
    run_epoch(EpochProgress(stream, clock=clock), clock, 240, 0.5)
    lines = stream.getvalue().splitlines()
    # 24 batches of 0.5 s: 12 s elapsed, 216 batches left at 2 batch/s = 108 s
    assert lines[0] == "epoch 1/3: batch 24/240 (10%), 0:12 elapsed, ETA 1:48, 2.0 batch/s"
    assert lines[-1] == "epoch 1/3: batch 240/240 (100%), 2:00 elapsed, ETA 0:00, 2.0 batch/s"


def test_terminal_redraws_one_line_at_most_ten_times_a_second_and_clears_it():
    clock, stream = FakeClock(), Terminal()
    progress = EpochProgress(stream, clock=clock)
    run_epoch(progress, clock, 300, 0.01)  # 3 s of batches
    progress.note("predicting valid")
    progress.finish()
    text = stream.getvalue()
    assert "\n" not in text
    draws = text.split("\r")[1:]
    # the start, the redraws, the note, the clearing and its closing \r: at most one redraw per
    # 0.1 s of the 3 s, and the last batch's
    assert 25 <= len(draws) - 4 <= 31
    assert draws[0].startswith("epoch 1/3 [----------------] 0/300   0% 0:00<?")
    assert draws[-4].rstrip() == "epoch 1/3 [################] 300/300 100% 0:03<0:00 100.0 batch/s"
    assert draws[-3].rstrip() == "epoch 1/3 [################] 300/300 100% 0:03, predicting valid"
    assert draws[-2] == " " * len(draws[-3].rstrip()) and draws[-1] == ""
    assert all(len(draw) <= 80 for draw in draws)


def test_time_and_rate_texts():
    assert [clock_text(s) for s in (0, 59.9, 61, 3599, 3661)] == ["0:00", "0:59", "1:01", "59:59", "1:01:01"]
    assert [rate_text(3, 2.0), rate_text(1, 4.0), rate_text(0, 1.0)] == ["1.5 batch/s", "4.0 s/batch", "? batch/s"]


def test_train_loop_shows_no_progress_unless_given_one(synth_regression_pkl, tmp_path, capsys):
    """Sweep trials and the ensembles' retrainings call it so: nothing per batch in their logs."""
    capsys.readouterr()
    train_loop({"data": str(synth_regression_pkl), "out": str(tmp_path / "run"), "epochs": 1, "batch_size": 8})
    captured = capsys.readouterr()
    assert "batch" not in captured.err + captured.out
