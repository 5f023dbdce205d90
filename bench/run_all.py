"""Every benchmark in one command: one JSON and one Markdown table, with the machine, versions and date.

    python bench/run_all.py --out bench/results            # the figures in bench/README.md
    python bench/run_all.py --out /tmp/quick --quick       # small sizes: checks that every bench runs

Each benchmark runs in its own process (its own Ray) and writes its JSON; this script gathers them into
OUT/results.json and OUT/results.md. Timings are ratios measured inside one benchmark's run, so the noise of a
shared machine falls on both sides of each ratio. `--only encode,refresh` runs a subset; the others' JSON
already in OUT (from an earlier run) goes into the tables too, marked as such.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# name -> (the bench's arguments: full run, --quick run); each also gets --json
BENCHES = {
    "encode": (["--passages", "1000", "--repeats", "3", "--profile"], ["--passages", "200", "--repeats", "1"]),
    "refresh": (["--splits", "2:1,1:1,2:2"], ["--steps", "30", "--repeats", "1", "--swaps", "2", "--kb_copies", "5"]),
    "index": (
        ["--sizes", "10000,100000,1000000", "--queries", "500", "--max_build_s", "300"],
        ["--sizes", "5000", "--dim", "64", "--queries", "50"],
    ),
    "memory": (["--sizes", "100000,1000000"], ["--sizes", "5000"]),
    "retrieval": (
        ["--sizes", "1000,10000,100000", "--dim", "768"],
        ["--sizes", "1000", "--dim", "64", "--calls", "30"],
    ),
    "checkpointing": (
        ["--seq", "256", "--steps", "1", "--rounds", "1"],
        ["--layers", "2", "--hidden", "256", "--intermediate", "688", "--heads", "4", "--vocab", "2000", "--seq", "64"],
    ),
}


def environment() -> dict:
    """Machine, versions and date of this run."""
    import faiss
    import pytorch_lightning as pl
    import ray
    import torch
    import transformers

    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, {int(mem) / 2**20:.0f} GiB",
        "gpu": gpu,
        "load_average_at_start": os.getloadavg()[0],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "ray": ray.__version__,
            "transformers": transformers.__version__,
            "faiss": faiss.__version__,
        },
    }


def render(name: str, result: dict) -> str:
    """A bench's Markdown: its own `markdown()` when it has one, else its (metric, value) rows."""
    module = importlib.import_module(f"bench_{name}")
    if hasattr(module, "markdown"):
        return module.markdown(result)
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in result["rows"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results"))
    p.add_argument("--quick", action="store_true", help="small sizes, to check that every benchmark runs")
    p.add_argument(
        "--only",
        default=",".join(BENCHES),
        help=f"comma-separated subset of {', '.join(BENCHES)}; none: re-render stored results",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "benchmarks": {}}
    only = args.only.split(",")
    for name in BENCHES:
        full, quick = BENCHES[name]
        path = out / f"{name}.json"
        if name not in only:
            if path.is_file():
                report["benchmarks"][name] = {"earlier": True, "result": json.loads(path.read_text())}
            continue
        cmd = [sys.executable, str(BENCH / f"bench_{name}.py"), *(quick if args.quick else full), "--json", str(path)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        with (out / f"{name}.log").open("w") as log:  # each bench's own output, progress bars included
            code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        if code or not path.is_file():
            print(f"   failed (exit {code}); see {out / f'{name}.log'}", flush=True)
            report["benchmarks"][name] = {"failed": code, "seconds": seconds}
            continue
        report["benchmarks"][name] = {"seconds": seconds, "result": json.loads(path.read_text())}
        print(f"   {seconds:.0f} s", flush=True)

    env = report["environment"]
    lines = [
        f"# bench/run_all.py, {env['date']}",
        "",
        f"Machine: {env['machine']}, GPU: {env['gpu']}, load average at start {env['load_average_at_start']:.1f}. "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
    ]
    for name, entry in report["benchmarks"].items():
        took = f"{entry['seconds']:.0f} s" if "seconds" in entry else "from an earlier run"
        if measured := entry.get("result", {}).get("environment", {}).get("date"):
            took += f", measured {measured}"
        lines += ["", f"## {name} ({took})", ""]
        lines.append(f"FAILED: see {name}.log" if "failed" in entry else render(name, entry["result"]))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
