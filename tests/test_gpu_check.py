"""The GPU check kit on CPU: the carry helper (split, pack, stash, rejoin, install into a target, import) on
wheels built here, and `bench/gpu_check.sh --cpu`, the dry run that keeps the check working between leases."""

import base64
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_carry", REPO / "bench" / "gpu_carry.py")
gpu_carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_carry)


def make_wheel(folder: Path, name: str, value: int, blob_bytes: int) -> Path:
    """A pure-Python wheel of package `name` (VALUE = value, and blob.bin of random bytes), built by hand."""
    files = {f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
             f"{name}/blob.bin": random.Random(value).randbytes(blob_bytes)}  # fmt: skip
    info = f"{name}-0.1.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode()
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
    code = "import carrybig, carrysmall, pathlib; print(carrybig.VALUE + carrysmall.VALUE, " \
           "len((pathlib.Path(carrybig.__file__).parent / 'blob.bin').read_bytes()))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True)  # fmt: skip
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


def test_cpu_dry_run_of_the_gpu_check(tmp_path):
    """`bench/gpu_check.sh --cpu` runs every step it can, says which it skipped, and writes one JSON and one log."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
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
