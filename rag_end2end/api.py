"""The toolkit from Python: a knowledge base from in-memory passages, training with any recipe from in-memory
question/answer pairs, evaluation, answers and exports, in a few calls.

    import rag_end2end as rag

    kb = rag.build_kb([("Aaron", "Aaron held the rod ..."), ...], "work/kb", context_encoder="models/ctx")
    run = rag.train("work/run", kb=kb, train=pairs[:80], val=pairs[80:90], test=pairs[90:],
                    recipe="rag_end2end", model_name_or_path="models/rag_token", model_type="rag_token",
                    context_encoder_name="models/ctx", indexing_freq=5, max_steps=20)
    run.losses          # [(step, training loss), ...]
    run.metrics         # the last validation's metrics and, with `test`, the test's
    rag.evaluate(run.checkpoint, questions, answers)      # {"em": ..., "f1": ...}
    rag.load(run.checkpoint).answer(["who held the rod?"])
    rag.export(run.checkpoint, "work/export")

Each call runs what the command line runs (finetune_rag.py, use_own_knowledge_dataset.py, eval_rag.py,
export_model.py) with the same checks: `train`'s keyword arguments are finetune_rag.py's flags without the
dashes (`docs/flags.md`), so a setting means the same thing in both. In-memory data is written into the run's
own folders first (`OUT/data/`, `KB/kb.csv`), where a user can read what was trained on.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag_end2end.data import generate_qa, reconstruction
from rag_end2end.deploy.export import export
from rag_end2end.evaluation import evaluate as evaluation
from rag_end2end.evaluation.results_table import read_test_results
from rag_end2end.files import atomic_write_text
from rag_end2end.kb import build
from rag_end2end.model.rag import RagModel
from rag_end2end.model.settings import checkpoint_dir
from rag_end2end.options import build_parser
from rag_end2end.training import finetune
from rag_end2end.training.arguments import parse_args
from rag_end2end.training.callbacks import checkpoint_step, export_dir

SET_BY_THE_CALL = ("output_dir", "passages_path", "index_path", "do_train", "do_predict", "csv_path")
__all__ = ["KB", "TrainResult", "adapt", "answer", "build_kb", "evaluate", "export", "load", "train"]
PASSAGES, INDEX = "my_knowledge_dataset", "my_knowledge_dataset_hnsw_index.faiss"  # the reference's file names


@dataclass(frozen=True)
class KB:
    """A knowledge base on disk: the passages (a `datasets` directory with embeddings) and its FAISS index."""

    passages_path: Path
    index_path: Path

    @classmethod
    def at(cls, directory: str | Path) -> KB:
        """The KB that use_own_knowledge_dataset.py (or `build_kb`) wrote into `directory`."""
        kb = cls(Path(directory) / PASSAGES, Path(directory) / INDEX)
        if not (kb.passages_path.is_dir() and kb.index_path.is_file()):
            raise FileNotFoundError(f"{directory}: no {PASSAGES}/ and {INDEX} (build one with build_kb)")
        return kb


@dataclass
class TrainResult:
    """What a training run left: its directory, the checkpoint it kept (`checkpoint<step>/`, the best by its
    monitored metric), the training loss at each logged step, and its last validation and test metrics."""

    output_dir: Path
    checkpoint: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict[str, float | str] = field(default_factory=dict)


def build_kb(
    passages: Iterable[tuple[str, str]] | str | Path, output_dir: str | Path, context_encoder: str, **flags
) -> KB:
    """Encode documents into a new KB in `output_dir`: `passages` are (title, text) pairs, or the path of a KB
    file in the toolkit's format (title<TAB>text). Documents are split into 100-word passages. `flags` are
    use_own_knowledge_dataset.py's (`index_type="flat"`, `batch_size=32`, `device="cpu"`, ...)."""
    out = Path(output_dir)
    if isinstance(passages, (str, Path)):
        csv_path = Path(passages)
    else:
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "kb.csv"
        if csv_path.exists():
            raise FileExistsError(f"{csv_path} already exists; choose another output_dir")
        rows = [(str(title), str(text)) for title, text in passages]
        with csv_path.open(
            "w", encoding="utf-8", newline=""
        ) as f:  # quoted where a field needs it, as the reader expects
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)
    argv = ["--csv_path", str(csv_path), "--output_dir", str(out), "--dpr_ctx_encoder_model_name", context_encoder]
    try:
        build.main(_parse(build.parse_args, argv + _flags(build.parse_args([]), flags, "build_kb"), "build_kb"))
    except BaseException:
        if csv_path == out / "kb.csv":  # written from memory by this call: a retry writes it again
            csv_path.unlink(missing_ok=True)
        raise
    return KB.at(out)


def train(
    output_dir: str | Path,
    *,
    kb: KB | str | Path,
    train: Sequence[tuple[str, str]] | None,
    val: Sequence[tuple[str, str]],
    test: Sequence[tuple[str, str]] | None = None,
    recipe: str = "rag_end2end",
    **flags,
) -> TrainResult:
    """Train a RAG system with `recipe` (`--training_mode`) on (question, answer) pairs and return what it left.
    `flags` are finetune_rag.py's: the model (`model_name_or_path` + `model_type`, or `question_encoder_name_or_path`
    + `generator_name_or_path`), `context_encoder_name`, `indexing_freq`, `max_steps`, `learning_rate`, ... With
    `test`, the kept checkpoint is also tested and `metrics` holds the test's figures (`test_em`, ...). From the
    documents alone: `train=None, reconstruction_dir=..., reconstruction_ratio=1` (data_prep/make_reconstruction_data.py
    writes the statements; `val` stays the questions held out)."""
    return _train_on(output_dir, kb, train, val, test, {"training_mode": recipe, **flags})


def _train_on(output_dir, kb, train, val, test, flags: dict) -> TrainResult:
    out = Path(output_dir)
    kb = kb if isinstance(kb, KB) else KB.at(kb)
    data = Path(flags.pop("data_dir", out / "data"))
    if val is None and data == out / "data":
        raise ValueError("val: no (question, answer) pairs held out")
    argv = [
        "--output_dir",
        str(out),
        "--data_dir",
        str(data),
        "--passages_path",
        str(kb.passages_path),
        "--index_path",
        str(kb.index_path),
        "--do_train",
        *(["--do_predict"] if test is not None else []),
    ]
    parser = build_parser()
    argv += _flags(parser.parse_args(["--model_type", "rag_token"]), flags, "train", parser)
    if train is None and flags.get("reconstruction_ratio") != 1:
        raise ValueError(
            "train=None trains on the documents alone: pass reconstruction_dir=... and reconstruction_ratio=1"
        )
    splits = {"train": train, "val": val, "test": test}  # val None: --data_dir already holds val.*
    splits = {split: pairs for split, pairs in splits.items() if pairs is not None}
    lines = {
        split: [(_one_line(q, f"{split} question"), _one_line(a, f"{split} answer")) for q, a in pairs]
        for split, pairs in splits.items()
    }
    if empty := [split for split, pairs in lines.items() if not pairs]:
        raise ValueError(f"{', '.join(empty)}: no (question, answer) pairs")
    if data != out / "data":  # the user's folder (or adapt's statements): never overwrite its files
        if clash := [
            f"{split}.{side}"
            for split in splits
            for side in ("source", "target")
            if (data / f"{split}.{side}").exists()
        ]:
            raise FileExistsError(
                f"{data} already holds {', '.join(clash)}: pass those pairs through its files, not both"
            )
    args = _parse(parse_args, argv, "train")  # every flag checked before anything is written
    for split, pairs in lines.items():
        _write_pairs(data, split, pairs)
    module = finetune.main(args)
    return TrainResult(out, _kept_checkpoint(module), _losses(out), _metrics(out))


def evaluate(
    checkpoint: str | Path,
    questions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    output_dir: str | Path | None = None,
    **flags,
) -> dict[str, float]:
    """EM and F1 (best over each question's answers; `flags`: eval_rag.py's, e.g. `metrics="em,f1,rouge_l"`) of a
    checkpoint on in-memory questions, generated afresh at every call. The questions, gold answers, predictions and
    metrics are written to `output_dir` (a new directory) when given, else to a temporary one removed afterwards."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if output_dir is not None and Path(output_dir).exists():
        raise FileExistsError(f"output_dir {output_dir} exists: nothing is overwritten; name a new directory")
    with tempfile.TemporaryDirectory(prefix="rag-evaluate-") as scratch:
        work = Path(scratch) if output_dir is None else Path(output_dir)
        work.mkdir(parents=True, exist_ok=True)
        return _evaluate_in(work, checkpoint, questions, answers, flags)


def _evaluate_in(work: Path, checkpoint: str | Path, questions, answers, flags: dict) -> dict[str, float]:
    gold = [{"question": q, "answers": [a] if isinstance(a, str) else list(a)} for q, a in zip(questions, answers)]
    atomic_write_text(work / "questions.txt", "".join(_one_line(q, "question") + "\n" for q in questions))
    atomic_write_text(work / "gold.jsonl", "".join(json.dumps(g) + "\n" for g in gold))
    argv = [
        "--model_name_or_path",
        str(checkpoint),
        "--evaluation_set",
        str(work / "questions.txt"),
        "--gold_data_path",
        str(work / "gold.jsonl"),
        "--gold_data_mode",
        "jsonl",
        "--predictions_path",
        str(work / "predictions.txt"),
        "--recalculate",  # these questions, not the predictions of an earlier call
    ]
    argv += _flags(evaluation.parse_args(argv), flags, "evaluate")
    return next(iter(evaluation.main(evaluation.parse_args(argv)).values()))


def load(checkpoint: str | Path) -> RagModel:
    """The model a checkpoint or an export holds, with the KB version its weights match, ready to answer."""
    return RagModel.from_pretrained(str(checkpoint)).eval()


def answer(checkpoint: str | Path, questions: Sequence[str], **decoding) -> list[dict]:
    """Each question's answer and the passages it drew on (`RagModel.answer`)."""
    return load(checkpoint).answer(list(questions), **decoding)


def _flags(
    parsed: argparse.Namespace, flags: dict, caller: str, parser: argparse.ArgumentParser | None = None
) -> list[str]:
    """Keyword arguments as command-line flags of the parser that produced `parsed`. A bool is a switch (True: the
    flag alone) unless `parser` declares the flag as taking a value (then "true"/"false"); the flags the call sets
    itself, and False for a switch that is on, are refused rather than dropped."""
    takes_value = set()
    if parser is not None:  # argparse lists its actions only privately; stable since Python 3.2
        takes_value = {a.dest for a in parser._actions if a.nargs != 0}
    argv = []
    for name, value in flags.items():
        if not hasattr(parsed, name):
            raise TypeError(f"{caller}() got {name}=: not a flag of the command line it runs (docs/flags.md)")
        if name in SET_BY_THE_CALL:
            raise TypeError(f"{caller}() got {name}=: the call sets it itself")
        if isinstance(value, bool) and name not in takes_value:
            if not value and getattr(parsed, name):
                raise ValueError(f"{caller}() got {name}=False: the switch is on by default and cannot be turned off")
            argv += [f"--{name}"] if value else []
        elif isinstance(value, bool):
            argv += [f"--{name}", "true" if value else "false"]
        elif value is not None:
            argv += [f"--{name}", ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv


def _parse(parse_args, argv: list[str], caller: str) -> argparse.Namespace:
    """A script's parse_args, with argparse's exit (usage and one line on stderr) turned into a ValueError."""
    try:
        return parse_args(argv)
    except SystemExit as stop:
        raise ValueError(f"{caller}(): a flag was refused (the line above says which)") from stop


def _one_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text or not text.strip():
        raise ValueError(f"a {what} must be one non-empty line: {text!r}")
    return text


def _write_pairs(data: Path, split: str, pairs: Sequence[tuple[str, str]]) -> None:
    """OUT/data/{split}.source and .target, one pair a line, written under a temporary name and renamed."""
    data.mkdir(parents=True, exist_ok=True)
    for side, index in (("source", 0), ("target", 1)):
        atomic_write_text(data / f"{split}.{side}", "".join(p[index] + "\n" for p in pairs))


def _kept_checkpoint(module) -> Path | None:
    """The best checkpoint's export; without one (no validation ran), the final weights' (LastCheckpoint)."""
    best = module.trainer.checkpoint_callback.best_model_path if module.trainer.checkpoint_callback else ""
    step = checkpoint_step(best) if best else None
    if step is not None:
        return export_dir(best, step)
    final = checkpoint_dir(module.hparams.output_dir, module.trainer.global_step)
    return final if final.is_dir() else None


def _losses(out: Path) -> list[tuple[int, float]]:
    """The training loss of each logged step, from the CSV log (every segment of a resumed run)."""
    losses = {}
    for path in sorted(out.glob("logs/version_*/metrics.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("loss"):
                    losses[int(row["step"])] = float(row["loss"])
    return sorted(losses.items())


def _metrics(out: Path) -> dict[str, float | str]:
    metrics = {}
    history = out / "metrics.json"
    if history.exists():
        metrics |= {k: v for k, v in json.loads(history.read_text())[-1].items() if k != "step"}
    if (out / "test_results.txt").exists():  # with its run_info.json: train minutes, refreshes, what trained
        metrics |= read_test_results(out)
    return metrics


def adapt(
    csv_path: str | Path,
    output_dir: str | Path,
    *,
    context_encoder: str,
    questions: Sequence[tuple[str, str]] | None = None,
    val: Sequence[tuple[str, str]] | None = None,
    test: Sequence[tuple[str, str]] | None = None,
    reconstruction_ratio: float | None = None,
    generate_questions: dict | None = None,
    kb_flags: dict | None = None,
    statement_flags: dict | None = None,
    **flags,
) -> TrainResult:
    """From a domain's documents to an adapted model, in one call: the KB (`OUT/kb`), statements from its sentences
    (`OUT/statements`, make_reconstruction_data.py), training on them (`OUT/run`: alone, or mixed with `questions`
    at `reconstruction_ratio`, 0.5 by default), then the test. `generate_questions` (generate_qa.py's flags, at least
    `generator_name_or_path`) generates the questions instead (`OUT/generated`), from the documents' passages, and
    validates on its held-out ones where no `val` is given. Otherwise validation uses `val` (questions held out)
    or, with none, the held-out statements. `flags` are finetune_rag.py's (the models, `indexing_freq`,
    `max_steps`...). Each step an earlier call finished is reused."""
    out = Path(output_dir)
    if generate_questions is not None and questions is not None:
        raise ValueError("questions and generate_questions: give one source of training questions")
    has_questions = questions is not None or generate_questions is not None
    ratio = reconstruction_ratio if reconstruction_ratio is not None else (0.5 if has_questions else 1.0)
    if not has_questions and ratio != 1:
        raise ValueError(f"reconstruction_ratio={ratio}: without questions every batch is a statement (ratio 1)")
    if questions is not None and val is None:
        raise ValueError("questions without val: hold some out as val, to validate on the task itself")
    statements, generated = out / "statements", out / "generated"
    argv = ["--csv_path", str(csv_path), "--output_dir", str(statements)]
    argv += _flags(reconstruction.parse_args(argv), statement_flags or {}, "adapt")
    parser = build_parser()  # every flag checked before the (long) encoding
    _flags(parser.parse_args(["--model_type", "rag_token"]), flags, "adapt", parser)
    if generate_questions is not None:
        generation_argv = ["--csv_path", str(csv_path), "--output_dir", str(generated)]
        defaults = _parse(generate_qa.parse_args, [*generation_argv, "--generator_name_or_path", "-"], "adapt")
        generation_argv += _flags(defaults, generate_questions, "adapt")
        _parse(generate_qa.parse_args, generation_argv, "adapt")
    steps = 4 if generate_questions is not None else 3
    print(f"adapt: 1/{steps} knowledge base from {csv_path}", flush=True)
    if (out / "kb" / PASSAGES).is_dir() and (out / "kb" / INDEX).is_file():
        kb = KB.at(out / "kb")  # an earlier call's (one that stopped later): encoded once
    else:
        kb = build_kb(csv_path, out / "kb", context_encoder, **(kb_flags or {}))
    print(f"adapt: 2/{steps} statements from the documents' sentences", flush=True)
    if not (statements / "stats.json").is_file():  # written last: an earlier call's statements are complete
        reconstruction.main(_parse(reconstruction.parse_args, argv, "adapt"))
    if generate_questions is not None:
        print(f"adapt: 3/{steps} questions generated from the documents' passages", flush=True)
        if not (generated / "stats.json").is_file():  # written last, like the statements'
            generate_qa.main(_parse(generate_qa.parse_args, generation_argv, "adapt"))
        questions, val = _read_pairs(generated, "train"), val if val is not None else _read_pairs(generated, "val")
        if not questions or not val:
            counts = generated / "stats.json"
            raise ValueError(f"{generated}: too few questions kept to train and validate on ({counts} says why)")
    print(f"adapt: {steps}/{steps} training ({flags.get('training_mode', 'rag_end2end')}, statement share {ratio})")
    run_flags = {
        "reconstruction_dir": str(statements),
        "reconstruction_ratio": ratio,
        "context_encoder_name": context_encoder,
    }
    if val is None:  # no questions held out: validate (and keep the checkpoint) on the held-out statements
        run_flags["data_dir"] = str(statements)
    return _train_on(out / "run", kb, questions, val, test, {**run_flags, **flags})


def _read_pairs(directory: str | Path, split: str) -> list[tuple[str, str]] | None:
    """(question, answer) pairs of {split}.source/.target in `directory` (line-aligned); None where there are none."""
    source, target = (Path(directory) / f"{split}.{side}" for side in ("source", "target"))
    if not source.is_file():
        return None
    return list(zip(source.read_text(encoding="utf-8").splitlines(), target.read_text(encoding="utf-8").splitlines()))


def adapt_cli(argv: list[str] | None = None) -> TrainResult:
    """tools/adapt_from_documents.py: `adapt` from the command line; every other flag goes to finetune_rag.py."""
    parser = argparse.ArgumentParser(description=adapt.__doc__)
    parser.add_argument("--csv_path", required=True, help="the documents: title<TAB>text, one a line")
    parser.add_argument("--output_dir", required=True, help="OUT/kb, OUT/statements, OUT/run are written here")
    parser.add_argument("--context_encoder", required=True, help="the encoder of the KB (and the context encoder)")
    parser.add_argument("--qa_dir", default=None, help="questions, if any: {train,val,test}.{source,target}")
    parser.add_argument("--reconstruction_ratio", type=float, default=None, help="1 without questions, else 0.5")
    parser.add_argument(
        "--generate_questions_with", default=None, help="a local instruct model: questions generated from the passages"
    )
    parser.add_argument("--generate_max_passages", type=int, default=None, help="generate for N passages (default all)")
    ours, rest = parser.parse_known_args(argv)
    finetune_parser = build_parser()
    given = finetune_parser.parse_args(["--model_type", "rag_token", *rest])
    defaults = finetune_parser.parse_args(["--model_type", "rag_token"])
    flags = {k: v for k, v in vars(given).items() if v != getattr(defaults, k) or k == "model_type"}
    flags["model_type"] = given.model_type

    def pairs(split: str) -> list[tuple[str, str]] | None:
        return None if ours.qa_dir is None else _read_pairs(ours.qa_dir, split)

    generation = {"generator_name_or_path": ours.generate_questions_with, "max_passages": ours.generate_max_passages}
    run = adapt(
        ours.csv_path,
        ours.output_dir,
        context_encoder=ours.context_encoder,
        questions=pairs("train"),
        val=pairs("val"),
        test=pairs("test"),
        reconstruction_ratio=ours.reconstruction_ratio,
        generate_questions=generation if ours.generate_questions_with else None,
        **flags,
    )
    print(f"adapt: done; checkpoint {run.checkpoint}; metrics {json.dumps(run.metrics)}")
    return run
