"""The leftover-process check (`leftovers.py`) at work on a pytest session of its own, whose one
test starts `msa mlflow` and walks away from it. The test passes, yet the run fails, naming what
it left (the command, its MLflow server and guard, uvicorn), and nothing of it is alive afterwards.
That the check passes a session that stops what it starts, the whole suite shows on every run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import MSA, processes_under

from msa.platform.tracking.server import free_port

INNER = '''
import subprocess
import time
import urllib.request


def serving(run_dir, port):
    """`msa mlflow RUN_DIR` once it answers: the command, the guard, the server and uvicorn all run."""
    process = subprocess.Popen([{msa!r}, "mlflow", run_dir, "--port", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{{port}}/health", timeout=2)
            return process
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.5)


def test_leaves_a_server_running():
    serving({left!r}, {left_port})
'''


def test_a_session_that_leaves_a_server_running_fails_naming_it_and_nothing_is_left(driver, mlflow_store, tmp_path):
    left = mlflow_store(tmp_path / "left")
    (left / "sweep.yaml").write_text("name: t\n")
    (tmp_path / "test_inner.py").write_text(INNER.format(msa=MSA, left=str(left), left_port=free_port()))
    env = {key: value for key, value in driver.env.items() if key != "PYTEST_ADDOPTS"}  # a plain pytest run
    env["PYTHONPATH"] = str(Path(__file__).parent)  # where leftovers.py is
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "leftovers", "-p", "no:cacheprovider", "-q",
                           "test_inner.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = done.stdout[done.stdout.find("processes left behind"):]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout and "leftover check FAILED" in report, done.stdout[-3000:]
    listed = [line for line in report.splitlines() if " pid " in line]
    assert {line.split(" pid ")[0] for line in listed} == {"msa", "MLflow", "uvicorn"}, listed
    assert all(str(left) in line for line in listed if not line.startswith("uvicorn")), listed  # uvicorn's names no folder
    assert processes_under(left) == []
