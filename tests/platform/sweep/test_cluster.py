"""Joining a Ray cluster: a real two-node cluster on this machine (`ray start --head` plus a second
`ray start --address`), swept with `msa sweep --address`, and the checks that refuse what would
hang or scatter a sweep.

Node B runs in its own mount namespace with a private tmpfs over one folder, so that folder is
node-local storage the head cannot share, as on two machines.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import Driver, sweep_yaml, synth_data

from msa.platform.core.errors import MsaError
from msa.platform.sweep.cluster import (
    NodeKind,
    TrialShape,
    check_trial_fits,
    launcher_node_kinds,
    require_run_dir,
    trial_shape,
)
from msa.platform.sweep.config import ResourcesConfig

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Per-node agent ports: two nodes on one machine cannot share Ray's defaults."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True).returncode == 0


@dataclass
class TwoNodes:
    address: str  # the head's GCS, HOST:PORT
    client_address: str  # ray://HOST:PORT
    env: dict[str, str]  # what a driver needs to join (the cluster's token)
    node_local: Path  # node B sees a private, empty folder here
    private_view: bool  # whether node B really has that private folder (needs unshare)




def wait_for_nodes(address: str, count: int, env: dict[str, str]) -> None:
    """Until `ray status` (which asks the GCS alone) lists `count` active nodes with their raylets."""
    deadline = time.monotonic() + 120
    while True:
        status = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env, capture_output=True,
                                text=True, timeout=60).stdout
        if len(re.findall(r"^\s+1 node_[0-9a-f]{16,}", status, re.MULTILINE)) >= count:
            return
        assert time.monotonic() < deadline, f"{count} nodes did not come up:\n{status}"
        time.sleep(1)


def kill_cluster(groups: list[subprocess.Popen], marker: str) -> None:
    """Stop both nodes by process group, then anything else carrying this cluster's marker in its
    environment (Ray moves some actors into groups of their own). `ray stop` would also stop the
    test session's own Ray runtime."""
    for process in groups:
        with _ignored(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    needle = f"MSA_TEST_CLUSTER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with _ignored(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)


class _ignored:
    def __init__(self, *errors):
        self.errors = errors

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, self.errors)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A two-node Ray cluster of the module's own (joining one is what these tests are about)."""
    root = tmp_path_factory.mktemp("cluster")
    node_local = root / "node_local"
    node_local.mkdir()
    marker = uuid.uuid4().hex
    # Ray's default RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S (30 s) is kept: the head's Ray Client
    # server forks a process per client while its gRPC threads run, and that process now and then
    # dies at once; the client then waits out this timeout before `connect` tries again (it took
    # 180 s when this fixture raised it). The process starts in about 6 s here: the cluster tests
    # run before anything else starts (conftest.py).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "MSA_TEST_CLUSTER": marker}
    env.pop("RAY_ADDRESS", None)
    port, client_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    groups: list[subprocess.Popen] = []
    ray_temp = Path(tempfile.mkdtemp(prefix="msa-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        with (root / "head.log").open("w") as log:
            groups.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                 "--ray-client-server-port", str(client_port), "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(free_port()), "--temp-dir", str(ray_temp),
                 "--num-cpus", "1", "--resources", json.dumps({"trial_slot": 2}), *node_ports()],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_nodes(address, 1, env)
        node_b = [str(BIN / "ray"), "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
                  "--num-cpus", "1", "--resources", json.dumps({"trial_slot": 2, "node_b": 1}), *node_ports()]
        private_view = can_unshare()
        if private_view:
            quoted = " ".join(f"'{arg}'" for arg in node_b)
            node_b = ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs tmpfs '{node_local}' && exec {quoted}"]
        with (root / "node_b.log").open("w") as log:
            groups.append(subprocess.Popen(node_b, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_nodes(address, 2, env)
        yield TwoNodes(address, f"ray://127.0.0.1:{client_port}", env, node_local, private_view)
    finally:
        kill_cluster(groups, marker)
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_tracking(mlflow_server):
    """An MLflow server both nodes reach: the session's (the nodes share this machine's loopback)."""
    return mlflow_server.uri


def write_sweep(folder: Path, storage: Path, tracking_uri: str) -> Path:
    """One trial of two 1-CPU workers on `cluster.pkl`, logging to `tracking_uri` (its registered
    name, msa-baseline-cluster, is its own), stored under `storage`."""
    return sweep_yaml(folder, name="cluster", storage=str(storage), datasets=[str(synth_data(folder, "cluster"))],
                      resources={"workers_per_trial": 2, "cpus_per_worker": 1},
                      tracking={"uri": tracking_uri})


def msa_sweep(driver: Driver, config: Path, address: str, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return driver.run("sweep", str(config), *overrides, "--address", address, cwd=config.parent, env=env)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("msa: error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_sweep_on_two_nodes_places_each_trials_ranks_on_both(two_nodes, cluster_tracking, driver, tmp_path):
    storage = tmp_path / "shared" / "runs"  # one folder both nodes see: shared storage
    done = msa_sweep(driver, write_sweep(tmp_path, storage, cluster_tracking), two_nodes.address, two_nodes.env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"[cluster] joined {two_nodes.address}: 2 nodes alive" in done.stdout

    (run_dir,) = storage.glob("cluster-*")
    (row,) = json.loads((run_dir / "summary.json").read_text())
    assert (row["trials"], row["complete"], row["failed"]) == (1, 1, 0)
    trial_folders = sorted((run_dir / "trials" / "baseline-cluster").iterdir())
    assert len(trial_folders) == 1 and all((f / "metrics.json").is_file() for f in trial_folders)

    # Ray's own records: where every Train worker and every trial's Tune function ran.
    probe = driver.python(
        "import json, ray\n"
        "from ray.util.state import list_actors\n"
        f"ray.init(address={two_nodes.address!r}, logging_level='ERROR')\n"
        "node_b = {n['NodeID'] for n in ray.nodes() if 'node_b' in n['Resources']}\n"
        "rows = [{'cls': a.class_name, 'on_b': a.node_id in node_b, 'node': a.node_id}\n"
        f"        for a in list_actors(address={two_nodes.address!r}, limit=10000, detail=True)\n"
        "        if a.class_name in ('RayTrainWorker', 'ImplicitFunc')]\n"
        "print(json.dumps(rows))\n", cwd=tmp_path, env=two_nodes.env, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    placed = json.loads(probe.stdout)
    workers = [a for a in placed if a["cls"] == "RayTrainWorker"]
    # Each node has one CPU and the trial two 1-CPU ranks: its ranks span both nodes.
    assert len(workers) == 2
    assert sum(a["on_b"] for a in workers) == 1 and len({a["node"] for a in workers}) == 2
    assert len([a for a in placed if a["cls"] == "ImplicitFunc"]) == 1

    from msa.platform.tracking.client import client

    mlflow = client(cluster_tracking)
    experiment = mlflow.get_experiment_by_name(run_dir.name)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string="tags.`msa.role` = 'trial'")
    assert sorted(r.data.tags["ray_trial_id"] for r in runs) == [f.name for f in trial_folders]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_node_local_storage_is_refused_on_a_multi_node_cluster(two_nodes, cluster_tracking, driver, tmp_path):
    if not two_nodes.private_view:
        pytest.skip("needs `unshare -Urm` to give node B a folder the head does not share")
    storage = two_nodes.node_local / "runs"
    done = msa_sweep(driver, write_sweep(tmp_path, storage, cluster_tracking), two_nodes.client_address, two_nodes.env)
    line = one_line_error(done)
    assert "cannot see the sweep's run directory" in line and "Ray no longer syncs trial folders to the head" in line
    assert not storage.exists()  # the refused sweep left no run directory (nor the storage folder it made)


def test_a_request_no_node_can_hold_fails_fast_naming_it(two_nodes, cluster_tracking, driver, tmp_path):
    config = write_sweep(tmp_path, tmp_path / "runs", cluster_tracking)
    # Without RAY_AUTH_MODE the driver must present the cluster's token itself, as `ray start` does.
    token_only = {k: v for k, v in two_nodes.env.items() if k != "RAY_AUTH_MODE"}
    line = one_line_error(msa_sweep(driver, config, two_nodes.address, token_only, "resources.worker_resources.node_b=1"))
    assert "a trial needs 2 workers x {CPU: 1, node_b: 1}" in line and "at most 1 such workers" in line
    line = one_line_error(msa_sweep(driver, config, two_nodes.address, two_nodes.env, "resources.placement=STRICT_PACK"))
    assert "(placement STRICT_PACK)" in line and "at most 1 such workers on one node" in line
    assert not (tmp_path / "runs").exists()


def test_the_sweeps_own_mlflow_server_is_refused_on_a_multi_node_cluster(two_nodes, driver, tmp_path):
    config = write_sweep(tmp_path, tmp_path / "runs", "")
    line = one_line_error(msa_sweep(driver, config, two_nodes.address, two_nodes.env))
    assert "tracking.uri is empty" in line and "trials on other machines cannot reach" in line


def test_an_address_where_nothing_listens_fails_in_seconds(driver, tmp_path):
    """Ray alone retries such an address for minutes; this message comes from the sweep's own 5 s
    check. (A process of its own: a process that already runs Ray refuses any address first. A
    malformed address: test_bad_inputs.py.)"""
    config = write_sweep(tmp_path, tmp_path / "runs", "")
    line = one_line_error(msa_sweep(driver, config, f"127.0.0.1:{free_port()}", driver.env))
    assert "nothing answers at 127.0.0.1:" in line


GPU_NODE = {"CPU": 48, "GPU": 4, "trial_slot": 4}


@pytest.mark.parametrize(("shape", "kinds", "refusal"), [
    (TrialShape(4, {"CPU": 8, "GPU": 1}, "STRICT_PACK", False), [NodeKind("gpu", GPU_NODE, 4)], None),
    (TrialShape(8, {"CPU": 8, "GPU": 1}, "PACK", False), [NodeKind("gpu", GPU_NODE, 4)], None),
    (TrialShape(8, {"CPU": 8, "GPU": 1}, "STRICT_PACK", False), [NodeKind("gpu", GPU_NODE, 4)],
     "at most 4 such workers on one node"),
    (TrialShape(8, {"CPU": 8, "GPU": 1}, "STRICT_SPREAD", False), [NodeKind("gpu", GPU_NODE, 4)],
     "at most 4 such workers on distinct nodes"),
    (TrialShape(2, {"CPU": 1}, "PACK", False), [NodeKind("cpu", {"CPU": 16}, 1)], "no node has a 'trial_slot'"),
    (TrialShape(1, {"CPU": 1, "GPU": 1}, "PACK", True), [NodeKind("head", {"CPU": 8, "trial_slot": 1}, 1),
                                                          NodeKind("gpu", {"CPU": 8, "GPU": 1}, 2)],
     "a trial needs one node with {CPU: 1, GPU: 1, trial_slot: 1}"),
    (TrialShape(1, {"CPU": 1, "GPU": 1}, "PACK", True), [NodeKind("gpu", GPU_NODE, 1)], None),
])
def test_trial_fit_counts_nodes_by_placement(shape, kinds, refusal):
    if refusal is None:
        check_trial_fits(shape, kinds)
    else:
        with pytest.raises(MsaError, match=refusal.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
            check_trial_fits(shape, kinds)


@pytest.mark.parametrize("inline", [True, False])
def test_one_resource_bundle_gives_the_fit_check_tunes_request_and_the_workers(inline):
    """`trial_shape` is the one source: Tune's request for the trial function, each Ray Train
    worker's bundle and the fit check all read it, so they cannot drift apart."""
    resources = ResourcesConfig(workers_per_trial=1 if inline else 2, cpus_per_worker=2.0, gpus_per_worker=0.5,
                                worker_resources={"accelerator_type:H100": 0.001}, inline_single_worker=True)
    shape = trial_shape(resources)
    per_worker = {"CPU": 2.0, "GPU": 0.5, "accelerator_type:H100": 0.001}
    assert shape.inline is inline and shape.per_worker == per_worker and shape.use_gpu
    # An inline trial trains in the Tune function's process, which holds the worker's share.
    assert shape.tune_request == ({**per_worker, "trial_slot": 1} if inline else {"CPU": 0, "trial_slot": 1})
    node = {"CPU": 8.0, "GPU": 1.0, "trial_slot": 2.0}
    with pytest.raises(MsaError, match=r"accelerator_type:H100"):  # the custom resource is checked too
        check_trial_fits(shape, [NodeKind("gpu", node, 1)])
    check_trial_fits(shape, [NodeKind("gpu", {**node, "accelerator_type:H100": 1.0}, 1)])
    cpu_only = trial_shape(ResourcesConfig(gpus_per_worker=0.0))
    assert "GPU" not in cpu_only.per_worker and not cpu_only.use_gpu


def test_the_launcher_configs_node_types_hold_a_multi_gpu_trial_but_not_more_gpus_than_exist(repo_root):
    kinds = launcher_node_kinds(yaml.safe_load((repo_root / "ray_cluster.yaml").read_text()))
    gpu = next(kind for kind in kinds if kind.resources.get("GPU"))
    assert gpu.count >= 2 and gpu.resources["GPU"] >= 2 and gpu.resources["trial_slot"] >= 1
    check_trial_fits(TrialShape(int(gpu.resources["GPU"]), {"CPU": 4, "GPU": 1}, "STRICT_PACK", False), kinds)
    too_many = int(gpu.resources["GPU"] * gpu.count) + 1
    with pytest.raises(MsaError, match="cluster can hold at most"):
        check_trial_fits(TrialShape(too_many, {"CPU": 4, "GPU": 1}, "PACK", False), kinds)


def test_a_trial_refuses_a_node_that_does_not_see_the_run_directory(tmp_path):
    with pytest.raises(MsaError, match="cannot see the sweep's run directory"):
        require_run_dir(tmp_path / "elsewhere")
    (tmp_path / "sweep.yaml").write_text("name: x\n")
    require_run_dir(tmp_path)


def test_the_cluster_sweep_fits_the_launcher_configs_gpu_nodes_and_strict_pack_caps_it_at_one(repo_root):
    from msa.platform.sweep.cluster import trial_shape
    from msa.platform.sweep.config import load_sweep_config

    kinds = launcher_node_kinds(yaml.safe_load((repo_root / "ray_cluster.yaml").read_text()))
    config = load_sweep_config(repo_root / "sweeps" / "cluster.yaml")
    assert config.resources.gpus_per_worker >= 1 and config.storage.startswith("/mnt/")
    check_trial_fits(trial_shape(config.resources), kinds)
    four = load_sweep_config(repo_root / "sweeps" / "cluster.yaml", ["resources.workers_per_trial=4"])
    check_trial_fits(trial_shape(four.resources), kinds)  # 4 GPUs of one node
    five = load_sweep_config(repo_root / "sweeps" / "cluster.yaml", ["resources.workers_per_trial=5"])
    with pytest.raises(MsaError, match="at most 4 such workers on one node"):
        check_trial_fits(trial_shape(five.resources), kinds)


def test_a_private_runtime_serves_its_dashboard_on_loopback_only(ray_driver, tmp_path):
    """A sweep's own Ray runtime: the dashboard answers on 127.0.0.1 and refuses the machine's
    network address."""
    probe = textwrap.dedent("""
        import socket, ray
        from msa.platform.sweep.cluster import connect
        connect(None, 1)
        host, port = ray._private.worker.global_worker.node.address_info["webui_url"].split(":")
        node_ip = ray.util.get_node_ip_address()
        socket.create_connection((host, int(port)), timeout=5).close()
        try:
            socket.create_connection((node_ip, int(port)), timeout=5).close()
            print("reachable", host, node_ip)
        except ConnectionRefusedError:
            print("loopback only", host, node_ip)
    """)
    done = ray_driver.python(probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    *verdict, host, node_ip = done.stdout.split()[-4:]
    assert node_ip != "127.0.0.1", "the machine has no other address to check"
    assert (verdict, host) == (["loopback", "only"], "127.0.0.1"), done.stdout
