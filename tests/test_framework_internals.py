"""The frameworks' private names this package relies on (docs/design.md, "Framework internals"): each still there,
with the shape the package's code expects, so that a Lightning, Ray or datasets upgrade that moves one fails here,
by name, instead of as a wrong resume or a hang in a long run."""

import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_lightning_checkpoint_internals_that_the_checkpoint_callbacks_override_or_call():
    from pytorch_lightning.callbacks import ModelCheckpoint

    # RagCheckpoint writes the export and KB pin beside each .ckpt and removes them with it.
    assert params(ModelCheckpoint._save_checkpoint) == ["self", "trainer", "filepath"]
    assert params(ModelCheckpoint._remove_checkpoint) == ["self", "trainer", "filepath"]
    # LastCheckpoint saves on a stop inside a step and at the end.
    assert params(ModelCheckpoint._save_last_checkpoint) == ["self", "trainer", "monitor_candidates"]
    assert params(ModelCheckpoint._monitor_candidates) == ["self", "trainer"]
    assert params(ModelCheckpoint._should_save_on_exception) == ["self", "trainer"]
    checkpoint = ModelCheckpoint()
    assert hasattr(checkpoint, "_last_global_step_saved") and hasattr(checkpoint, "_last_checkpoint_saved")


def test_lightning_fit_loop_internals_of_the_mid_epoch_resume(tmp_path):
    """The #20550 workaround (GenerativeQAModule.on_train_start) and LastCheckpoint read these on a real Trainer."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.combined_loader import CombinedLoader

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    loop = trainer.fit_loop
    for name in ("_combined_loader", "_combined_loader_states_to_load", "_data_fetcher"):
        assert hasattr(loop, name), name
    assert isinstance(type(loop).restarted_mid_epoch, property)
    # A resume from a checkpoint written at an epoch's last step starts the next epoch afresh.
    assert isinstance(type(loop.epoch_loop).restarted_on_train_batch_end, property)
    assert params(loop.reset_restart_stage) == [] and hasattr(loop.epoch_loop.batch_progress, "is_last_batch")
    progress = loop.epoch_loop.batch_progress.current
    assert hasattr(progress, "ready") and hasattr(progress, "processed")
    assert params(CombinedLoader._load_state_dicts) == ["self", "states"]
    assert params(CombinedLoader._state_dicts) == ["self"]


def test_lightning_step_results_that_the_per_kind_losses_clear():
    """GenerativeQAModule.log_kind_loss resets the other batch kind's entry, "training_step.<name>", so that a step
    of one kind does not re-log the other kind's last loss (Lightning repeats a step value until it gets a new one)."""
    import pytorch_lightning as pl
    from pytorch_lightning.trainer.connectors.logger_connector.result import _ResultCollection, _ResultMetric

    assert isinstance(inspect.getattr_static(pl.Trainer, "_results"), property)
    assert hasattr(_ResultCollection, "__contains__") and callable(_ResultMetric.reset)


def test_lightning_device_parser():
    from lightning_fabric.utilities.device_parser import _normalize_parse_gpu_string_input

    assert _normalize_parse_gpu_string_input("1,3") == [1, 3]
    assert _normalize_parse_gpu_string_input("2") == 2


def test_ray_internals_of_the_local_start_and_the_cluster_check():
    from ray._private import ray_constants
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)  # patched off so every listener stays on loopback
    assert isinstance(ray_constants.RAY_WORKER_NICENESS, str)  # the environment variable's name
    assert hasattr(gcs_service_pb2, "GetClusterIdRequest")
    assert hasattr(gcs_service_pb2_grpc, "NodeInfoGcsServiceStub")


def test_datasets_internals_of_the_in_place_version_declaration():
    import pyarrow as pa
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    dataset = Dataset(InMemoryTable(pa.table({"x": [1, 2]})), fingerprint=generate_random_fingerprint())
    assert dataset["x"] == [1, 2]
    # A dataset saved to disk is declared by state.json's "_data_files" (the refresh writes it for its parts).
    assert "_data_files" in inspect.getsource(Dataset.load_from_disk)


@pytest.mark.parametrize("module", ["pytorch_lightning", "ray", "datasets"])
def test_the_versions_these_names_were_checked_against(module):
    """Pinned in requirements.txt: a new version is a deliberate change that runs this file first."""
    import importlib.metadata

    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    assert importlib.metadata.version(module.replace("_", "-")) == pins[module.replace("_", "-")]
