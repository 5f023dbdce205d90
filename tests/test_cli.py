"""finetune_rag.py as users run it: a separate process, DDP on CPU, and the reference's launch flags."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "finetune_rag.py"), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _logged(out: Path, name: str) -> list[float]:
    rows = csv.DictReader(open(next((out / "logs").rglob("metrics.csv"))))
    return [float(r[name]) for r in rows if r.get(name)]


@pytest.mark.slow  # ~45 s: CI stays under 15 minutes; DDP gathers stay tested (test_training_modes)
def test_ddp_two_cpu_processes_train_and_refresh(ray_local, finetune_argv, tmp_path):
    # The child processes join the Ray that the test session started (its address is in the environment).
    argv = finetune_argv(
        "--devices", "2", "--do_train", "--do_predict", "--end2end", "--indexing_freq", "2", "--max_epochs", "1"
    )
    proc = _run(argv)
    out = tmp_path / "out"
    # Every rank's test answers, one a line: 8 test questions, though each rank generated only half of them.
    assert len((out / "test_generations.txt").read_text().splitlines()) == 8
    assert "KB refresh: v1 live" in proc.stdout + proc.stderr
    assert max(_logged(out, "index_version")) >= 1
    assert _logged(out, "loss"), "no training loss logged"
    assert sorted(p.name for p in (out / "kb").iterdir() if p.name.startswith("v"))
    # Lightning splits the 40 training examples over 2 ranks: 10 optimizer steps an epoch at batch size 2.
    assert max(_logged(out, "step")) >= 9


@pytest.mark.slow
def test_reference_launch_flags_run(ray_local, tiny_models, tiny_kb, tmp_path):
    """The flags of the reference test_run/test_finetune.sh, with tiny local models and --gpus 0 --index_gpus 0 (no
    GPU here: the reference's --index_gpus 2 is refused in one line, tests/test_gpu_placement.py)."""
    passages, index = tiny_kb
    out = tmp_path / "out"
    argv = [
        "--data_dir",
        str(REPO / "test_run" / "dummy-train-data"),
        "--output_dir",
        str(out),
        "--model_name_or_path",
        str(tiny_models["rag_token"]),
        "--model_type",
        "rag_token",
        "--fp16",
        "--gpus",
        "0",
        "--profile",
        "--do_train",
        "--end2end",
        "--do_predict",
        "--n_val",
        "-1",
        "--train_batch_size",
        "1",
        "--eval_batch_size",
        "1",
        "--max_source_length",
        "128",
        "--max_target_length",
        "25",
        "--val_max_target_length",
        "25",
        "--test_max_target_length",
        "25",
        "--label_smoothing",
        "0.1",
        "--dropout",
        "0.1",
        "--attention_dropout",
        "0.1",
        "--weight_decay",
        "0.001",
        "--adam_epsilon",
        "1e-08",
        "--max_grad_norm",
        "0.1",
        "--lr_scheduler",
        "polynomial",
        "--learning_rate",
        "3e-05",
        "--num_train_epochs",
        "10",
        "--warmup_steps",
        "500",
        "--gradient_accumulation_steps",
        "1",
        "--distributed_retriever",
        "ray",
        "--num_retrieval_workers",
        "4",
        "--index_name",
        "custom",
        "--context_encoder_name",
        str(tiny_models["context_encoder"]),
        "--index_gpus",
        "0",
        "--gpu_order",
        "[2,3,4,5,6,7,8,9,0,1]",
        "--indexing_freq",
        "5",
        "--csv_path",
        str(REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"),
        "--passages_path",
        str(passages),
        "--index_path",
        str(index),
        "--shard_dir",
        str(tmp_path / "shards"),
        "--ray_namespace",
        "test-reference-flags",
        "--max_steps",
        "20",  # the one addition: 10 epochs would be 400 steps
    ]
    _run(argv)
    assert max(_logged(out, "index_version")) >= 1
    assert (out / "test_results.txt").exists()
    assert not (tmp_path / "shards").exists(), "--shard_dir is accepted but never written (or deleted)"


def _launch_script_calls(script: str, tmp_path: Path, *extra: str, **env: str) -> dict[str, list[str]]:
    """Run a launch script (with arguments `extra`) with `python` replaced by a recorder: {called script: its
    arguments}."""
    record, bin_dir = tmp_path / "calls", tmp_path / "bin"
    record.mkdir(parents=True)
    bin_dir.mkdir()
    shim = bin_dir / "python"
    # `python -c ...` (test_finetune.sh counting torch's GPUs) prints $FAKE_GPUS; every other call is recorded.
    shim.write_text(
        '#!/bin/sh\nif [ "$1" = "-c" ]; then echo "${FAKE_GPUS:-0}"; exit 0; fi\n'
        'printf "%s\\n" "$@" > "$RECORD/$(ls "$RECORD" | wc -l)"\n'
    )
    shim.chmod(0o755)
    environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), **env}
    subprocess.run(["sh", str(REPO / script), *extra], env=environ, check=True, timeout=60)
    calls = [(record / name).read_text().splitlines() for name in sorted(record.iterdir(), key=lambda p: int(p.name))]
    return {argv[0]: argv[1:] for argv in calls}


def test_squad_recipe_scripts_pass_flags_our_parsers_accept(tmp_path, monkeypatch):
    import torch

    from rag_end2end.data import squad as prepare_squad
    from rag_end2end.kb import build as use_own_knowledge_dataset
    from rag_end2end.training import arguments
    from rag_end2end.training import finetune as finetune_rag

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # the machine the recipe is for (its GPUs are checked)
    e2e = _launch_script_calls("finetune_rag_ray_end2end.sh", tmp_path / "e2e")
    original = _launch_script_calls("finetune_rag_ray_original.sh", tmp_path / "original")
    scripts = ["data_prep/prepare_squad.py", "use_own_knowledge_dataset.py", "finetune_rag.py"]
    assert list(e2e) == list(original) == scripts
    prepare_squad.parse_args(e2e["data_prep/prepare_squad.py"])
    use_own_knowledge_dataset.parse_args(e2e["use_own_knowledge_dataset.py"])
    a, b = finetune_rag.parse_args(e2e["finetune_rag.py"]), finetune_rag.parse_args(original["finetune_rag.py"])
    assert (a.end2end, a.indexing_freq, a.index_gpus) == (True, 500, 1)
    assert (arguments.gpu_plan(a).train, arguments.gpu_plan(a).encode) == ((0, 1), (2,))  # docs/gpus.md
    assert (b.end2end, b.indexing_freq, b.index_gpus) == (False, None, 0)
    assert Path(a.output_dir).name == "rag-end2end" and Path(b.output_dir).name == "rag-original"
    # Otherwise the same recipe (anchors: effective batch 64 on 2 GPUs, lr 3e-5 polynomial, 10 epochs).
    differ = {"end2end", "training_mode", "indexing_freq", "index_gpus", "output_dir", "run_id"}
    same = [k for k in vars(a) if k not in differ]
    assert [getattr(a, k) for k in same] == [getattr(b, k) for k in same]
    assert (a.train_batch_size * a.accumulate_grad_batches * a.gpus, a.learning_rate) == (64, 3e-5)
    assert (a.lr_scheduler, a.max_epochs, a.warmup_steps, a.label_smoothing) == ("polynomial", 10, 500, 0.1)


def test_the_recipe_reads_its_settings_from_the_environment_and_passes_extra_flags_last(tmp_path):
    from rag_end2end.training import finetune as finetune_rag

    env = {"MODEL": "my/rag", "GPUS": "1", "INDEX_GPUS": "0", "INDEXING_FREQ": "50", "PRECISION_FLAG": ""}
    env |= {"DATA_DIR": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"), "EPOCHS": "2"}
    extra = ("--seed", "7", "--learning_rate", "1e-4")
    calls = _launch_script_calls("finetune_rag_ray_end2end.sh", tmp_path, *extra, **env)
    argv = calls["finetune_rag.py"]
    assert argv[-4:] == ["--seed", "7", "--learning_rate", "1e-4"]
    a = finetune_rag.parse_args(argv)
    assert (a.model_name_or_path, a.gpus, a.index_gpus, a.indexing_freq, a.max_epochs) == ("my/rag", 1, 0, 50, 2)
    assert (a.seed, a.learning_rate, a.precision, a.fp16) == (7, 1e-4, None, False)
    assert a.data_dir == str(tmp_path / "data") and Path(a.output_dir) == tmp_path / "runs" / "rag-end2end"
    original = _launch_script_calls("finetune_rag_ray_original.sh", tmp_path / "o", *extra, **env)["finetune_rag.py"]
    assert original[-4:] == argv[-4:] and not finetune_rag.parse_args(original).end2end


@pytest.mark.parametrize(
    ("gpus", "train", "encode"), [(3, (0,), (1, 2)), (2, (0,), (1,)), (1, (0,), (0,)), (0, (), ())]
)
def test_test_finetune_sh_trains_and_encodes_on_gpus_of_their_own(gpus, train, encode, tmp_path, monkeypatch):
    """test_run/test_finetune.sh on 0 to 3 GPUs: training on GPU 0, the encoding actors on the others, or sharing
    the only one; on CPU without GPUs."""
    import torch

    from rag_end2end.training import arguments
    from rag_end2end.training import finetune as finetune_rag

    calls = _launch_script_calls("test_run/test_finetune.sh", tmp_path, FAKE_GPUS=str(gpus), OUT=str(tmp_path / "o"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)  # the machine the script counted
    plan = arguments.gpu_plan(finetune_rag.parse_args(calls["finetune_rag.py"]))
    assert (plan.train, plan.encode) == (train, encode)


def test_a_refusal_is_one_line_and_debug_shows_the_traceback(finetune_argv, tmp_path):
    """Bad input met before any work ends the run with `finetune_rag.py: error: ...` and exit status 2, as argparse's
    own errors do; --debug shows where it was raised. eval_rag.py refuses the same way."""
    argv = finetune_argv("--do_train", "--data_dir", str(tmp_path / "no-data"))
    command = [sys.executable, str(REPO / "finetune_rag.py")]
    plain = subprocess.run([*command, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    last = plain.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune_rag.py: error: --data_dir ") and "no-data lacks train.source" in last
    debug = subprocess.run([*command, *argv, "--debug"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "check_data_dir" in debug.stderr

    evaluation = [
        sys.executable,
        str(REPO / "eval_rag.py"),
        "--model_name_or_path",
        str(tmp_path / "runs" / "x"),
        "--evaluation_set",
        str(tmp_path / "q.txt"),
        "--gold_data_path",
        str(tmp_path / "g.txt"),
    ]
    (tmp_path / "runs").mkdir()
    refused = subprocess.run(evaluation, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("eval_rag.py: error: --model_name_or_path ")
