"""The MLflow server a sweep starts: loopback only unless asked, a real store, a clean stop;
and the tracking-URI check that runs before any trial."""
from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import processes_under
from mlflow.tracking import MlflowClient

from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.server import check_tracking_uri, free_port


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port`, read from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


# The server tests start servers of their own: a server's start, binding and stop are what they test.


def test_server_binds_loopback_keeps_its_store_in_the_run_directory_and_stops(own_mlflow_server, tmp_path):
    with own_mlflow_server(tmp_path) as server:
        assert listening_addresses(server.port) == {"127.0.0.1"}
        check_tracking_uri(server.uri)
        client = MlflowClient(server.uri)
        experiment = client.create_experiment("check")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "valid_mae", 0.5, step=1)
        assert client.get_metric_history(run.info.run_id, "valid_mae")[0].value == 0.5
    database, artifacts = RunDir(tmp_path).mlflow_db, RunDir(tmp_path).mlflow_artifacts
    assert database.is_file() and database.stat().st_size > 0 and artifacts.is_dir()
    assert server.process.poll() is not None and not listening_addresses(server.port)
    with pytest.raises(MsaError, match="is unreachable"):
        check_tracking_uri(server.uri, timeout=2)


def test_server_binds_another_host_only_when_asked(own_mlflow_server, tmp_path):
    with own_mlflow_server(tmp_path, host="0.0.0.0") as server:
        assert listening_addresses(server.port) == {"0.0.0.0"}


@pytest.mark.parametrize("uri, pattern", [
    ("http://127.0.0.1:{free_port}", r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"),
    ("file:///tmp/mlruns", r"must be an http\(s\) address"),
], ids=["nothing-listens", "file-store"])  # ids fixed at collection (xdist workers must collect alike)
def test_unusable_tracking_uri_is_refused(uri, pattern):
    with pytest.raises(MsaError, match=pattern):
        check_tracking_uri(uri.format(free_port=free_port()), timeout=2)


def wait_for(condition, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# Moments of `msa mlflow`'s start-up at which Ctrl-C comes: the guard launched and the server
# booting (inside MlflowServer.start), the port answering (the start's last health check; the
# moment of the random CI failure), and the command serving.
MLFLOW_MOMENTS = {
    "server booting": lambda run_dir, port, out: RunDir(run_dir).mlflow_log.is_file() and bool(processes_under(run_dir, "mlflow")),
    "port answering": lambda run_dir, port, out: bool(listening_addresses(port)),
    "serving": lambda run_dir, port, out: "MLflow UI for" in out.read_text(),
}


@pytest.mark.parametrize("moment", MLFLOW_MOMENTS)
def test_ctrl_c_at_any_moment_of_msa_mlflow_leaves_no_server_when_it_returns(driver, mlflow_store, tmp_path, moment):
    run_dir = mlflow_store(tmp_path / "run")
    (run_dir / "sweep.yaml").write_text("name: t\n")
    port, out = free_port(), tmp_path / "out.txt"
    with out.open("w") as handle:
        browser = driver.start("mlflow", str(run_dir), "--port", str(port), cwd=tmp_path, stdout=handle)
    try:
        wait_for(lambda: MLFLOW_MOMENTS[moment](run_dir, port, out), moment)
        if moment == "serving":  # it really served the store
            check_tracking_uri(f"http://127.0.0.1:{port}")
            assert MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
    finally:
        browser.send_signal(signal.SIGINT)
        browser.wait(timeout=60)
    assert browser.returncode == 130, out.read_text()
    assert processes_under(run_dir, "mlflow") == [], "the server must stop with the command"
    assert not listening_addresses(port)


@pytest.mark.parametrize("make, pattern", [
    (lambda d: None, r"is not a sweep run directory \(no sweep\.yaml\)"),
    (lambda d: (d / "sweep.yaml").write_text("name: t\n"), r"has no MLflow store \(.*mlflow\.db does not exist\)"),
])
def test_msa_mlflow_refuses_a_directory_without_a_store(tmp_path, capsys, make, pattern):
    from msa.platform.cli import main

    make(tmp_path)
    assert main(["mlflow", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err
