"""Ray start-up: a local Ray that listens on loopback only and gets exactly the GPUs the placement plan gives the
encoding actors (or a running cluster joined by address, checked to answer first), its shutdown, and what every
actor of this package does when it starts (`quiet_actor`). The placement plan (`plan_gpus`) is the one rule for
which GPUs train and which encode."""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

RAY_ADDRESS_ENV = "RAG_E2E_RAY_ADDRESS"  # how DDP child processes find the Ray started by rank 0
PLACEMENT_CPUS = 0.01  # the CPU share each actor of a run asks on a cluster, so its node preference holds
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds rag_end2end/


@dataclass(frozen=True)
class GpuPlan:
    """Which of this machine's visible GPUs train and which encode the KB, as positions among them (torch's
    `cuda:i`, the i-th entry of CUDA_VISIBLE_DEVICES). Built by `plan_gpus`, the one placement rule."""

    train: tuple[int, ...]  # Lightning's devices
    encode: tuple[int, ...]  # what a local Ray may hand to encoding actors; shares `train` only for a fraction
    per_actor: float  # num_gpus of each encoding actor; 0: they encode on CPU

    def ray_gpus(self, visible_ids: Sequence[str]) -> list[str]:
        """The encoding GPUs as CUDA_VISIBLE_DEVICES names them (`visible_ids`: visible_gpu_ids()), for init_ray."""
        return [visible_ids[i] for i in self.encode]


def visible_gpu_ids() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (SLURM exports physical ids, e.g. "4,5,6"), in
    torch's order: `cuda:i` is entry i."""
    import torch  # not at module level: retrieval actors import this module and never need torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",")[:count] if listed else [str(i) for i in range(count)]


def plan_gpus(
    visible: int | None, train: Sequence[int], index_gpus: float, index_workers: int, train_flags: str = ""
) -> GpuPlan:
    """Split `visible` GPUs between training (`train`, Lightning's device positions) and the `index_workers`
    encoding actors that share `index_gpus`. A whole --index_gpus takes the first GPUs training does not use, so
    no encoder lands beside a training rank; a fraction below 1 shares the last training GPU (rank 0's stays
    whole where there are several: it also drives the refresh and scores retrieval). `visible` None: the encoding
    GPUs are a joined Ray cluster's, not this machine's; only the shares are checked. Impossible settings raise
    ValueError, one line naming the flags (`train_flags`: those that chose `train`, e.g. "--gpus 2") and counts."""
    train = tuple(train)
    if index_gpus < 0 or index_workers < 1:
        raise ValueError(f"--index_gpus must be >= 0 and --index_workers >= 1, got {index_gpus:g} and {index_workers}")
    per_actor = index_gpus / index_workers
    if per_actor > 1:  # Ray also refuses a share above 1 that is not whole (1.5), when the actor is created
        raise ValueError(
            f"--index_gpus {index_gpus:g} --index_workers {index_workers} asks {per_actor:g} GPUs of each encoding "
            f"actor, which encodes on one GPU: give --index_workers {math.ceil(index_gpus)} or more"
        )
    if index_gpus > 1 and index_gpus != int(index_gpus):
        raise ValueError(
            f"--index_gpus {index_gpus:g}: give a whole number of GPUs (kept apart from training) or a "
            "fraction below 1 (a share of a training GPU)"
        )
    if index_gpus == 0 or visible is None:
        return GpuPlan(train, (), per_actor)
    asked = f"{train_flags or f'{len(train)} training GPU(s)'} --index_gpus {index_gpus:g}"
    if index_gpus < 1:
        if visible < 1:
            raise ValueError(
                f"{asked}: a share of a GPU, but no GPU is visible here{_visible_note()}; give "
                "--index_gpus 0 to encode on CPU"
            )
        return GpuPlan(train, train[-1:] or (0,), per_actor)
    free = [d for d in range(visible) if d not in train]
    if len(free) < index_gpus:
        raise ValueError(
            f"{asked} need {len(train) + int(index_gpus)} GPUs, {visible} visible{_visible_note()}: lower "
            "--index_gpus, or give a fraction (--index_gpus 0.5) to share a training GPU, or 0 to encode on CPU"
        )
    return GpuPlan(train, tuple(free[: int(index_gpus)]), per_actor)


def _visible_note() -> str:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={listed})" if listed is not None else ""


@contextmanager
def _visible_to_ray(gpus: Sequence[str] | None):
    """CUDA_VISIBLE_DEVICES set to `gpus` while the block starts a local Ray, then restored: the raylet and every
    worker it starts inherit the environment of that moment, and Ray numbers and hands out only those GPUs."""
    if gpus is None:
        yield {}
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        yield {"num_gpus": len(gpus)}
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def init_ray(address: str | None = None, namespace: str = "rag", gpus: Sequence[str] | None = None) -> None:
    """Join `address` (a running cluster) or start a local Ray that listens on loopback only. A local Ray gets
    exactly the GPUs `gpus` (CUDA_VISIBLE_DEVICES ids: GpuPlan.ray_gpus) to hand to actors, none if empty: left to
    itself it takes every GPU it sees and hands them out from the first, which is training rank 0's. None: Ray's
    own count (a joined cluster's GPUs are whatever its nodes were started with)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        check_reachable(address)
        private_ray_token(create=False)  # the cluster's own token (from `ray start`): made private, never replaced
        # The cluster's workers import this toolkit from the same path (a shared or identical checkout or install).
        ray.init(address=address, namespace=namespace, runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}})
        return
    # Keep every Ray listener on 127.0.0.1: `_node_ip_address` alone does not. Ray reads this variable
    # when it is imported, so set it for the processes ray.init starts and patch the imported constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray starts its workers at niceness 15: behind a training process that keeps every core busy, the
    # encoding actors then get almost no CPU and a refresh never finishes. Equal priority, unless the
    # user's environment says otherwise.
    os.environ.setdefault(ray_constants.RAY_WORKER_NICENESS, "0")
    if os.environ.get("RAY_ADDRESS", "local") != "local":  # Ray's own variable (`ray job submit` sets it): named
        print(
            f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set but not used: this run starts its own Ray on loopback; "
            "pass --ray_address to join that cluster"
        )
    private_ray_token()
    with _visible_to_ray(gpus) as resources:
        # address="local": a Ray of this run's own. Without an address Ray joins the cluster a `ray start` on this
        # machine recorded in its temp dir (ray_current_cluster), alive or long dead (then ray.init hangs for minutes).
        ray.init(
            address="local", namespace=namespace, include_dashboard=False, _node_ip_address="127.0.0.1", **resources
        )
    os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address


def private_ray_token(create: bool = True) -> Path | None:
    """Ray's token authentication (on for a local Ray unless RAY_AUTH_MODE says otherwise) reads its token from
    ~/.ray/auth_token, which Ray writes with the process's umask: 0644, readable by every local user where home
    directories are, and the token lets its holder run code on the cluster. Write it first, 0600 in a 0700
    directory (32 random bytes in hex, as Ray makes them), unless told not to `create` it (a joined cluster's); one
    there already that others can read is made 0600. None when token auth is off or the token comes from
    RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (the user's own)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = _default_token_file()
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another run's, this instant
            return private_ray_token(create=False)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return path
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
        print(f"{path}: Ray's token was readable by other users; it is now readable by you alone (mode 0600)")
    return path


def shutdown_ray() -> None:
    """`ray.shutdown()`, and forget the address init_ray left for DDP children when it started this Ray: a later
    init_ray in this process would otherwise try to join the Ray that just stopped."""
    if ray.is_initialized() and os.environ.get(RAY_ADDRESS_ENV) == ray.get_runtime_context().gcs_address:
        del os.environ[RAY_ADDRESS_ENV]
    ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds when no Ray head node answers at a `host:port` address: nothing listens there, or
    something that is not Ray's GCS does (ray.init would retry for minutes, or loop on the host's own address)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"--ray_address {address}: nothing answers there ({err}). Start the head node with "
            f"`ray start --head --port {port}` on {host}, or leave --ray_address out to start a local Ray."
        ) from None
    if address.startswith("ray://"):
        return  # a Ray Client server speaks its own protocol
    import grpc  # Ray's own dependency; the GCS answers GetClusterId to every client that joins

    code = _ask_cluster_id(f"{host}:{port}", timeout)
    if code == grpc.StatusCode.UNAUTHENTICATED:  # a Ray GCS that wants a token (`ray start` asks one since Ray 2.59)
        token = ray_token()
        if token is None:
            raise ConnectionError(
                f"--ray_address {address}: the Ray cluster there requires token authentication, and this machine has "
                f"no token ({_token_source()} does not exist): copy the cluster's (`ray get-auth-token` on its head) "
                "to ~/.ray/auth_token (mode 0600), or name its file in RAY_AUTH_TOKEN_PATH"
            )
        code = _ask_cluster_id(f"{host}:{port}", timeout, token)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise ConnectionError(
                f"--ray_address {address}: the Ray cluster there refuses this machine's token ({_token_source()}); "
                "give the one `ray get-auth-token` prints on its head"
            )
        # Ray's client sends its token only when RAY_AUTH_MODE says so, read into its config when Ray was imported:
        # set both, as ray.init does itself for a local cluster that has a token.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    if code is not None:
        raise ConnectionError(
            f"--ray_address {address}: something listens there, but not a Ray head node's GCS ({code.name}). "
            "Give the head's GCS address (`ray start --head` prints it; port 6379 by default)."
        )


def _ask_cluster_id(address: str, timeout: float, token: str | None = None):
    """The gRPC status code of a GetClusterId call to `address` (with `token` as Ray sends it), None when it answers."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as err:
            return err.code()
    return None


def ray_token() -> str | None:
    """The token Ray's client would send, from where Ray looks for it, in its order: RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = _token_file()
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _token_file() -> Path:
    """The file Ray reads its token from when RAY_AUTH_TOKEN is not set."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or _default_token_file())


def _default_token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _token_source() -> str:
    return "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else str(_token_file())


def actor_nodes(actors: Sequence) -> list[str]:
    """The Ray node (the first 8 hex digits of its id) that each of `actors` runs on, in order: where Ray placed
    them, for the log of a run on a cluster."""
    return [node[:8] for node in ray.get([actor.__ray_call__.remote(_node_id) for actor in actors])]


def alive_nodes() -> int:
    """How many nodes of the joined Ray cluster are alive."""
    return sum(node["Alive"] for node in ray.nodes())


def spread_over_nodes(n: int) -> list[dict]:
    """Ray options that place a group of `n` actors (retrieval, shards, or encoders and builder): dealt round robin
    over the cluster's alive nodes (by node id, so every DDP rank deals alike), so that a refresh encodes on every
    machine and a lost node takes only its share. One node: none (Ray's default).

    Each preference is soft: an actor whose node is gone (a restart after the node died), cannot hold it (no GPU
    there) or is busy goes to another node (Ray's private `_spill_on_unavailable`, for the busy case). Ray places an
    actor that asks for no resource at all on a random node whatever its strategy (ray-project/ray#25360 fixed that
    for hard affinity only), and "SPREAD" was as random (all five actors of a two-node run on one node in 2 of 4
    runs), so on a cluster each actor asks for PLACEMENT_CPUS of a CPU: enough for Ray to honour the preference."""
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    if len(nodes) < 2:
        return [{} for _ in range(n)]
    return [
        {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(
                nodes[i % len(nodes)], soft=True, _spill_on_unavailable=True
            ),
            "num_cpus": PLACEMENT_CPUS,
        }
        for i in range(n)
    ]


def _node_id(actor) -> str:
    return ray.get_runtime_context().get_node_id()


def quiet_actor() -> None:
    """In a Ray actor: no progress bars or info chatter from datasets and transformers, which Ray would
    copy to the user's console on every refresh (errors still reach the trainer as exceptions)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
