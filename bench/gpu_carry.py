"""Carry the wheels the lent GPU machine lacks (Ray, FAISS, datasets, ...) in the device tool's calls.

The GPU machine has no network, and a call carries at most 64 MiB with the working tree; the Ray wheel
alone is 79 MB. So (../shared/reference/gpu-device.md):

    python bench/gpu_carry.py download         # here: pip download the wheels for Python 3.12 / manylinux x86_64
    python bench/gpu_carry.py plan             # split what is too large, pack .gpu-carry/call1, call2, ...
    # call 1 (carry [".gpu-carry/call1"]):  bash bench/gpu_check.sh   (it runs `install --target /tmp/site`)
    #   -> stashes its parts in /tmp/gpu-carry-stash; send call 2 at once, while the machine is warm
    # call 2 (carry [".gpu-carry/call2"]):  bash bench/gpu_check.sh
    #   -> rejoins every wheel, checks its sha256, pip-installs it with --target, and the check runs
    python3 bench/gpu_carry.py check           # pip check (gpu_check.sh runs it): stops on a conflict among carried

`install` uses the standard library and pip only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"  # git-ignored
STASH = Path("/tmp/gpu-carry-stash")  # where one call leaves its parts for the next (lost when the machine goes)
MANIFEST = "manifest.json"
MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # the device tool's carry limit per call, working tree included
# What the GPU machine lacks (gpu-device.md) and the check imports, each at one exact version (the project venv's,
# requirements.txt) that meets every carried package's Requires-Dist (their METADATA, 2026-12-06): datasets 5.2.0
# wants dill<0.4.2, multiprocess<0.70.20, fsspec<=2026.9.0 (the machine's own fsspec may be newer); multiprocess
# 0.70.19 wants dill>=0.4.1; ray 2.60.0 wants msgpack<2, requests and jsonschema (`import ray` needs both);
# torchdata 0.11.0 (finetune_rag.py's StatefulDataLoader) wants requests and urllib3; requests 2.34.2 wants
# charset_normalizer<4, urllib3<3, idna<4 and certifi (which the machine has only if its huggingface-hub uses
# httpx: carried, they are there either way). They install with --no-deps, so nothing else travels;
# tests/test_gpu_check.py checks these requirements here, and `check` below runs pip check on the machine.
PACKAGES = (
    "ray==2.60.0",
    "faiss-cpu==1.15.1",
    "datasets==5.2.0",
    "torchdata==0.11.0",  # the toolkit imports these
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "fsspec==2026.9.0",  # datasets' needs
    "msgpack==1.2.4",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "charset-normalizer==3.5.3",  # ray's and torchdata's
    "idna==3.21",
    "certifi==2026.10.19.post1",  # requests'
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",  # ray's
)
# Import names the GPU machine has installed (gpu-device.md, with their CUDA parts): a carried wheel that holds one
# of them would shadow the machine's copy from the front of PYTHONPATH, so plan() refuses it.
MACHINE_HAS = frozenset(
    {
        "torch",
        "nvidia",
        "triton",
        "transformers",
        "pytorch_lightning",
        "lightning",
        "peft",
        "sentence_transformers",
        "torchmetrics",
        "tensorboard",
        "accelerate",
        "safetensors",
        "tokenizers",
        "huggingface_hub",
        "pyarrow",
        "pandas",
        "numpy",
        "matplotlib",
        "pytest",
        "hypothesis",
        "psutil",
        "xxhash",
    }
)
PLATFORM = [
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def download(dest: Path, packages: list[str]) -> list[Path]:
    """pip download each package's wheel for the GPU machine's Python and platform, without dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(dest)]
    subprocess.run([*cmd, *packages], check=True)
    return sorted(dest.glob("*.whl"))


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): faiss_cpu, Faiss.CPU and faiss-cpu are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_names(packages: tuple[str, ...] | list[str] = PACKAGES) -> set[str]:
    """The canonical distribution names of the carried packages ("faiss-cpu==1.15.1" -> "faiss-cpu")."""
    return {canonical(re.split(r"[=<>!~;\[ ]", spec, maxsplit=1)[0]) for spec in packages}


def top_level_names(wheel: Path) -> set[str]:
    """What a wheel puts at the top of site-packages (its packages and modules, not its .dist-info/.data)."""
    with zipfile.ZipFile(wheel) as z:
        names = {name.split("/", 1)[0] for name in z.namelist()}
    return {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data"))}


def pip_check(
    carried: set[str], python: str = sys.executable, env: dict | None = None
) -> tuple[int, list[str], list[str]]:
    """`pip check` of what `python` imports (PYTHONPATH, so the carried --target folder, included): its exit
    status, the conflicts among carried packages (one carried package's requirement on another carried one
    unmet: the plan is wrong, so the check must stop), and every other line (a carried package's need that the
    machine's own packages do not meet, or the machine's own conflicts: printed; the import check decides)."""
    run = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    among, other = [], []
    for line in (run.stdout + run.stderr).splitlines():
        # "A 1.0 requires B, which is not installed." / "A 1.0 has requirement B<2, but you have B 2.1."
        found = re.match(r"(\S+) \S+ (?:requires ([A-Za-z0-9._-]+)|has requirement ([A-Za-z0-9._-]+))", line)
        if found and {canonical(found[1]), canonical(found[2] or found[3])} <= carried:
            among.append(line)
        elif line.strip() and not line.startswith("No broken requirements"):
            other.append(line)
    return run.returncode, among, other


def tree_bytes(repo: Path = REPO) -> int:
    """What the working tree adds to every call: the files git would carry (tracked or not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True, check=True
    ).stdout.decode()
    return sum((repo / name).stat().st_size for name in out.split("\0") if name and (repo / name).is_file())


def plan(wheels: list[Path], out: Path, per_call: int) -> dict:
    """Split wheels over `per_call` bytes into parts, pack whole wheels and parts into call1/, call2/, ...
    (first fit, largest first, so a wheel's parts land in consecutive calls) and write the manifest into
    every call's folder. Nothing in `out` is overwritten: a new plan needs a folder without calls."""
    if any(out.glob("call*")):
        raise FileExistsError(f"{out} already holds a plan (call*/): remove it to plan again")
    for wheel in wheels:
        if shadowed := sorted(top_level_names(wheel) & MACHINE_HAS):
            raise ValueError(
                f"{wheel.name} holds {', '.join(shadowed)}, which the GPU machine has: in front of "
                "it on PYTHONPATH it would shadow the machine's copy; carry no such wheel"
            )
    pieces = []  # (wheel name, part index, bytes)
    entries = []
    for wheel in sorted(wheels, key=lambda p: -p.stat().st_size):
        data, size = wheel.read_bytes(), wheel.stat().st_size
        n_parts = -(-size // per_call)
        entries.append({"wheel": wheel.name, "sha256": sha256(wheel), "bytes": size, "parts": []})
        pieces += [(wheel.name, i, data[i * per_call : (i + 1) * per_call]) for i in range(n_parts)]
    calls: list[list] = []
    for piece in pieces:
        room = next((c for c in calls if sum(len(p[2]) for p in c) + len(piece[2]) <= per_call), None)
        if room is None:
            calls.append(room := [])
        room.append(piece)
    for number, call in enumerate(calls, start=1):
        folder = out / f"call{number}"
        folder.mkdir(parents=True)
        for name, index, data in call:
            part = f"{name}.part{index:02d}"
            (folder / part).write_bytes(data)
            next(e for e in entries if e["wheel"] == name)["parts"].append({"file": part, "call": number})
    manifest = {"calls": len(calls), "wheels": entries}
    for number in range(1, len(calls) + 1):
        (out / f"call{number}" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def describe(manifest: dict, out: Path) -> str:
    """Which call carries what, in the device tool's terms."""
    lines = []
    for number in range(1, manifest["calls"] + 1):
        folder = out / f"call{number}"
        size = sum(p.stat().st_size for p in folder.iterdir())
        parts = [
            f"{e['wheel']} part {i + 1}/{len(e['parts'])}" if len(e["parts"]) > 1 else e["wheel"]
            for e in manifest["wheels"]
            for i, p in enumerate(e["parts"])
            if p["call"] == number
        ]
        step = "then run the check" if number == manifest["calls"] else "only stage it; send the next call at once"
        lines.append(
            f'call {number}: carry ["{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}'
            f'"] ({size / MIB:.1f} MiB): {", ".join(parts)}; {step}'
        )
    return "\n".join(lines)


def install(carry: Path, stash: Path, target: Path) -> bool:
    """Move this call's parts to the stash; when every part of every wheel is there, rejoin each wheel, check
    its sha256, and pip-install them all into `target` (no dependencies: the plan names them all). True when
    installed, False when parts are still to come."""
    calls = sorted(carry.glob("call*"))
    if not calls and not (stash / MANIFEST).is_file():
        raise FileNotFoundError(f"nothing to install: no {carry}/call*/ and no {stash}/{MANIFEST}")
    stash.mkdir(parents=True, exist_ok=True)
    for folder in calls:  # this call's folder (the tree only holds the folders it carried)
        for path in folder.iterdir():
            shutil.copyfile(path, stash / path.name)
    manifest = json.loads((stash / MANIFEST).read_text())
    missing = [p["file"] for e in manifest["wheels"] for p in e["parts"] if not (stash / p["file"]).is_file()]
    if missing:
        later = sorted({p["call"] for e in manifest["wheels"] for p in e["parts"] if p["file"] in missing})
        print(f"gpu_carry: staged in {stash}; waiting for call(s) {later} ({len(missing)} part(s))", flush=True)
        return False
    wheels_dir = stash / "wheels"
    wheels_dir.mkdir(exist_ok=True)
    wheels = []
    for entry in manifest["wheels"]:
        wheel = wheels_dir / entry["wheel"]
        with wheel.open("wb") as f:
            for part in entry["parts"]:
                f.write((stash / part["file"]).read_bytes())
        if sha256(wheel) != entry["sha256"]:
            raise ValueError(f"{wheel}: sha256 differs from the manifest's: a part is corrupt or from another plan")
        wheels.append(str(wheel))
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            *wheels,
        ],
        check=True,
    )
    print(f"gpu_carry: installed {len(wheels)} wheel(s) into {target} (PYTHONPATH={target})", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="pip download the wheels for Python 3.12 / manylinux x86_64")
    d.add_argument("--dest", type=Path, default=CARRY / "wheels")
    d.add_argument("packages", nargs="*", default=list(PACKAGES))
    s = sub.add_parser("plan", help="split and pack the wheels into call folders, and say which call carries what")
    s.add_argument("--wheels", type=Path, default=CARRY / "wheels")
    s.add_argument("--out", type=Path, default=CARRY)
    s.add_argument(
        "--per_call_mib",
        type=float,
        default=None,
        help="bytes a call may carry besides the tree (default: 64 MiB - the tree - 1 MiB)",
    )
    i = sub.add_parser("install", help="on the GPU machine: stash this call's parts; rejoin and install when complete")
    i.add_argument("--carry", type=Path, default=CARRY)
    i.add_argument("--stash", type=Path, default=STASH)
    i.add_argument("--target", type=Path, default=Path("/tmp/site"))
    sub.add_parser("check", help="pip check of what this Python imports; fails on a conflict among carried packages")
    args = p.parse_args(argv)
    if args.command == "download":
        print("\n".join(str(w) for w in download(args.dest, args.packages)))
    elif args.command == "plan":
        per_call = int(args.per_call_mib * MIB) if args.per_call_mib else CALL_LIMIT - tree_bytes() - MIB
        manifest = plan(sorted(args.wheels.glob("*.whl")), args.out, per_call)
        print(describe(manifest, args.out))
    elif args.command == "check":
        rc, among, other = pip_check(carried_names())
        print(f"gpu_carry: pip check exited {rc}" + (": no broken requirements" if rc == 0 else ""))
        for line in other:
            print(f"gpu_carry: pip check (not among carried packages, the import check decides): {line}")
        for line in among:
            print(f"gpu_carry: pip check, CONFLICT AMONG CARRIED PACKAGES (fix PACKAGES): {line}")
        return 4 if among else 0
    else:
        return 0 if install(args.carry, args.stash, args.target) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
