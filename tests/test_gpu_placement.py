"""Which GPUs train and which encode the KB: the placement rule (rag_end2end.kb.ray_start.plan_gpus) and its
one-line refusals, a local Ray given only the encoding GPUs, the encoding actor told its device, bounded waits for
actors Ray cannot place or that never finish, and the DDP timeout that covers them. docs/gpus.md.

No GPU is needed: Ray hands out GPUs it is told exist (`num_gpus`), and `ray.get_gpu_ids()` in an actor names the
one it got. The scenarios that need a Ray of their own (declared GPUs, CUDA_VISIBLE_DEVICES as SLURM exports it)
run this file as a script in a child process; the hardware they stand for (3 GPUs in NVML and torch, or a torch
that sees CUDA) is the only thing pretended."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import ray
import torch
from faults import gated_encoder_factory, kill_actors
from pytorch_lightning.strategies import DDPStrategy

from rag_end2end.kb import refresh as kb_refresh
from rag_end2end.kb.index import IndexConfig
from rag_end2end.kb.ray_start import plan_gpus, visible_gpu_ids
from rag_end2end.training import arguments
from rag_end2end.training import finetune as finetune_rag

REPO = Path(__file__).resolve().parents[1]

SLURM_GPUS = "4,5,6"  # what SLURM exports for a job given physical GPUs 4, 5 and 6
RESULT = "RESULT "  # the line of the child's stdout that carries what it found


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("visible", "train", "index_gpus", "workers", "encode", "per_actor"),
    [
        ((3, (0, 1), 1, 1, (2,), 1.0)),  # the reference's recipe: the GPU training leaves idle, not rank 0's
        ((4, (0, 1), 2, 2, (2, 3), 1.0)),
        ((4, (0, 1), 2, 4, (2, 3), 0.5)),  # two actors on each encoding GPU
        ((4, (1, 2), 1, 1, (0,), 1.0)),  # --devices 1,2: the first GPU training leaves
        ((2, (), 2, 2, (0, 1), 1.0)),  # training on CPU: the first GPUs encode
        ((1, (0,), 0.5, 1, (0,), 0.5)),  # a fraction shares the training GPU
        ((2, (0, 1), 0.5, 2, (1,), 0.25)),  # ... the last one, so rank 0's stays whole
        ((3, (0, 1), 0, 1, (), 0.0)),  # encoding on CPU: a local Ray gets no GPU
        ((0, (), 0, 1, (), 0.0)),
    ],
)
def test_encoding_gets_gpus_training_leaves_unless_a_fraction_shares_one(
    visible, train, index_gpus, workers, encode, per_actor
):
    plan = plan_gpus(visible, train, index_gpus, workers, "--gpus 2")
    assert (plan.train, plan.encode, plan.per_actor) == (train, encode, per_actor)
    if index_gpus >= 1:
        assert not set(plan.encode) & set(train), "a whole encoding GPU beside a training rank"
    assert plan.ray_gpus(["4", "5", "6", "7"][:visible]) == [["4", "5", "6", "7"][i] for i in encode]


@pytest.mark.parametrize(
    ("visible", "train", "index_gpus", "workers", "message"),
    [
        (2, (0, 1), 1, 1, "--gpus 2 --index_gpus 1 need 3 GPUs, 2 visible: lower --index_gpus, or give a fraction"),
        (3, (0, 1, 2), 1, 1, "--gpus 2 --index_gpus 1 need 4 GPUs, 3 visible"),
        (0, (), 0.5, 1, "--gpus 2 --index_gpus 0.5: a share of a GPU, but no GPU is visible here"),
        (8, (0, 1), 3, 2, "--index_gpus 3 --index_workers 2 asks 1.5 GPUs of each encoding actor, which encodes"),
        (8, (0, 1), 4, 2, "--index_gpus 4 --index_workers 2 asks 2 GPUs of each encoding actor"),
        (8, (0, 1), 1.5, 2, "--index_gpus 1.5: give a whole number of GPUs (kept apart from training) or a fraction"),
        (8, (0, 1), -1, 1, "--index_gpus must be >= 0 and --index_workers >= 1"),
    ],
)
def test_impossible_placements_are_refused_naming_flags_and_counts(
    visible, train, index_gpus, workers, message, monkeypatch
):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError) as refused:
        plan_gpus(visible, train, index_gpus, workers, "--gpus 2")
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_the_reference_recipe_on_three_slurm_gpus_trains_on_two_and_encodes_on_the_third(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # a machine with three GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", SLURM_GPUS)
    args = arguments.parse_args(
        ["--model_type", "rag_token", "--gpus", "2", "--index_gpus", "1", "--end2end", "--indexing_freq", "500"]
    )
    plan = arguments.gpu_plan(args)
    assert (plan.train, plan.encode, plan.ray_gpus(visible_gpu_ids())) == ((0, 1), (2,), ["6"])
    devices = arguments.parse_args(
        ["--model_type", "rag_token", "--accelerator", "gpu", "--devices", "1,2", "--index_gpus", "1"]
    )
    assert arguments.gpu_plan(devices).ray_gpus(visible_gpu_ids()) == ["4"]
    shared = arguments.parse_args(["--model_type", "rag_token", "--gpus", "2", "--index_gpus", "0.5"])
    assert arguments.gpu_plan(shared).ray_gpus(visible_gpu_ids()) == ["5"]


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--gpus", "2", "--index_gpus", "1"],
            "--gpus 2 --index_gpus 1 need 3 GPUs, 2 visible (CUDA_VISIBLE_DEVICES=0,1)",
        ),
        (["--accelerator", "gpu", "--index_gpus", "1"], "--accelerator gpu --index_gpus 1 need 3 GPUs, 2 visible"),
        (
            ["--gpus", "1", "--index_gpus", "3", "--index_workers", "2"],
            "--index_gpus 3 --index_workers 2 asks 1.5 GPUs",
        ),
        (["--ddp_timeout", "0"], "--ddp_timeout must be positive, got 0"),
    ],
)
def test_finetune_refuses_gpus_that_are_not_there_in_one_line(flags, line, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SystemExit) as stop:
        arguments.parse_args(["--model_type", "rag_token", *flags])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's `PROG: error: ...`
    assert last.split(": error: ", 1)[1].startswith(line)


# ---------------------------------------------------------------- the DDP timeout


def test_the_ddp_strategy_gets_the_timeout_that_covers_rank_zeros_waits():
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    args = arguments.parse_args(
        ["--model_type", "rag_token", "--accelerator", "cpu", "--devices", "2", "--ddp_timeout", "5400"]
    )
    trainer = pl.Trainer(**arguments.trainer_kwargs(args), **quiet)
    # What DDPStrategy.setup_distributed hands init_process_group (pytorch_lightning/strategies/ddp.py).
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._timeout == timedelta(seconds=5400)
    assert kb_refresh.rank_zero_wait_s(5400) == 5100 < 5400  # 5 minutes first: rank 0 names the actor
    named = arguments.parse_args(
        [
            "--model_type",
            "rag_token",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp_find_unused_parameters_true",
        ]
    )
    strategy = pl.Trainer(**arguments.trainer_kwargs(named), **quiet).strategy
    assert strategy._timeout == timedelta(seconds=kb_refresh.DDP_TIMEOUT_S)  # the default: 2 h, not torch's 30 min
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}  # what the name stands for is kept
    single = arguments.parse_args(["--model_type", "rag_token", "--accelerator", "cpu", "--devices", "1"])
    assert arguments.trainer_kwargs(single)["strategy"] == "auto"  # one process: no process group


# ---------------------------------------------------------------- bounded waits, in the tests' Ray (no GPU)


def test_encoding_actors_no_node_can_hold_are_refused_at_once(ray_local, finetune_argv, tmp_path):
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    ctx = module.model.ctx_encoder
    start = time.monotonic()
    with pytest.raises(ValueError) as refused:
        kb_refresh.Refresher(
            module.retriever,
            module.base_passages_path,
            str(tmp_path / "kb"),
            ctx,
            module.model.ctx_tokenizer,
            IndexConfig("flat"),
            index_gpus=1,
        )
    assert time.monotonic() - start < 30
    assert str(refused.value) == (
        "--index_gpus: the encoding actors ask GPU 1 each, which no node of the Ray cluster "
        "has (the most on one node: GPU 0)"
    )
    kill_actors(module)


def test_a_refresh_training_waits_for_gives_up_in_time_naming_the_actor(
    ray_local, finetune_argv, tmp_path, monkeypatch
):
    """The refresh before validation (or of a lost KB) holds every other rank in a barrier: past its bound it
    stops the run naming what it waits for, with progress lines before, instead of waiting for ever."""
    gate = tmp_path / "release"  # the encoding actor holds the refresh until this file exists
    monkeypatch.setattr(kb_refresh, "encoder_factory", gated_encoder_factory(kb_refresh.encoder_factory, str(gate)))
    monkeypatch.setattr(kb_refresh, "PROGRESS_S", 1.0)
    said = []
    monkeypatch.setattr(kb_refresh, "rank_zero_info", said.append)
    module = finetune_rag.build_module(finetune_rag.parse_args(finetune_argv("--end2end")))
    ctx = module.model.ctx_encoder
    refresher = kb_refresh.Refresher(
        module.retriever,
        module.base_passages_path,
        str(tmp_path / "kb"),
        ctx,
        module.model.ctx_tokenizer,
        IndexConfig("flat"),
    )
    try:
        refresher.wait_for_actors()
        assert refresher.trigger(ctx.state_dict(), step=1)
        start = time.monotonic()
        with pytest.raises(TimeoutError) as stopped:
            refresher.wait_until_idle(1, timeout=4, must_finish=True)
        assert time.monotonic() - start < 10
        assert str(stopped.value).startswith(
            "KB refresh still encoding after 4 s, waiting for encoding actor 0 (no GPU) (free in the Ray cluster: "
        )
        assert any(
            line.startswith("KB refresh: encoding for ") and "waiting for encoding actor 0 (no GPU)" in line
            for line in said
        ), said
    finally:
        gate.touch()
        refresher.close()
        kill_actors(module)


# ---------------------------------------------------------------- a Ray of their own, in a child process


def _child(scenario: str, argv: list[str], env: dict[str, str], timeout: int = 240) -> dict:
    """Run `scenario` in a child process with its own local Ray; what it found, and its stderr. A child that outlives
    `timeout` (a wait that never ends) is killed with the Ray it started (its own process group)."""
    environ = {k: v for k, v in os.environ.items() if k != "RAG_E2E_RAY_ADDRESS"}  # its own local Ray
    environ |= {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **env}
    command = [sys.executable, __file__, scenario, json.dumps(argv)]
    child = subprocess.Popen(
        command,
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        pytest.fail(f"{scenario} still running after {timeout} s: {stderr[-3000:]}")
    assert child.returncode == 0, stdout[-3000:] + stderr[-5000:]
    result = next(line for line in stdout.splitlines()[::-1] if line.startswith(RESULT))
    return {**json.loads(result.removeprefix(RESULT)), "stderr": stderr}


def _without_devices(argv: list[str]) -> list[str]:
    """finetune_argv's flags without its --accelerator cpu --devices 1."""
    drop = {i for i, a in enumerate(argv) if a in ("--accelerator", "--devices")}
    return [a for i, a in enumerate(argv) if i not in drop and i - 1 not in drop]


@pytest.mark.slow
def test_the_encoding_actor_gets_the_gpu_training_leaves_and_waits_for_it_are_bounded(finetune_argv):
    """`--gpus 2 --index_gpus 1` on three GPUs that SLURM exported as 4,5,6: the local Ray that the run starts hands
    the encoding actor GPU 6, the one no training rank uses (left to itself, Ray took all three and gave it 4, rank
    0's); an actor with no GPU sees none of the training GPUs either. The Refresher's encoding actor, told to encode
    on its GPU, names GPU 6 when it finds this torch has no CUDA. While another actor holds that GPU, the start waits
    with progress lines and gives up after its bound naming the actor and its demand."""
    argv = _without_devices(finetune_argv("--gpus", "2", "--index_gpus", "1", "--end2end", "--indexing_freq", "5"))
    got = _child("placement", argv, {"CUDA_VISIBLE_DEVICES": SLURM_GPUS})
    assert got["ray_gpus"] == 1 and got["driver_sees"] == SLURM_GPUS
    assert got["encoder"] == [["6"], "6"], "the encoding actor is not on the GPU training leaves"
    assert got["no_gpu_actor"][0] == [] and not {"4", "5"} & set(got["no_gpu_actor"][1].split(","))
    # (the builder, which asks for no GPU, may still be starting too on a busy machine: named after the encoder)
    assert re.fullmatch(
        r"encoding actor 0 \(GPU 1\)(, the index builder \(no GPU\))? did not start in 6 s \(free in "
        r"the Ray cluster: GPU 0 of 1\); if they only need longer, raise --ddp_timeout",
        got["timeout"],
    )
    assert got["waited"] < 15
    assert re.search(
        r"waiting 2 s \(at most 6\) for encoding actor 0 \(GPU 1\).* to start; free in the Ray cluster: "
        r"GPU 0 of 1",
        got["stderr"],
    ), got["stderr"][-3000:]
    assert got["started"].startswith("KB refresh: encoding actor 0 (GPU 1) failed to start: ")
    told_cuda = "this encoding actor holds GPU ['6'] (CUDA_VISIBLE_DEVICES=6), but torch finds no CUDA device"
    assert told_cuda in got["started"]


@pytest.mark.slow
def test_an_encoding_actor_without_a_gpu_encodes_on_cpu_whatever_cuda_visible_devices_says(finetune_argv):
    """A Ray whose workers inherited CUDA_VISIBLE_DEVICES=0 (SLURM's), on a machine whose torch sees CUDA: Ray 2.60
    leaves the variable in place for an actor that asked for no GPU, and the encoding actor used to take it as its
    GPU, the training GPU. Told "cpu" by the refresher, it stays on CPU."""
    got = _child("cpu_encoder", finetune_argv("--end2end", "--index_gpus", "0"), {"CUDA_VISIBLE_DEVICES": "0"})
    assert got["encoder"] == ["cpu", "0", True, []]  # its device; what it sees: the variable, CUDA, Ray's GPUs


def pretend_cuda() -> None:
    """Ray's worker_process_setup_hook in the child: this torch (a CPU build) says CUDA is there, as on a GPU node."""
    import torch

    torch.cuda.is_available = lambda: True


class Probe:
    def where(self) -> tuple[list, str | None]:
        """The GPUs Ray gave this actor and the CUDA_VISIBLE_DEVICES it runs with."""
        return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")


def _placement(argv: list[str]) -> dict:
    torch.cuda.device_count = lambda: len(SLURM_GPUS.split(","))  # three GPUs, as torch and NVML would count them
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    NvidiaGPUAcceleratorManager.get_current_node_num_accelerators = staticmethod(lambda: 3)
    args = finetune_rag.parse_args(argv)
    module = finetune_rag.build_module(args)  # starts the local Ray, as a run does
    report = {"ray_gpus": ray.cluster_resources().get("GPU", 0), "driver_sees": os.environ["CUDA_VISIBLE_DEVICES"]}
    encoder = ray.remote(Probe).options(**kb_refresh.encoder_options(args.index_gpus, args.index_workers)).remote()
    report["encoder"] = ray.get(encoder.where.remote())
    report["no_gpu_actor"] = ray.get(ray.remote(Probe).options(num_cpus=0).remote().where.remote())
    # The probe holds the encoding GPU: the Refresher's encoding actor cannot be placed.
    kb_refresh.PROGRESS_S = 2.0
    ctx = module.model.ctx_encoder
    refresher = kb_refresh.Refresher(
        module.retriever,
        args.passages_path,
        str(Path(args.output_dir) / "kb"),
        ctx,
        module.model.ctx_tokenizer,
        IndexConfig("flat"),
        index_workers=args.index_workers,
        index_gpus=args.index_gpus,
        wait_timeout=6,
    )
    start = time.monotonic()
    try:
        refresher.wait_for_actors()
    except Exception as err:  # a TimeoutError is expected; anything else is reported to the test as it is
        report["timeout"] = str(err) if isinstance(err, TimeoutError) else f"{type(err).__name__}: {err}"
    report["waited"] = time.monotonic() - start
    ray.kill(encoder)  # the GPU is free: the encoding actor starts, on it
    refresher.wait_timeout = 300  # its start-up (torch's imports) may take longer than 6 s on a busy machine
    try:
        refresher.wait_for_actors()
    except Exception as err:
        report["started"] = str(err)
    return report


def _cpu_encoder(argv: list[str]) -> dict:
    ray.init(
        namespace="cpu-encoder",
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"worker_process_setup_hook": pretend_cuda},
    )
    args = finetune_rag.parse_args(argv)
    module = finetune_rag.build_module(args)
    ctx = module.model.ctx_encoder
    kb = str(Path(args.output_dir) / "kb")
    refresher = kb_refresh.Refresher(
        module.retriever,
        args.passages_path,
        kb,
        ctx,
        module.model.ctx_tokenizer,
        IndexConfig("flat"),
        index_gpus=args.index_gpus,
    )
    refresher.wait_for_actors()
    where = refresher.encoders[0].__ray_call__.remote(
        lambda self: (self.device, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(), ray.get_gpu_ids())
    )
    return {"encoder": ray.get(where, timeout=120)}


if __name__ == "__main__":
    scenario, flags = sys.argv[1], json.loads(sys.argv[2])
    print(RESULT + json.dumps({"placement": _placement, "cpu_encoder": _cpu_encoder}[scenario](flags)), flush=True)
    ray.shutdown()
