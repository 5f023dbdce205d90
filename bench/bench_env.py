"""The environment every benchmark sets before Ray and transformers are imported, as tests/conftest.py does.

Imported first (`import bench_env`, its own import section in pyproject.toml's isort settings): no hub, no Ray
token file, no colour codes in actor output, no progress bars from the Ray actors that save KB versions."""

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_COLOR_PREFIX"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Ray's workers and DDP's children import the package from this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def write_json(path: str | None, result: dict) -> None:
    """A benchmark's --json: its figures to `path` (when given), indented, and a line saying so after its report."""
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")
