"""Shared fixtures: tiny random models, a tiny KB built from the dummy CSV, and one local Ray."""

import os
import uuid
from pathlib import Path

import pytest

# Before ray/transformers are imported: no hub, no Ray token file, no colour codes in actor output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_COLOR_PREFIX"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
DUMMY_DATA = REPO / "test_run" / "dummy-train-data"


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run many times faster on one thread than on several contending ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    from rag_end2end.kb.ray_start import init_ray, shutdown_ray

    init_ray(None, "rag-tests")
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from rag_end2end import tiny_models as make_tiny_models

    return make_tiny_models.build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_kb(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """Version 0 of the dummy KB, encoded by the tiny context encoder, with an exact (flat) index."""
    from rag_end2end.kb import build as use_own_knowledge_dataset

    out = tmp_path_factory.mktemp("kb")
    args = use_own_knowledge_dataset.parse_args(
        [
            "--csv_path",
            str(DUMMY_CSV),
            "--output_dir",
            str(out),
            "--index_type",
            "flat",
            "--dpr_ctx_encoder_model_name",
            str(tiny_models["context_encoder"]),
            "--device",
            "cpu",
        ]
    )
    return use_own_knowledge_dataset.main(args)


@pytest.fixture
def finetune_argv(tiny_models, tiny_kb, tmp_path):
    """Command-line arguments for finetune_rag.py with the tiny models; extra flags are appended."""

    from rag_end2end.tiny_models import tiny_run_argv

    def make(*extra: str, model: str = "rag_token") -> list[str]:
        batches = ["--train_batch_size", "2", "--eval_batch_size", "4"]
        namespace = ["--ray_namespace", f"test-{uuid.uuid4().hex[:8]}"]
        return [*tiny_run_argv(tiny_models, tiny_kb, DUMMY_DATA, tmp_path / "out", model), *batches, *namespace, *extra]

    return make
