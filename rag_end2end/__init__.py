"""End-to-end RAG fine-tuning: the question encoder, the context encoder and the generator learn together while
Ray actors re-encode the knowledge base in the background. The Python API (rag_end2end.api):

    import rag_end2end as rag
    kb = rag.build_kb(passages, "work/kb", context_encoder=...)
    run = rag.train("work/run", kb=kb, train=pairs, val=held_out, recipe="rag_end2end", ...)
    rag.evaluate(run.checkpoint, questions, answers); rag.answer(run.checkpoint, questions)
    rag.export(run.checkpoint, "work/export")
"""

__all__ = ["KB", "TrainResult", "adapt", "answer", "build_kb", "evaluate", "export", "load", "train"]


def __getattr__(name: str):
    """The API's names, imported on first use: a Ray actor that imports one of the package's modules (it imports
    this file first) does not pay for Lightning and the training code."""
    if name in __all__:
        from rag_end2end import api

        return getattr(api, name)
    raise AttributeError(f"module 'rag_end2end' has no attribute {name!r}")
