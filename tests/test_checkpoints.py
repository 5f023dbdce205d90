"""RagCheckpoint: the transformers-format exports follow the `.ckpt` files that Lightning keeps."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from rag_end2end.deploy.export import export
from rag_end2end.model.rag import RagModel
from rag_end2end.training.callbacks import checkpoint_step, get_checkpoint_callback, get_last_checkpoint_callback


class Improving(pl.LightningModule):
    """A one-weight model whose val_em gets better at every validation, and that exports like
    GenerativeQAModule.save_hf_checkpoint (a directory holding kb_version.json)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return (self.weight - batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.validations += 1
        self.log("val_em", float(self.validations))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(8, 1), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2, 1), batch_size=2)

    def save_hf_checkpoint(self, directory: Path) -> None:
        directory.mkdir()
        (directory / "kb_version.json").write_text(json.dumps({"version": self.global_step}))


def quiet_trainer(**flags) -> pl.Trainer:
    """Lightning's Trainer on the CPU, without logger, progress bar or sanity check."""
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0, **flags)


def test_exports_are_removed_with_the_checkpoints_lightning_drops(tmp_path):
    (tmp_path / "checkpoint999").mkdir()  # not an export of this run (no kb_version.json): never touched
    checkpoint = get_checkpoint_callback(str(tmp_path), "em")
    trainer = quiet_trainer(max_epochs=3, callbacks=[checkpoint])
    trainer.fit(Improving())
    ckpts = sorted(tmp_path.glob("*.ckpt"))
    assert [checkpoint_step(str(c)) for c in ckpts] == [12]  # three new bests; save_top_k=1 keeps the last
    exports = sorted(p.name for p in tmp_path.glob("checkpoint*"))
    assert exports == ["checkpoint12", "checkpoint999"]


class Tied(Improving):
    """val_em 0.0 at every validation, as on a tiny run."""

    def on_validation_epoch_end(self):
        self.log("val_em", 0.0)


def test_a_tie_in_the_monitored_metric_goes_to_the_later_step(tmp_path):
    checkpoint = get_checkpoint_callback(str(tmp_path), "em")
    trainer = quiet_trainer(max_epochs=3, callbacks=[checkpoint])
    trainer.fit(Tied())
    # Lightning's own rule keeps the first of equals (step 4) as "best" for good; here the latest is.
    assert checkpoint_step(checkpoint.best_model_path) == 12
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint12"]


def test_a_run_that_ends_before_any_validation_leaves_its_final_weights(tmp_path):
    """No validation ran (max_steps below the validation interval): no best checkpoint, yet the final weights are
    exported, and last.ckpt, given where a model is read, is refused in one line naming that directory."""
    callbacks = [get_checkpoint_callback(str(tmp_path), "em"), get_last_checkpoint_callback(str(tmp_path), 100)]
    trainer = quiet_trainer(max_steps=3, val_check_interval=4, callbacks=callbacks)
    trainer.fit(Improving())
    assert not list(tmp_path.glob("0*.ckpt")) and (tmp_path / "last.ckpt").is_file()
    assert json.loads((tmp_path / "checkpoint3" / "kb_version.json").read_text()) == {"version": 3}
    for read in (RagModel.from_pretrained, lambda path: export(path, tmp_path / "export")):
        with pytest.raises(
            FileNotFoundError, match=r"last\.ckpt: a Lightning training state .*/checkpoint3 \(the latest\)"
        ):
            read(tmp_path / "last.ckpt")
    assert not (tmp_path / "export").exists()
