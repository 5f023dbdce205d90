"""The GPU check kit on CPU: the carry helper (split, pack, stash, rejoin, install into a target, import, pip
check) on wheels built here; that every module the check imports is on the GPU machine or carried, at the pinned
versions; and `bench/gpu_check.sh --cpu`, the dry run that keeps the check working between leases."""

import ast
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gpu_carry
import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def make_wheel(folder: Path, name: str, value: int, blob_bytes: int, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel of package `name` (VALUE = value, and blob.bin of random bytes), built by hand;
    `requires`: its Requires-Dist lines."""
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
        f"{name}/blob.bin": random.Random(value).randbytes(blob_bytes),
    }
    info = f"{name}-0.1.dist-info"
    needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n{needs}".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"

    def record(path: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    files[f"{info}/RECORD"] = ("\n".join(record(p, d) for p, d in files.items()) + f"\n{info}/RECORD,,\n").encode()
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def test_wheels_split_over_calls_rejoin_install_into_a_target_and_import(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    big, small = make_wheel(wheels, "carrybig", 7, 6000), make_wheel(wheels, "carrysmall", 3, 100)
    per_call = 4000  # bytes: the big wheel needs two parts, so two calls
    manifest = gpu_carry.plan([big, small], tmp_path / "carry", per_call)
    assert manifest["calls"] >= 2
    entry = next(e for e in manifest["wheels"] if e["wheel"] == big.name)
    assert len(entry["parts"]) == 2 and entry["sha256"] == gpu_carry.sha256(big)
    for folder in (tmp_path / "carry").glob("call*"):
        assert sum(p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json") <= per_call
    said = gpu_carry.describe(manifest, tmp_path / "carry")
    assert "call 1: carry" in said and f"{big.name} part 2/2" in said and "then run the check" in said
    with pytest.raises(FileExistsError):  # a plan is never overwritten
        gpu_carry.plan([big], tmp_path / "carry", per_call)

    # The GPU machine gets one call's folder at a time; the stash keeps the earlier ones.
    stash, target = tmp_path / "stash", tmp_path / "site"
    for number in range(1, manifest["calls"] + 1):
        device = tmp_path / f"device-call{number}"
        shutil.copytree(tmp_path / "carry" / f"call{number}", device / f"call{number}")
        done = gpu_carry.install(device, stash, target)
        assert done == (number == manifest["calls"])
        assert not (target / "carrybig").exists() or done
    code = (
        "import carrybig, carrysmall, pathlib; print(carrybig.VALUE + carrysmall.VALUE, "
        "len((pathlib.Path(carrybig.__file__).parent / 'blob.bin').read_bytes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["10", "6000"]


def test_a_corrupt_part_is_refused_before_anything_is_installed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = make_wheel(wheels, "carrybig", 7, 3000)
    gpu_carry.plan([wheel], tmp_path / "carry", 2000)
    part = next((tmp_path / "carry" / "call2").glob("*.part*"))
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):  # both calls' folders here: it rejoins at once
        gpu_carry.install(tmp_path / "carry", tmp_path / "stash", tmp_path / "site")
    assert not (tmp_path / "site" / "carrybig").exists()


def test_a_wheel_that_would_shadow_the_machines_torch_is_refused(tmp_path):
    """Carried wheels go in front of the machine's packages (PYTHONPATH=/tmp/site): one holding torch, numpy, ...
    would replace the machine's CUDA build. plan() refuses it before packing anything."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    ok, bad = make_wheel(wheels, "carrysmall", 3, 100), make_wheel(wheels, "torch", 1, 100)
    with pytest.raises(ValueError, match="torch-0.1-py3-none-any.whl holds torch, which the GPU machine has"):
        gpu_carry.plan([ok, bad], tmp_path / "carry", 4000)
    assert not (tmp_path / "carry").exists()


def test_pip_check_stops_on_a_conflict_among_carried_packages_only(tmp_path):
    """After install, pip check sees the --target folder through PYTHONPATH: a carried package's unmet need on
    another carried one is a conflict that stops the check; a need on something else is only reported."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    needs = ("carryb>=2", "notonthemachine")
    make_wheel(wheels, "carrya", 1, 10, requires=needs), make_wheel(wheels, "carryb", 2, 10)
    gpu_carry.plan(sorted(wheels.glob("*.whl")), tmp_path / "carry", 10**6)
    assert gpu_carry.install(tmp_path / "carry", tmp_path / "stash", tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    # This venv's own unmet needs (e.g. the packaged weights' llama-cpp-python, after install_pretrained_models)
    # are pip's report too, but not these wheels': look at the lines about them.
    def ours(lines: list[str]) -> list[str]:
        return [line for line in lines if line.split()[0] in ("carrya", "carryb")]

    rc, among, other = gpu_carry.pip_check({"carrya", "carryb"}, env=env)
    assert rc != 0
    assert among == ["carrya 0.1 has requirement carryb>=2, but you have carryb 0.1."]
    assert ours(other) == ["carrya 0.1 requires notonthemachine, which is not installed."]
    rc, among, other = gpu_carry.pip_check({"carrya"}, env=env)  # carryb the machine's: reported, not fatal
    assert among == [] and len(ours(other)) == 2
    assert gpu_carry.pip_check({"carrya", "carryb"})[1] == []  # this venv alone: no conflict among them


def test_carried_packages_are_pinned_at_the_versions_this_venv_tests():
    """Every carried package at one exact version, the one installed here: the dry run (and CI) run with it,
    and pip check passes here, so the carried set is consistent (e.g. datasets 5.2.0's dill<0.4.2)."""
    for spec in gpu_carry.PACKAGES:
        name, _, version = spec.partition("==")
        assert version, f"{spec}: carried packages are pinned with =="
        assert importlib.metadata.version(name) == version, f"{spec}: this venv has {importlib.metadata.version(name)}"


def _imports(path: Path) -> dict[str, bool]:
    """Top-level names of the absolute imports in a file -> whether one of them runs when the module is imported
    (outside any function body)."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
            if node.module.split(".")[0] == PACKAGE:  # `from rag_end2end.kb import refresh` names a module too
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            key = name if name.split(".")[0] == PACKAGE else name.split(".")[0]  # the package's by module
            found[key] = found.get(key, False) or not in_function
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _imports_by_distribution() -> dict[str, set[str]]:
    """This venv's distributions (canonical names) -> the import names each provides."""
    by_dist: dict[str, set[str]] = {}
    for top, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(gpu_carry.canonical(dist), set()).add(top)
    return by_dist


def _requirements(dist: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """What installing `dist` (with `extras`) requires, markers evaluated for this Python."""
    reqs = [Requirement(line) for line in importlib.metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *extras))]


def _machine_distributions(by_dist: dict[str, set[str]]) -> set[str]:
    """What the GPU machine has: the distributions of gpu_carry.MACHINE_HAS with everything they require, as pip
    installed them here (a clean venv of the machine's list installs the same names)."""
    todo = [
        (gpu_carry.canonical(d), ())
        for top in gpu_carry.MACHINE_HAS
        for d in importlib.metadata.packages_distributions().get(top, [])
    ]
    closure: set[tuple[str, tuple]] = set()
    while todo:
        dist, extras = todo.pop()
        if (dist, extras) in closure or dist not in by_dist:
            continue
        closure.add((dist, extras))
        todo += [(gpu_carry.canonical(r.name), tuple(sorted(r.extras))) for r in _requirements(dist, extras)]
    return {dist for dist, _ in closure}


GPU_MARK = r"pytest\.mark\.gpu\b"  # how gpu_check.sh finds the GPU test files (grep -E)
# Imported only inside functions that the check never calls.
LAZY = {"rouge_score": "evaluation/metrics.py, --metrics rouge_l", "sacrebleu": "evaluation/metrics.py, --metrics bleu"}
PACKAGE = "rag_end2end"  # the toolkit's own modules: the GPU machine runs them from the carried tree


def test_every_module_the_check_imports_is_on_the_gpu_machine_or_carried():
    """The modules reachable from the check's entry points (the files marked gpu, conftest.py, gpu_check.py) import
    only the standard library, the repository's modules, what the GPU machine has (with what its packages need)
    and what gpu_carry.py carries: a new third-party import (as torchdata was) fails here, not on a lent GPU."""
    local = {p.stem: p for folder in (REPO / "bench", REPO / "tests") for p in folder.glob("*.py")}
    local |= {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (REPO / PACKAGE).rglob("*.py")
    }
    gpu_tests = [p for p in REPO.glob("tests/test_*.py") if re.search(GPU_MARK, p.read_text(encoding="utf-8"))]
    todo = [*gpu_tests, REPO / "tests" / "conftest.py", REPO / "bench" / "gpu_check.py"]
    seen, third_party = set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for top, at_import in _imports(path).items():
            if top in local:
                todo.append(local[top])
            elif top.split(".")[0] == PACKAGE:
                continue  # a name inside one of the package's modules, not a module
            elif top not in sys.stdlib_module_names:
                third_party.setdefault(top, []).append((path.relative_to(REPO).as_posix(), at_import))
    assert {"test_gpu.py", "finetune.py", "rag.py", "encoding.py"} <= {p.name for p in seen}
    by_dist = _imports_by_distribution()
    # The carried packages alone: they install with --no-deps.
    available = {top for dist in _machine_distributions(by_dist) | gpu_carry.carried_names() for top in by_dist[dist]}
    missing = {top: where for top, where in third_party.items() if top not in available and top not in LAZY}
    assert not missing, f"imported by the check, neither on the GPU machine nor carried (gpu_carry.PACKAGES): {missing}"
    eager = {top: where for top, where in third_party.items() if top in LAZY and any(a for _, a in where)}
    assert not eager, f"imported at module level, so needed on the GPU machine: {eager}"


def test_what_the_carried_packages_require_is_carried_at_a_fitting_version_or_on_the_machine():
    """pip check before any lease: each carried package's requirements (Requires-Dist, read here) name a carried
    package whose pinned version fits, or a package of the GPU machine (`import ray` needs requests, which that
    machine may lack, so it is carried)."""
    pins = {gpu_carry.canonical(s.partition("==")[0]): s.partition("==")[2] for s in gpu_carry.PACKAGES}
    machine = _machine_distributions(_imports_by_distribution())
    unmet = []
    for dist in pins:
        for req in _requirements(dist):
            name = gpu_carry.canonical(req.name)
            if name in pins and not req.specifier.contains(pins[name], prereleases=True):
                unmet.append(f"{dist} needs {req}, carried at {pins[name]}")
            elif name not in pins and name not in machine:
                unmet.append(f"{dist} needs {req}: neither carried nor on the machine")
    assert not unmet


def test_device_memory_catches_another_processs_peak_inside_the_block(monkeypatch):
    """The device-wide figure: cudaMemGetInfo's use (every process on the GPU, the Ray encoding actor's too),
    sampled while the block runs, so a peak that is gone when it ends still counts. Without a GPU here, the
    driver's answer is played by a function (what an actor in another process would allocate and free)."""
    import gpu_check
    import torch

    total, used = 80 * 2**30, [100 * 2**20]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - used[0], total))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with gpu_check.DeviceMemory(True, interval=0.005) as memory:
        used[0] = 900 * 2**20  # the actor encodes
        time.sleep(0.2)
        used[0] = 200 * 2**20  # and lets go before the block ends
    assert (memory.before_mib, memory.peak_mib) == (100, 900)
    quiet = gpu_check.DeviceMemory(True)
    with quiet:
        pass
    summary = gpu_check.device_memory([quiet, memory])
    assert summary["device_memory_peak_mib"] == 900 and summary["device_memory_before_mib"] == 100
    with gpu_check.DeviceMemory(False) as off:  # the CPU dry run: nothing measured, nothing claimed
        pass
    assert gpu_check.device_memory([off])["device_memory_peak_mib"] is None


@pytest.mark.slow
def test_cpu_dry_run_of_the_gpu_check(tmp_path):
    """`bench/gpu_check.sh --cpu` runs every step it can, says which it skipped, and writes one JSON and one log."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert result["mode"] == "cpu" and "skipped (no CUDA)" in log
    assert result["versions"]["torch"] and result["gpu_tests"]["returncode"] == 0
    train = result["train"]
    assert train["steps"] > 0 and train["tokens_per_s"] > 0 and train["refreshes"] >= 1
    assert 0 < train["step_ms_median"] <= train["step_ms_p95"]
    encode = result["encode"]
    assert encode["bare_forward_passages_per_s"] > 0 and 0 < encode["refresh_vs_bare"]
    assert result["refresh"]["step_ratio_median"] > 0
