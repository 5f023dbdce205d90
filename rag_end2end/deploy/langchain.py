"""A LangChain retriever over a trained checkpoint or an export (optional: needs `langchain-core`).

    from rag_end2end.deploy.langchain import CheckpointRetriever
    retriever = CheckpointRetriever.from_path("OUT/checkpoint120", k=4)
    docs = retriever.invoke("What is the incubation period?")   # Documents: page_content = the passage text,
    docs[0].metadata                                             # {"id": KB row, "title": ..., "score": ...}

It encodes the query with the trained question encoder (its prefix, pooling, similarity and tau) and searches
the KB version the checkpoint names, in this process (no Ray); the score is similarity / tau against the
KB's stored passage vector (what FAISS ranks by; recipes that re-encode passages score them afresh in
training). No generator is loaded. Nothing is unpickled: the KB loads as Arrow and a FAISS index.
"""

from __future__ import annotations

from typing import Any

import torch
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from rag_end2end.model.rag import RagModel


class CheckpointRetriever(BaseRetriever):
    """The trained retriever of a checkpoint (or export) as a LangChain `BaseRetriever`."""

    model: Any  # a rag_model.RagModel with a retriever attached
    k: int = 4

    @classmethod
    def from_path(cls, path: str, k: int = 4, kb: tuple[str, str] | None = None) -> CheckpointRetriever:
        """The question encoder of `path` over its KB version (or `kb`: passages, index); no generator."""
        model = RagModel.from_pretrained(path, load_generator=False, load_context_encoder=False, kb=kb).eval()
        return cls(model=model, k=k)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        with torch.no_grad():  # RagModel's own retrieval, over the stored vectors
            r = self.model.retrieve(**self.model.tokenize_questions([query]), n_docs=self.k)
        return [
            Document(page_content=text, id=str(int(i)), metadata={"id": int(i), "title": title, "score": float(s)})
            for i, title, text, s in zip(r.ids[0], r.docs[0]["title"], r.docs[0]["text"], r.doc_scores[0].tolist())
        ]
