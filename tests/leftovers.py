"""The leftover-process check, a pytest plugin (tests/conftest.py loads it; ``-p leftovers`` loads
it in any other pytest run): when the session ends, no Ray (raylet, gcs_server, its workers and
agents), MLflow server, uvicorn or `msa` process that the session started may still be alive.

The session marks its environment with ``MSA_TEST_SESSION=<id>`` before any test runs, and every
process it starts inherits that environment (pytest-xdist's workers, and all they start, too),
including the ones that leave its process tree (Ray daemonises its node processes, servers start
sessions of their own). At the end, after every fixture was torn down (under pytest-xdist: in the
controller, once its workers have finished), the processes carrying the mark are read from /proc;
those of the kinds above get a few seconds to finish exiting (`ray.shutdown` and a server's stop
return before the last child is gone), then each one still alive is listed, killed, and fails
the run.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARK = "MSA_TEST_SESSION"
LEFTOVERS = pytest.StashKey[list]()  # what the check found, for the summary
GRACE_S = 30.0  # at most this long for processes to finish exiting,
SETTLE_S = 5.0  # and no longer once none went away for this long
# (kind, what its command line holds): the processes a test session must not leave behind
# (the first that matches: MLflow's uvicorn names mlflow too)
KINDS = (
    ("uvicorn", ("uvicorn",)),
    ("Ray", ("raylet", "gcs_server", "ray::", "/ray/dashboard/", "/ray/_private/", "/ray/autoscaler/", "ray_client_server")),
    ("MLflow", ("mlflow",)),
)


@dataclasses.dataclass(frozen=True)
class Leftover:
    pid: int
    kind: str
    command: str


def kind_of(argv: list[str]) -> str | None:
    """The kind of process `argv` is (see `KINDS`; ``msa`` is the console script), or None."""
    if argv and any(Path(arg).name == "msa" for arg in argv[:2]):
        return "msa"
    command = " ".join(argv)
    return next((kind for kind, needles in KINDS if any(needle in command for needle in needles)), None)


def marked_processes(mark: str) -> list[Leftover]:
    """Live processes of the kinds above whose environment carries ``MSA_TEST_SESSION=mark``."""
    needle, found = f"{MARK}={mark}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                continue
            argv = [arg.decode(errors="replace") for arg in (entry / "cmdline").read_bytes().split(b"\0") if arg]
        except OSError:  # it exited while being read
            continue
        kind = kind_of(argv)
        if kind is not None:
            found.append(Leftover(int(entry.name), kind, " ".join(argv)[:300]))
    return found


def is_xdist_worker(config: pytest.Config) -> bool:
    """A pytest-xdist worker runs part of its controller's session: the controller marks and checks."""
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    # A new mark for every session, so a pytest run inside a test is checked on its own; set
    # before pytest-xdist starts its workers, which inherit it.
    if not is_xdist_worker(config):
        os.environ[MARK] = uuid.uuid4().hex
    config.stash[LEFTOVERS] = []


def still_alive(mark: str) -> list[Leftover]:
    """The marked processes once they stop going away: none left, none gone for `SETTLE_S`
    seconds, or `GRACE_S` seconds passed."""
    deadline = time.monotonic() + GRACE_S
    left = marked_processes(mark)
    settled = time.monotonic() + SETTLE_S
    while left and time.monotonic() < min(deadline, settled):
        time.sleep(0.5)
        now = marked_processes(mark)
        if {p.pid for p in now} != {p.pid for p in left}:
            settled = time.monotonic() + SETTLE_S
        left = now
    return left


@pytest.hookimpl(trylast=True)  # in pytest-xdist's controller: after its workers are gone
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if is_xdist_worker(session.config):
        return
    left = still_alive(os.environ[MARK])
    for process in left:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    session.config.stash[LEFTOVERS] = left
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if is_xdist_worker(config):
        return
    left = config.stash.get(LEFTOVERS, [])
    if not left:
        terminalreporter.write_line("leftover check: no Ray, MLflow, uvicorn or msa process of this session is alive")
        return
    terminalreporter.section("processes left behind", sep="=", red=True, bold=True)
    for process in left:
        terminalreporter.write_line(f"{process.kind} pid {process.pid}: {process.command}")
    terminalreporter.write_line(f"leftover check FAILED: {len(left)} process(es) of this session were still alive "
                                f"after it ended (killed now)", red=True)

