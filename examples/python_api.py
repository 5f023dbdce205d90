"""The Python API end to end, on tiny random models so that it runs anywhere in a minute (CI runs it):
a KB from in-memory passages, RAG-end2end training from in-memory question/answer pairs with a refresh every
5 steps, then evaluation, answers and an export. Put hub names or your own model directories where the tiny
models are (e.g. model_name_or_path="facebook/rag-token-base", context_encoder="facebook/dpr-ctx_encoder-
multiset-base"), and your documents and questions where the dummy data is.

    python examples/python_api.py [WORKDIR]
"""

import sys
import tempfile
from pathlib import Path

import rag_end2end as rag
from rag_end2end.tiny_models import TEST_RUN, build_tiny_models


def dummy_pairs(split: str) -> list[tuple[str, str]]:
    source, target = (TEST_RUN / "dummy-train-data" / f"{split}.{side}" for side in ("source", "target"))
    return list(zip(source.read_text().splitlines(), target.read_text().splitlines()))


def main(work: Path) -> dict:
    models = build_tiny_models(work / "models")  # random weights: the figures below mean nothing but that it ran
    documents = [
        tuple(line.split("\t", 1))
        for line in (TEST_RUN / "dummy-kb" / "my_knowledge_dataset.csv").read_text().splitlines()
    ]

    kb = rag.build_kb(
        documents, work / "kb", context_encoder=str(models["context_encoder"]), index_type="flat", device="cpu"
    )
    run = rag.train(
        work / "run",
        kb=kb,
        train=dummy_pairs("train"),
        val=dummy_pairs("val"),
        test=dummy_pairs("test"),
        recipe="rag_end2end",
        model_name_or_path=str(models["rag_token"]),
        model_type="rag_token",
        context_encoder_name=str(models["context_encoder"]),
        indexing_freq=5,
        max_steps=10,
        val_check_interval=5,
        log_every_n_steps=1,
        train_batch_size=2,
        eval_batch_size=4,
        learning_rate=1e-3,
        accelerator="cpu",
        devices=1,
    )
    print(f"trained: {len(run.losses)} logged losses, first {run.losses[0][1]:.3f}, last {run.losses[-1][1]:.3f}")
    print(f"kept {run.checkpoint}; test EM {run.metrics.get('test_em')}")

    questions, answers = zip(*dummy_pairs("test"))
    scores = rag.evaluate(run.checkpoint, questions, answers, output_dir=work / "eval")
    print(f"evaluated: EM {scores['em']:.2f}, F1 {scores['f1']:.2f}")
    first = rag.answer(run.checkpoint, questions[:1])[0]
    print(f"answered {questions[0]!r}: {first['answer']!r} from {[p['title'] for p in first['passages']]}")
    exported = rag.export(run.checkpoint, work / "export")
    print(f"exported to {exported}")
    return {"run": run, "scores": scores, "answer": first, "export": exported}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="rag-api-")))
