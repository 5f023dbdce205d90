"""How a knowledge base's embeddings are scored (`dot`; `cosine`: unit-length vectors; `l2`: negative squared
distance, an L2 FAISS index), declared inside its passages directory when it is written, and checked against the
encoder that will score against it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from datasets import load_from_disk

KB_INFO_FILE = "rag_kb.json"  # inside a passages directory: how its embeddings are to be scored
UNIT_NORM_TOLERANCE = 1e-3


def write_kb_info(passages_path: str | os.PathLike, similarity: str) -> None:
    """Declare how a KB's embeddings are scored (`dot`, `cosine` or `l2`), inside its passages directory."""
    (Path(passages_path) / KB_INFO_FILE).write_text(json.dumps({"similarity": similarity}, indent=1))


def kb_similarity(passages_path: str | os.PathLike) -> tuple[str, str]:
    """(similarity, how it is known) of a KB: what it declares, else inferred from its embeddings' norms
    (all unit length: cosine) for KBs written before the declaration existed or by other tools (never l2: an l2 KB
    was always written with its declaration)."""
    info = Path(passages_path) / KB_INFO_FILE
    if info.is_file():
        return json.loads(info.read_text())["similarity"], f"declared in {info}"
    passages = load_from_disk(str(passages_path))
    if "embeddings" not in passages.column_names:
        raise ValueError(f"{passages_path}: the passages dataset has no `embeddings` column")
    sample = np.asarray(passages.select(range(min(256, len(passages))))["embeddings"], dtype=np.float32)
    unit = np.abs(np.linalg.norm(sample, axis=1) - 1).max() < UNIT_NORM_TOLERANCE
    return ("cosine" if unit else "dot"), "inferred from its embedding norms"


def check_kb_similarity(passages_path: str | os.PathLike, side: str, similarity: str) -> str:
    """Stop when a KB's embeddings were made for another similarity than `side` (e.g. "the question encoder
    pretrained/minilm") scores with; returns the KB's similarity."""
    kb_sim, how = kb_similarity(passages_path)
    if kb_sim != similarity:
        raise ValueError(
            f"the knowledge base {passages_path} holds {kb_sim} embeddings ({how}), but {side} scores with "
            f"{similarity} similarity: rebuild the KB with use_own_knowledge_dataset.py --similarity {similarity}, "
            f"or pass --similarity {kb_sim}"
        )
    return kb_sim
