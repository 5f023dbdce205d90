"""The reference's module name, kept for its users' imports; the code is in `rag_end2end.training.callbacks`."""

from rag_end2end.training.callbacks import (
    KBRefreshCallback,
    LastCheckpoint,
    RagCheckpoint,
    RunFilesCallback,
    checkpoint_step,
    export_dir,
    get_checkpoint_callback,
    get_early_stopping_callback,
    get_last_checkpoint_callback,
    kb_pin_path,
    pinned_kb_versions,
)

__all__ = [
    "KBRefreshCallback",
    "pinned_kb_versions",
    "RagCheckpoint",
    "LastCheckpoint",
    "kb_pin_path",
    "checkpoint_step",
    "export_dir",
    "get_checkpoint_callback",
    "get_last_checkpoint_callback",
    "get_early_stopping_callback",
    "RunFilesCallback",
]
