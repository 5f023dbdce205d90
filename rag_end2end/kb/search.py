"""One KB version searched in this process, without Ray: what eval_rag.py, rag_answer.py, the LangChain
retriever and RagModel.from_pretrained use (training retrieves through the Ray actors instead).

    search = KBSearch(*checkpoint_kb("OUT/checkpoint1200"), dim)  # the KB version its weights were trained against
    stored, ids, docs = search.retrieve(question_vectors, 5)      # (B, 5, d), (B, 5), [{"title": [...], ...}]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from transformers.models.rag.retrieval_rag import CustomHFIndex

from rag_end2end.kb.faiss_devices import to_gpu

KB_VERSION_FILE = "kb_version.json"  # beside every checkpoint<step> and in every export


def checkpoint_kb(checkpoint: str | Path) -> tuple[str, str] | None:
    """The (passages, index) paths a checkpoint or export names in its kb_version.json (relative paths are
    relative to it), or None when it names none."""
    saved = Path(checkpoint) / KB_VERSION_FILE
    if not saved.is_file():
        return None
    kb = json.loads(saved.read_text())  # absolute paths stay as they are
    return tuple(os.path.normpath(Path(checkpoint) / kb[key]) for key in ("passages_path", "index_path"))


class KBSearch:
    """Top-k search of one KB version (transformers' CustomHFIndex over our passages and FAISS index): what
    rag_model.RagModel asks of a retriever. finetune_rag.GenerativeQAModule takes it too (a module without
    refreshes, e.g. in unit tests). `faiss_gpu` (faiss_devices): the index is searched on this process's GPUs when
    it has some and faiss has GPU support (auto), else on CPU as it was read."""

    def __init__(self, passages: str, index: str, dim: int, faiss_gpu: str = "auto"):
        for path in (passages, index):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} not found: the knowledge base is gone (moved or pruned?)")
        self.index = CustomHFIndex.load_from_disk(dim, passages, index)
        self.index.init_index()  # reads the FAISS file
        stored = self.index.dataset.get_index("embeddings")  # datasets' FaissIndex, which search_batch asks
        stored.faiss_index = to_gpu(stored.faiss_index, faiss_gpu)
        self.live_kb = None

    def init_retrieval(self, kb) -> int:
        """Serve `kb` (a kb_encode_utils.KBVersion of these same passages and index)."""
        self.live_kb = kb
        return kb.version

    def __len__(self) -> int:
        return len(self.index.dataset)

    def retrieve(self, query_vectors, n_docs: int, embeddings: bool = True):
        ids, stored = self.index.get_top_docs(query_vectors, n_docs)  # FAISS reconstructs them: cheap
        # FAISS gives id -1 (and a zero vector) for a neighbour it did not find (an HNSW miss, or a KB smaller
        # than n_docs), which would read as the last passage: repeat the best hit, as the Ray actors do.
        missed = ids < 0
        if missed[:, 0].any():
            raise ValueError(f"the index found no passage for question {int(np.flatnonzero(missed[:, 0])[0])}")
        if missed.any():
            ids = np.where(missed, ids[:, :1], ids)
            stored = np.where(missed[..., None], np.asarray(stored)[:, :1], stored)
        return stored, ids, self.index.get_doc_dicts(ids)
