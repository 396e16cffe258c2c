"""The Ray runtime a sweep runs on: a private one on this machine, or a cluster it joins.

`connect` starts the private runtime or joins a running cluster (``auto``, ``host:port`` or a
``ray://`` client address; ``RAY_ADDRESS`` when none is given, as under ``ray job submit``).
Before any trial is queued, `check_trial_fits` refuses a trial no node could ever hold (a trial
Tune cannot place waits forever), counting the nodes alive now and the node types the
autoscaler may add. On a joined cluster `check_shared_storage` then proves that every alive node
sees the sweep's storage and reaches its MLflow server: Ray no longer syncs trial folders to
the head, so a folder only the driver's node has would silently split a sweep's checkpoints
across machines. Nodes the autoscaler adds later are checked by each trial at its start
(`require_run_dir`, in the Tune trial actor). `_autoscaler_kinds` and `_look_from_node` run as
remote Ray tasks on the node they ask about.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from msa.platform.core.compat import autoscaler_node_groups, present_cluster_token
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.server import check_tracking_uri

# Custom resource: one per concurrently running trial. Tune's trial function must ask for some
# resource, and `{"CPU": 0}` alone is refused by Ray 2.60, while the default (1 CPU) would make a
# 2-worker trial need 3 CPUs on a 2-CPU node and never start.
TRIAL_SLOT = "trial_slot"
# Where `ray up` leaves the autoscaler's config on the head node (the driver's node under `ray job submit`).
LAUNCHER_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()
NODE_ANSWER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NodeKind:
    """Resources of one node (alive, or a type the autoscaler can start) and how many there can be."""

    name: str
    resources: dict[str, float]
    count: int  # nodes of this kind that can exist at once


@dataclass(frozen=True)
class TrialShape:
    """What one trial asks Ray for: the one source of the fit check (`check_trial_fits`), Tune's
    request (`tune_request`) and Ray Train's ScalingConfig (`per_worker`, `use_gpu`, `placement`).

    A one-worker inline trial is a single bundle (the worker's resources plus a trial slot), since
    it trains in the Tune function's own process; otherwise the Tune function takes a trial slot
    and Ray Train places `workers` bundles of `per_worker` with `placement`.
    """

    workers: int
    per_worker: dict[str, float]
    placement: str
    inline: bool

    @property
    def use_gpu(self) -> bool:
        return self.per_worker.get("GPU", 0) > 0

    @property
    def tune_request(self) -> dict[str, float]:
        """The resources of the Tune trial function itself."""
        return {**(self.per_worker if self.inline else {"CPU": 0}), TRIAL_SLOT: 1}


def connect(address: str | None, local_trial_slots: int, *, log_to_driver: bool = True) -> str | None:
    """Start a private runtime on this machine, or join the cluster at `address` (or RAY_ADDRESS).
    `log_to_driver`: whether trial processes' output is printed by the driver too (it is always
    in the session's log folder, `msa.platform.core.compat.ray_logs_dir`).

    Returns the address joined (None: a private runtime).

    Raises:
        MsaError: nothing answers at the address.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(
            resources={TRIAL_SLOT: local_trial_slots},
            # The dashboard's State API must run: without it Train V2 leaks the placement group of
            # every trial that ASHA stops, and later trials wait forever (Ray 2.60). Loopback only.
            dashboard_host="127.0.0.1",
            log_to_driver=log_to_driver,
            logging_level=logging.INFO if log_to_driver else logging.WARNING,
        )
        return None
    _require_listener(address)
    present_cluster_token()
    # A Ray Client session needs a server process the head starts per client; a busy head can
    # miss Ray's 30 s deadline for it ("Initialization failure from server"): one more try.
    for _ in range(2 if address.startswith("ray://") else 1):
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
            return address
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            ray.shutdown()
    raise MsaError(f"cannot join the Ray cluster at {address!r}: {first_line} "
                   f"(is it running? `ray status --address ...` on a node says)")


def check_address_format(address: str) -> tuple[str, int] | None:
    """HOST and PORT of a cluster address (None for ``auto``).

    Raises:
        MsaError: not auto, HOST:PORT or ray://HOST:PORT.
    """
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MsaError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def _require_listener(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds where nothing listens at HOST:PORT (Ray itself retries for minutes)."""
    host_port = check_address_format(address)
    if host_port is None:
        return
    host, port = host_port
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except OSError as exc:
        raise MsaError(f"cannot join the Ray cluster at {address!r}: nothing answers at {host}:{port} "
                       f"({exc.strerror or exc}); is the cluster up (`ray status` on its head)?") from None


def trial_shape(resources) -> TrialShape:
    """The shape of one trial for a sweep's `resources` section."""
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}),
                  **resources.worker_resources}
    return TrialShape(workers=resources.workers_per_trial, per_worker=per_worker, placement=resources.placement,
                      inline=resources.workers_per_trial == 1 and resources.inline_single_worker)


def node_kinds(joined: bool) -> list[NodeKind]:
    """The alive nodes, plus, on a joined cluster, the node types its autoscaler can start."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    kinds = [NodeKind(f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]})", dict(n["Resources"]), 1) for n in nodes]
    head = next((n for n in nodes if "node:__internal_head__" in n["Resources"]), None)
    if not joined or head is None:
        return kinds
    # Asked on the head: a Ray Client driver has no state API, and the launcher's file is there.
    ask = ray.remote(num_cpus=0, max_retries=0)(_autoscaler_kinds)
    return kinds + ray.get(ask.options(scheduling_strategy=_on_node(head)).remote(), timeout=NODE_ANSWER_TIMEOUT_S)


def _on_node(node: dict):
    return NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)


def _autoscaler_kinds() -> list[NodeKind]:
    """Runs on the head: the node types in Ray's own record of the cluster config, else in the
    cluster launcher's config file."""
    groups = autoscaler_node_groups()
    if groups:
        return [NodeKind(f"node type {g.name}", dict(g.resources), _count(g.max_count)) for g in groups]
    if LAUNCHER_CONFIG.is_file():
        return launcher_node_kinds(yaml.safe_load(LAUNCHER_CONFIG.read_text()) or {})
    return []


def _count(max_count: int) -> int:
    return 1 << 20 if max_count < 0 else int(max_count)


def launcher_node_kinds(config: dict[str, Any]) -> list[NodeKind]:
    """Node types of a cluster-launcher config (`ray_cluster.yaml`): the head plus up to
    `max_workers` of each worker type."""
    kinds = []
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = 1 if name == head else int(node_type.get("max_workers", config.get("max_workers", 0)))
        if count > 0:
            kinds.append(NodeKind(f"node type {name}", dict(node_type.get("resources") or {}), count))
    return kinds


def _fits(node: dict[str, float], need: dict[str, float]) -> int:
    """How many bundles of `need` one node holds."""
    counts = [math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min(counts) if counts else 1 << 20


def check_trial_fits(shape: TrialShape, kinds: list[NodeKind]) -> None:
    """Refuse a trial that no set of these nodes could ever hold.

    Raises:
        MsaError: naming what the trial needs and the most the nodes can give.
    """
    if shape.inline:
        need = shape.tune_request
        if not any(_fits(k.resources, need) for k in kinds):
            raise MsaError(f"a trial needs one node with {_format(need)} and no node has that "
                           f"({_inventory(kinds)}); lower the resources, or give a node '{TRIAL_SLOT}'")
        return
    if not any(_fits(k.resources, {TRIAL_SLOT: 1.0}) for k in kinds):
        raise MsaError(f"no node has a '{TRIAL_SLOT}' resource, so no trial could start ({_inventory(kinds)}); "
                       f"start nodes with --resources '{{\"{TRIAL_SLOT}\": N}}' (ray_cluster.yaml does)")
    per_kind = [(min(_fits(k.resources, shape.per_worker), shape.workers), k.count) for k in kinds]
    if shape.placement == "STRICT_PACK":
        most = max((fits for fits, _ in per_kind), default=0)
        where = "on one node"
    elif shape.placement == "STRICT_SPREAD":
        most = min(sum(count for fits, count in per_kind if fits >= 1), 1 << 20)
        where = "on distinct nodes"
    else:
        most = min(sum(fits * count for fits, count in per_kind), 1 << 20)
        where = "across the nodes"
    if most < shape.workers:
        raise MsaError(
            f"a trial needs {shape.workers} workers x {_format(shape.per_worker)} (placement {shape.placement}) "
            f"but the cluster can hold at most {most} such workers {where} ({_inventory(kinds)}); "
            f"lower resources.workers_per_trial or the per-worker sizes"
        )


def _format(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def _inventory(kinds: list[NodeKind]) -> str:
    shown = []
    for kind in kinds:
        useful = {k: v for k, v in kind.resources.items()
                  if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        shown.append(f"{kind.name}{f' x{kind.count}' if kind.count > 1 else ''}: {_format(useful)}")
    return "; ".join(shown) or "no nodes"


def check_shared_storage(run_dir: Path, tracking_uri: str, *, client: bool, can_grow: bool) -> None:
    """On a joined cluster, prove that every alive node sees the run directory and reaches MLflow.

    `client`: the driver is a Ray Client (``ray://``), so not on a cluster node; `can_grow`: the
    autoscaler can add nodes.

    Raises:
        MsaError: a node that cannot, and why that matters.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not tracking_uri and (len(nodes) > 1 or client or can_grow):
        raise MsaError(
            "tracking.uri is empty, so the sweep would start its own MLflow server on 127.0.0.1 of the driver's "
            "machine, which trials on other machines cannot reach; set tracking.uri to a server every node "
            "reaches (ray_cluster.yaml runs one on the head: tracking.uri=http://<head private IP>:5000)"
        )
    token = uuid.uuid4().hex
    probe = RunDir(run_dir).storage_probe(token)
    probe.write_text(token)
    try:
        answers = _ask_every_node(nodes, str(probe), token, tracking_uri)
    finally:
        probe.unlink(missing_ok=True)
    problems = [f"node {n['NodeManagerAddress']} ({answer['host']}): {reason}"
                for n, answer in zip(nodes, answers) for reason in answer["problems"]]
    if problems:
        raise MsaError(
            f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. On a cluster the "
            "storage must be shared (a filesystem mounted at the same path on every node, e.g. EFS or NFS): Ray "
            "no longer syncs trial folders to the head, so each node would keep its own part of the sweep"
        )


def _ask_every_node(nodes: list[dict], probe: str, token: str, tracking_uri: str) -> list[dict[str, Any]]:
    look = ray.remote(num_cpus=0, max_retries=0)(_look_from_node)
    refs = [look.options(scheduling_strategy=_on_node(n)).remote(probe, token, tracking_uri) for n in nodes]
    try:
        return ray.get(refs, timeout=NODE_ANSWER_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise MsaError(f"not every node answered the storage check within {NODE_ANSWER_TIMEOUT_S:g} s; "
                       f"see `ray status` for nodes that are alive but stuck") from None


def _look_from_node(probe: str, token: str, tracking_uri: str) -> dict[str, Any]:
    """Runs on one node: does it see the driver's probe file, and reach the MLflow server?"""
    problems = []
    run_dir = str(Path(probe).parent)
    try:
        if Path(probe).read_text() != token:
            problems.append(f"{run_dir} holds another probe file than the driver's, so it is another folder")
    except OSError:
        problems.append(f"cannot see the sweep's run directory {run_dir} (the driver's probe file is not there)")
    if tracking_uri:
        try:
            check_tracking_uri(tracking_uri)
        except MsaError as exc:
            problems.append(str(exc))
    return {"host": socket.gethostname(), "problems": problems}


def require_run_dir(run_dir: Path) -> None:
    """A trial's first step: refuse to train on a node that does not see the sweep's run directory
    (e.g. a node the autoscaler started without the shared mount), rather than writing its
    checkpoints where no one will look.

    Raises:
        MsaError: naming the node.
    """
    if not RunDir(run_dir).is_sweep():
        raise MsaError(f"node {socket.gethostname()} cannot see the sweep's run directory {run_dir}: "
                       f"mount the sweep's shared storage on every node")
