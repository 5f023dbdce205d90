"""Resuming a run: the settings a checkpoint was trained under compared with the new flags (model, recipe,
marginal, passages per question, data and KB by fingerprint...), and a finished run extended by more epochs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from faults import kill_actors

from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training import run_dir

REPO = Path(__file__).resolve().parents[1]
DUMMY_DATA = REPO / "test_run" / "dummy-train-data"


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag`'s value replaced."""
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def test_a_resume_under_other_settings_is_refused_naming_each_changed_flag(
    ray_local, finetune_argv, tiny_models, tmp_path
):
    argv = finetune_argv("--do_train", "--max_steps", "2", "--num_sanity_val_steps", "0", "--limit_val_batches", "0")
    kill_actors(finetune_rag.main(finetune_rag.parse_args(argv)))

    def resume(*argv: str) -> None:
        run_dir.prepare_output_dir(finetune_rag.parse_args([*argv, "--resume"]))

    resume(*argv)  # the same settings
    resume(*argv, "--gradient_checkpointing")  # memory against time, the same gradients: never compared
    # The partial policies' parameters do nothing under --refresh_policy full (saved and new): not compared
    resume(*argv, "--refresh_slices", "8", "--hot_random_share", "0.5", "--full_refresh_every", "3")
    with pytest.raises(ValueError, match=r"--refresh_policy rotating \(was full\); --refresh_slices 8 \(was 4\)"):
        resume(*argv, "--refresh_policy", "rotating", "--refresh_slices", "8")
    moved = tmp_path / "moved-data"  # the same QA files elsewhere: the same data
    shutil.copytree(DUMMY_DATA, moved)
    resume(*_with(argv, "--data_dir", str(moved)))

    with pytest.raises(ValueError) as refused:
        resume(*argv, "--n_docs", "2", "--model_type", "rag_sequence", "--training_mode", "retriever_only")
    message = str(refused.value)
    assert "\n" not in message and "last.ckpt" in message
    for named in ("--n_docs 2 (was None)", "--model_type rag_sequence (was rag_token)", "--training_mode"):
        assert named in message

    (moved / "train.target").write_text((DUMMY_DATA / "train.target").read_text().replace("a", "b"))
    with pytest.raises(ValueError, match=r"--data_dir .*moved-data \(its QA files differ"):
        resume(*_with(argv, "--data_dir", str(moved)))

    csv = tmp_path / "other.csv"  # another corpus: the KB is not the one the run trained on
    csv.write_text("".join(f"Other {i}\tunrelated passage number {i}\n" for i in range(6)))
    build = ["--csv_path", str(csv), "--output_dir", str(tmp_path / "other-kb"), "--index_type", "flat"]
    build += ["--dpr_ctx_encoder_model_name", str(tiny_models["context_encoder"]), "--device", "cpu"]
    passages, index = use_own_knowledge_dataset.main(use_own_knowledge_dataset.parse_args(build))
    with pytest.raises(ValueError, match=r"--passages_path .*\(another KB: 6:"):
        resume(*_with(_with(argv, "--passages_path", str(passages)), "--index_path", str(index)))

    # Safe changes only with --allow_changed_settings
    with pytest.raises(ValueError, match=r"--learning_rate 0.001 \(was 5e-05\); --max_steps 4 \(was 2\).*--allow_"):
        resume(*_with(argv, "--max_steps", "4"), "--learning_rate", "1e-3")
    resume(*_with(argv, "--max_steps", "4"), "--learning_rate", "1e-3", "--allow_changed_settings")
    with pytest.raises(ValueError, match=r"--num_nodes 2 \(was 1\).*--allow_"):  # another global batch: named
        resume(*argv, "--num_nodes", "2")
    resume(*argv, "--num_nodes", "2", "--allow_changed_settings")
    with pytest.raises(ValueError, match="--n_docs"):  # never the others
        resume(*argv, "--n_docs", "2", "--allow_changed_settings")

    # From the command line: one line, exit status 2, before Ray or a model starts
    cli = [sys.executable, "finetune_rag.py", *argv, "--resume", "--training_mode", "rag_end2end"]
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "--training_mode rag_end2end (was rag_original)" in error[0]


def test_a_finished_run_extended_by_an_epoch_trains_exactly_that_epoch(ray_local, finetune_argv):
    """The finished run's last.ckpt was written at its last step, before the epoch's end (every 4 steps: 2 epochs of
    2 steps); Lightning counted that epoch done but ran the next one on the spent loader: 0 steps."""
    argv = finetune_argv("--do_train", "--train_batch_size", "20", "--num_sanity_val_steps", "0")
    argv += ["--limit_val_batches", "1", "--save_last_every_n_steps", "4"]
    first = finetune_rag.main(finetune_rag.parse_args([*argv, "--num_train_epochs", "2"]))
    assert first.trainer.global_step == 4
    kill_actors(first)
    extend = [*argv, "--num_train_epochs", "3", "--resume", "--allow_changed_settings"]
    again = finetune_rag.main(finetune_rag.parse_args(extend))
    assert again.trainer.global_step == 6 and again.trainer.current_epoch == 3
    kill_actors(again)
