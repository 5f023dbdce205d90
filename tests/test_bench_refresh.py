"""bench/bench_refresh.py's --policies: each setting becomes the flags finetune_rag.py reads as meant, and a bad one
stops the bench with one line (exit 2) before anything runs. Timings are never asserted (the bench prints them)."""

import re
import sys
from pathlib import Path

import pytest

from rag_end2end import tiny_models


@pytest.fixture(scope="module")
def bench():
    import bench_refresh

    return bench_refresh


def test_policies_become_finetune_flags(bench):
    settings = bench.parse_policies("full,rotating:4,rotating:4@same,hot:4,hot:8/0@same,rotating:3/2@7")
    paths = {name: Path("/absent") for name in ("rag_token", "context_encoder")}
    base = tiny_models.tiny_run_argv(paths, (Path("/absent"), Path("/absent")), Path("/absent"), Path("/absent"))
    parsed = [bench.finetune_rag.parse_args([*base, *s.argv(10)]) for s in settings]
    got = [(a.refresh_policy, a.refresh_slices, a.full_refresh_every, a.indexing_freq) for a in parsed]
    default_slices = parsed[0].refresh_slices  # full passes no policy flag: finetune_rag.py's defaults
    assert got == [
        ("full", default_slices, 0, 10),
        ("rotating", 4, 0, 10),  # a quarter of the encoding work
        ("rotating", 4, 0, 3),  # @same: 10 / 4 rounded, about the full refresh's passages
        ("hot", 4, bench.HOT_FULL_EVERY, 10),  # hot gets a full pass unless /N says otherwise
        ("hot", 8, 0, 1),  # 10 / 8 rounded
        ("rotating", 3, 2, 7),  # (1/3 + 1) / 2 of the KB a refresh on average, every 7 steps
    ]
    assert settings[0].argv(10) == ("--indexing_freq", "10")  # the default run's flags, as before --policies
    assert settings[3].share == pytest.approx((4 / 4 + 1) / 5)


@pytest.mark.parametrize(
    "text, says",
    [
        ("ful", "is not NAME"),
        ("rotating", "needs :K"),
        ("full:4", "takes no :K"),
        ("full@same", "takes no :K nor @same"),
        ("hot:1", "must be >= 2"),
        ("rotating:4@0", "must be >= 1"),
        ("rotating:4@x", "is not NAME"),
        ("full,", "'' is not NAME"),
        ("full,rotating:4,full", "names a setting twice"),
    ],
)
def test_bad_policies_refused_before_any_work(bench, monkeypatch, capsys, text, says):
    monkeypatch.setattr(sys, "argv", ["bench_refresh.py", "--policies", text])
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args()
    assert stopped.value.code == 2
    assert "error: --policies: " in capsys.readouterr().err
    with pytest.raises(ValueError, match=says):
        bench.parse_policies(text)


def test_default_is_the_full_refresh_alone(bench, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_refresh.py", "--splits", "1:1"])
    args, passthrough = bench.parse_args()
    assert [p.spec for p in args.policies] == ["full"] and passthrough == []


def test_every_run_gets_its_own_directory(bench, monkeypatch):
    # rotating:4/5 and rotating:4@5 once both sanitised to refresh-1-1-rotating-4-5: the second refused mid-bench
    policies = "full,rotating:4/5,rotating:4@5,rotating:45,rotating:4/5@same,hot:4,hot:4/5,full@5"
    monkeypatch.setattr(sys, "argv", ["bench_refresh.py", "--splits", "1:1,2:1", "--policies", policies])
    args, _ = bench.parse_args()
    settings, dirs, refreshing = bench.plan_settings(args)
    assert list(dirs) == list(settings) and len(refreshing) == 2 * 8
    assert len(set(dirs.values())) == len(dirs)
    assert all(re.fullmatch(r"[\w.-]+", d) for d in dirs.values())  # one path component, no odd characters
    assert dirs["refresh-1:1"] == "refresh-1-1"  # the full refresh keeps the name the bench always gave it


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--refresh_policy", "hot"], "--refresh_policy: --policies sets --refresh_policy"),
        (["--refresh_slices=8"], "--refresh_slices=8: --policies sets --refresh_slices"),
        (["--full_refresh_every", "2"], "--policies sets --full_refresh_every"),
        (["--refresh_pol", "hot"], "--policies sets --refresh_policy"),  # finetune_rag.py would take it
        (["--splits", "1:1", "--trainer_threads", "2"], "--splits sets --trainer_threads"),
        (["--splits", "1:1", "--index_cpus", "2"], "--splits sets --index_cpus"),
    ],
)
def test_passed_through_setting_flags_refused(bench, monkeypatch, capsys, flags, says):
    monkeypatch.setattr(sys, "argv", ["bench_refresh.py", "--policies", "full,rotating:4", *flags])
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args()
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err.splitlines()[-1]


def test_other_flags_still_pass_through(bench, monkeypatch):
    # without --splits the thread flags set every run's budget, the README's way to match the baselines'
    flags = ["--trainer_threads", "1", "--index_cpus", "1", "--hot_neighbours", "2", "--refresh_before_validation"]
    monkeypatch.setattr(sys, "argv", ["bench_refresh.py", "--policies", "hot:4", *flags])
    assert bench.parse_args()[1] == flags


@pytest.mark.parametrize(
    "splits, policies, swapped",
    [
        ("", "full,rotating:4,hot:4", "refresh"),
        ("1:1,2:1", "rotating:4,full@5,full,hot:4", "refresh-2:1 full@5"),  # the last split's first full refresh
        ("1:1,2:1", "rotating:4,hot:4", "refresh-2:1 rotating:4"),  # none: its first setting, named in the output
    ],
)
def test_swaps_use_a_full_refresh_version(bench, monkeypatch, splits, policies, swapped):
    monkeypatch.setattr(sys, "argv", ["bench_refresh.py", "--splits", splits, "--policies", policies])
    assert bench.swap_setting(bench.plan_settings(bench.parse_args()[0])[2]) == swapped
