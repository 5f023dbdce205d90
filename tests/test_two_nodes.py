"""Cluster runs on two nodes, both on this machine's loopback: a Ray head and a second Ray node started with
`ray start` as docs/faults.md says. (1) Two-node DDP (two launches with NODE_RANK 0 and 1, MASTER_ADDR 127.0.0.1)
trains end to end with refreshes, then the second node is killed mid-run (its raylet, its actors and its training
process) and the run is resumed on the head alone. (2) One trainer on the head, the second node holding only
actors: killed mid-run, its actors come back on the head and training goes on. Slow (minutes each):
`python -m pytest -m slow tests/test_two_nodes.py`.
"""

import csv
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from faults import free_port

from rag_end2end.tiny_models import tiny_run_argv

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "test_run" / "dummy-train-data"
MAX_STEPS = 40  # 10 steps an epoch: 40 train questions, 2 processes, batch 2


def _alive_nodes(address: str, token: str) -> int:
    """Alive nodes of the Ray cluster at `address`, asked of its GCS as Ray's own clients do (with the token)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    with grpc.insecure_channel(address) as channel:
        reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
            gcs_service_pb2.GetAllNodeInfoRequest(), timeout=5, metadata=[("authorization", f"Bearer {token}")]
        )
    return sum(node.state == GcsNodeInfo.ALIVE for node in reply.node_info_list)


def _wait(what: str, done, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if done():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what} not within {timeout:.0f} s" + (f": {log.read_text()[-3000:]}" if log else ""))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (Ray's workers start their own sessions: found by parent)."""
    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class Cluster:
    address: str  # the head's GCS
    token: str
    env: dict  # a trainer's environment: the token's path, not RAY_AUTH_MODE (it learns that from the cluster)
    nodes: list  # the `ray start --block` processes: the head, the second node

    def kill_second_node(self) -> None:
        """SIGKILL the second node's raylet with the actors it holds."""
        _kill_tree(self.nodes[1].pid)


@contextmanager
def two_node_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A Ray head and a second node on 127.0.0.1, one CPU each, with token authentication as the user's environment
    has it: the token where every node and the trainer find it (not in ~/.ray, which this test leaves alone)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    token = secrets.token_hex(32)
    token_file = tmp_path / "ray_token"
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAG_E2E_RAY_ADDRESS")}
    env |= {"RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    # RAY_TMPDIR: the second node records the cluster's address in Ray's temp dir; in /tmp/ray a bare ray.init() on
    # this machine would try to join it long after the test.
    ray_env = env | {"RAY_AUTH_MODE": "token", "RAY_TMPDIR": ray_tmp}
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1"]
    head_log, second_log = tmp_path / "head.log", tmp_path / "second.log"
    nodes = [
        subprocess.Popen(
            [*ray, "--head", "--port", str(port), "--include-dashboard", "false", "--num-cpus", "1"]
            + ["--temp-dir", ray_tmp],
            env=ray_env,
            stdout=subprocess.DEVNULL,
            stderr=open(head_log, "w"),
            start_new_session=True,
        )
    ]
    try:
        _wait("the head's port", lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or 1, 180)
        nodes.append(
            subprocess.Popen(
                [*ray, "--address", address, "--num-cpus", "1"],
                env=ray_env,
                stdout=subprocess.DEVNULL,
                stderr=open(second_log, "w"),
                start_new_session=True,
            )
        )
        _wait("the second Ray node", lambda: _alive_nodes(address, token) == 2, 180, second_log)
        yield Cluster(address, token, env, nodes)
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)  # stopped by process id: other Ray instances are left alone
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_tree(node.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _train_argv(tiny_models, tiny_kb, out: Path, cluster: Cluster, run_id: str) -> list[str]:
    """finetune_rag.py training end to end on `cluster` with a refresh every 3 steps, two retrieval actors, two
    encoding actors and the builder (so each group can be dealt over both nodes)."""
    argv = [
        *tiny_run_argv(tiny_models, tiny_kb, DATA, out),
        *("--train_batch_size", "2", "--eval_batch_size", "4", "--do_train", "--num_sanity_val_steps", "0"),
        *("--training_mode", "rag_end2end", "--indexing_freq", "3", "--max_steps", str(MAX_STEPS)),
        *("--num_train_epochs", "20", "--save_last_every_n_steps", "2", "--ddp_timeout", "180"),
        *("--ray_address", cluster.address, "--run_id", run_id),
        *("--num_retrieval_workers", "2", "--index_workers", "2"),
    ]
    return [sys.executable, str(REPO / "finetune_rag.py"), *argv]


LIVE = re.compile(r"KB refresh: v(\d+) live at step (\d+)")
PLACED = re.compile(r"Ray nodes: retrieval actors on (.*); encoding actors and the index builder on (.*)")


def _placed_on_both_nodes(log_text: str) -> None:
    placed = PLACED.search(log_text)
    assert placed, log_text[-3000:]
    print(placed.group(0))
    for group in placed.groups():  # each group dealt over both nodes: two retrieval actors, two encoders + builder
        assert len(set(group.split(", "))) == 2, placed.group(0)


def test_two_ray_nodes_and_two_node_ddp_train_and_the_loss_of_the_second_node_is_resumed_on_the_head(
    tiny_models, tiny_kb, tmp_path
):
    master_port = free_port()
    ranks: list[subprocess.Popen] = []
    with two_node_cluster(tmp_path) as cluster:
        try:
            # A trainer without the cluster's token is told so, in one line, before anything starts.
            check = f"import rag_end2end.kb.ray_start as r; r.check_reachable({cluster.address!r})"
            (tmp_path / "other_token").write_text(secrets.token_hex(32))
            for wrong, says in ((tmp_path / "missing", "has no token"), (tmp_path / "other_token", "refuses")):
                env = cluster.env | {"RAY_AUTH_TOKEN_PATH": str(wrong)}
                done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
                assert done.returncode != 0 and says in done.stderr and str(wrong) in done.stderr, done.stderr[-1000:]

            out = tmp_path / "out"
            finetune = _train_argv(tiny_models, tiny_kb, out, cluster, "two-nodes")
            logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
            for rank, log in enumerate(logs):
                ddp = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "NODE_RANK": str(rank)}
                ranks.append(
                    subprocess.Popen(
                        [*finetune, "--num_nodes", "2"],
                        env=cluster.env | ddp,
                        cwd=REPO,
                        stdout=open(log, "w"),
                        stderr=subprocess.STDOUT,
                    )
                )

            # Refreshes go live while the two processes train, and the run's actors are on both nodes.
            _wait(
                "two refreshes", lambda: "v2 live" in logs[0].read_text() or ranks[0].poll() is not None, 600, logs[0]
            )
            assert ranks[0].poll() is None, logs[0].read_text()[-3000:]
            _placed_on_both_nodes(logs[0].read_text())
            _wait("a periodic last.ckpt", lambda: (out / "last.ckpt").is_file(), 120, logs[0])

            # The second node goes: its raylet with its actors, and the training process on it.
            killed = time.monotonic()
            cluster.kill_second_node()
            ranks[1].kill()
            ranks[0].wait(timeout=300)
            seconds = time.monotonic() - killed
            text = logs[0].read_text()
            print(f"rank 0 ended {seconds:.1f} s after the second node was killed, exit status {ranks[0].returncode}")
            assert ranks[0].returncode != 0 and seconds < 180, text[-3000:]  # a collective's error, before the timeout
            assert not (out / ".run.lock").exists()  # released: the resume may start at once
            _wait("the second node marked dead", lambda: _alive_nodes(cluster.address, cluster.token) == 1, 120)

            # Resumed on the head alone: one process now, which the resume names rather than takes silently.
            alone = [*finetune, "--num_nodes", "1", "--resume"]
            run = dict(env=cluster.env, cwd=REPO, capture_output=True, text=True)
            refused = subprocess.run(alone, timeout=300, **run)
            assert refused.returncode == 2 and "--num_nodes 1 (was 2)" in refused.stderr, refused.stderr[-2000:]
            resumed = subprocess.run([*alone, "--allow_changed_settings"], timeout=600, **run)
            assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
            assert "KB refresh: resumed on v" in resumed.stdout + resumed.stderr
            assert (out / f"checkpoint{MAX_STEPS}").is_dir()  # the final weights: it trained to the end
        finally:
            for process in ranks:
                process.kill()


def test_a_node_that_held_only_actors_is_lost_and_training_goes_on_with_them_restarted_on_the_head(
    tiny_models, tiny_kb, tmp_path
):
    with two_node_cluster(tmp_path) as cluster:
        out, log = tmp_path / "out", tmp_path / "trainer.log"
        finetune = _train_argv(tiny_models, tiny_kb, out, cluster, "actors-node")
        trainer = subprocess.Popen(finetune, env=cluster.env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        try:
            _wait("a refresh", lambda: "v1 live" in log.read_text() or trainer.poll() is not None, 600, log)
            assert trainer.poll() is None, log.read_text()[-3000:]
            _placed_on_both_nodes(log.read_text())

            # The second node goes with its retrieval actor, an encoding actor and maybe the builder; the trainer stays.
            live_before = len(LIVE.findall(log.read_text()))
            killed = time.monotonic()
            cluster.kill_second_node()
            trainer.wait(timeout=900)
            text = log.read_text()
            assert trainer.returncode == 0, text[-3000:]
            assert (out / f"checkpoint{MAX_STEPS}").is_dir(), text[-3000:]  # it trained to the end
            after = LIVE.findall(text)[live_before:]
            # Refreshes went live after the loss: more than the one that may have been encoded before it.
            assert len(after) >= 2, text[-3000:]
            print(
                f"after the kill: {len(after)} refreshes live (first v{after[0][0]} at step {after[0][1]}), "
                f"training ended {time.monotonic() - killed:.0f} s after it"
            )
            restarts = [
                float(row["actor_restarts"])
                for path in out.rglob("metrics.csv")
                for row in csv.DictReader(path.open())
                if row.get("actor_restarts")
            ]
            assert restarts and max(restarts) >= 1, restarts  # counted: the run says it lost actors
        finally:
            trainer.kill()
