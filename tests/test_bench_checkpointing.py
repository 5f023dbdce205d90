"""bench/bench_checkpointing.py on a tiny Llama: its parameter arithmetic, one measurement per configuration (each
in a child process, as the bench runs them: a measuring process makes itself the OOM killer's first choice and
resets its peak RSS, which must not happen to the test session and the Ray workers and DDP ranks it starts later),
and the summary's ratios."""

import argparse
from pathlib import Path

import pytest
import transformers


@pytest.fixture(scope="module")
def bench():
    import bench_checkpointing

    return bench_checkpointing


def tiny(**changes) -> argparse.Namespace:
    """A Llama small enough to step in well under a second, in fp32 (exact on any CPU)."""
    flags = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=500, dtype="fp32", batch=2, seq=32)
    return argparse.Namespace(**{**flags, "steps": 1, "seed": 0, **changes})


def command_line(args: argparse.Namespace) -> list[str]:
    """The bench's flags for `args`, as run_child passes them on to its child."""
    return [f"--{name}={value}" for name, value in vars(args).items()]


def test_the_parameter_arithmetic_counts_the_built_model(bench):
    for args in (tiny(), tiny(kv_heads=4, layers=3)):
        model = transformers.LlamaForCausalLM(bench.llama_config(args))
        assert bench.parameter_count(args) == sum(p.numel() for p in model.parameters())


def test_one_measurement_per_configuration_and_their_ratios(bench):
    args = tiny()
    oom_score_adj = Path("/proc/self/oom_score_adj").read_text()
    runs = [bench.run_child(config, args, command_line(args)) for config in bench.CONFIGS]
    assert Path("/proc/self/oom_score_adj").read_text() == oom_score_adj  # the test session's own, untouched
    assert [r["oom_score_adj"] for r in runs] == [1000, 1000]
    assert [r["checkpointing"] for r in runs] == [False, True]
    assert runs[0]["first_loss"] == pytest.approx(runs[1]["first_loss"])  # the same model and batch
    for r in runs:
        assert r["baseline_bytes"] > 0 and r["peak_bytes"] >= r["baseline_bytes"] and len(r["step_s"]) == 1
    summary = bench.summarise(runs, args)
    plain, ckpt = summary["plain"], summary["checkpointed"]
    assert summary["ratios"]["step_time"] == pytest.approx(ckpt["step_s"] / plain["step_s"])
    assert summary["per_token_layer"]["plain"] == plain["activation_bytes"] / (2 * 32) / 2
    assert "checkpointed / plain" in bench.markdown(
        {"params": vars(args), "summary": summary, "runs": runs, "parameters": runs[0]["parameters"]}
    )
