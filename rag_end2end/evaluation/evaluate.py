r"""Evaluate a RAG model: generated answers (EM/F1, --eval_mode e2e) or retrieval (recall@k, MRR@k,
answer recall@k, title precision@k, --eval_mode retrieval).

    python eval_rag.py --model_name_or_path OUT/checkpoint1200 --evaluation_set DATA/test.source \
        --gold_data_path DATA/test.target --predictions_path preds.txt
    python eval_rag.py --model_name_or_path OUT --eval_all_checkpoints --eval_mode retrieval \
        --evaluation_set DATA/test.source --gold_data_path DATA/test.gold.jsonl
    python eval_rag.py --eval_mode retrieval --question_encoder_name_or_path pretrained/minilm \
        --passages_path KB/my_knowledge_dataset --index_path KB/my_knowledge_dataset_hnsw_index.faiss \
        --evaluation_set DATA/test.source --gold_data_path DATA/test.gold.jsonl --metrics_path zero-shot.json

    python eval_rag.py --question_encoder_name_or_path pretrained/minilm --question_encoder_adapter Q_ADAPTER \
        --generator_name_or_path pretrained/smollm2-135m-instruct --generator_adapter G_ADAPTER \
        --passages_path KB/my_knowledge_dataset --index_path KB/my_knowledge_dataset_hnsw_index.faiss \
        --evaluation_set DATA/test.source --gold_data_path DATA/test.target --metrics em,f1,bleu,rouge_l

The third form judges a retriever before anyone trains it: any question encoder, scored as its checkpoint
declares (pooling, similarity) unless --question_pooling/--similarity say otherwise, against a KB built for
that similarity (a mismatch is refused). The last scores a RAG model made of parts (DALM's eval-rag): that
question encoder, the KB its context encoder built, and a generator, each peft adapter folded into its part.

Each checkpoint is evaluated with the knowledge-base version that matches its weights (its kb_version.json,
else the passages_path and index_path of its config.json) unless --passages_path/--index_path say otherwise.
Checkpoints are what finetune_rag.py writes (rag_model.RagModel: question_encoder/, generator/,
rag_settings.json), for seq2seq and decoder-only generators alike, or transformers RAG checkpoints.
RAG-token decodes greedily over the marginal; RAG-sequence takes --num_beams candidates per passage (seq2seq
generators) and keeps the most likely over all passages. --max_length counts new tokens. No Ray is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoConfig

from rag_end2end.data.readers import (
    Gold,
    InputError,
    check_gold_ids,
    check_model_path,
    infer_gold_mode,
    one_line,
    read_gold,
    read_lines,
    run_main,
)
from rag_end2end.evaluation.metrics import (
    answer_recall_at_k,
    calculate_exact_match,
    calculate_f1,
    corpus_bleu,
    mrr_at_k,
    precision_at_k_titles,
    recall_at_k,
    rouge_l_score,
)
from rag_end2end.kb.similarity import check_kb_similarity
from rag_end2end.kb.versions import checkpoint_kb
from rag_end2end.model.encoders import encoder_similarity, load_encoder, load_tokenizer
from rag_end2end.model.lora import check_adapter, load_adapter
from rag_end2end.model.rag import GENERATORS, RagGenerator, RagModel, checkpoint_settings
from rag_end2end.model.settings import Generation, checkpoint_dirs_in, refuse_training_state
from rag_end2end.options import SIMILARITIES, add_debug_arg, parse_metrics

logger = logging.getLogger("eval_rag")
FALLBACK = Generation().decoding()  # the decoding of a checkpoint that saved none


def checkpoint_dirs(model_name_or_path: str, eval_all: bool) -> list[str]:
    """The model itself, or with --eval_all_checkpoints every `checkpoint<step>` subdirectory in step order."""
    refuse_training_state(model_name_or_path)
    if not eval_all:
        return [model_name_or_path]
    found = checkpoint_dirs_in(model_name_or_path)
    if not found:
        raise FileNotFoundError(f"no checkpoint<step> directories in {model_name_or_path}")
    return [str(p) for p in found]


def kb_paths(checkpoint: str, args: argparse.Namespace) -> tuple[str, str]:
    """The KB to retrieve from: --passages_path/--index_path, else the version the checkpoint was saved with."""
    saved = checkpoint_kb(checkpoint)  # written by finetune_rag.py beside every checkpoint
    if saved:
        passages, index = saved
    else:
        config = AutoConfig.from_pretrained(checkpoint)  # a transformers RAG checkpoint names its KB
        passages, index = getattr(config, "passages_path", None), getattr(config, "index_path", None)
    passages, index = args.passages_path or passages, args.index_path or index
    if not (passages and index):
        raise ValueError(f"{checkpoint}/config.json names no knowledge base; pass --passages_path and --index_path")
    for flag, path in (("--passages_path", passages), ("--index_path", index)):
        if Path(path).exists():
            continue
        if getattr(args, flag[2:]):  # the user's own path
            raise FileNotFoundError(f"{flag} {path} not found")
        named_by = f"{checkpoint}/kb_version.json" if saved else f"{checkpoint}/config.json"
        raise FileNotFoundError(
            f"{path} not found: the KB version that {named_by} names is gone (a run keeps --keep_kb_versions of them "
            "and the versions its checkpoints name); pass --passages_path and --index_path of a KB to use instead"
        )
    return passages, index


def parts_generator(args: argparse.Namespace) -> RagGenerator:
    """--generator_name_or_path as a generator of --generator_type (default: seq2seq for an encoder-decoder
    config, else causal) with --prompt_template (default: the family's), its --generator_adapter folded in."""
    name = args.generator_name_or_path
    family = args.generator_type or ("seq2seq" if AutoConfig.from_pretrained(name).is_encoder_decoder else "causal")
    generator = GENERATORS[family].from_pretrained(name, args.prompt_template)
    if args.generator_adapter:
        load_adapter(generator, args.generator_adapter)
    return generator


def load_model(checkpoint: str, args: argparse.Namespace) -> RagModel:
    """The model (or with --question_encoder_name_or_path one made of parts: that encoder, a generator where
    --generator_name_or_path names one) over the matching KB, searched in this process, in eval mode (on a GPU
    if any)."""
    if args.question_encoder_name_or_path:
        passages, index = args.passages_path, args.index_path
        name = args.question_encoder_name_or_path
        encoder = load_encoder(name, args.question_pooling, side="question", similarity=args.similarity)
        if args.question_encoder_adapter:
            load_adapter(encoder, args.question_encoder_adapter)
        generator = parts_generator(args) if args.generator_name_or_path and args.eval_mode == "e2e" else None
        model = RagModel(
            encoder,
            load_tokenizer(name),
            generator,
            marginal=(args.model_type or "rag_token").removeprefix("rag_"),
            question_prefix=args.question_prefix or "",
            **({"n_docs": args.n_docs} if args.n_docs else {}),  # else RagModel's default
        )
    else:
        passages, index = kb_paths(checkpoint, args)
        saved = checkpoint_settings(checkpoint)  # each default: the checkpoint's
        settings = saved.replace(
            n_docs=args.n_docs or saved.n_docs,
            marginal=args.model_type.removeprefix("rag_") if args.model_type else saved.marginal,
            question_encoder=saved.question_encoder.rescored(args.similarity, None),  # --similarity: its default tau
        )
        e2e = args.eval_mode == "e2e"  # the context encoder, if the run's doc scores came from it
        model = RagModel.from_pretrained(
            checkpoint,
            load_generator=e2e,
            load_context_encoder=None if e2e else False,
            kb=(passages, index),
            settings=settings,
            generator=parts_generator(args) if e2e and args.generator_name_or_path else None,  # e.g. retriever_only's
        )
    check_kb_similarity(passages, f"the question encoder of {checkpoint}", encoder_similarity(model.question_encoder))
    if model.retriever is None:
        model.attach_kb((passages, index))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.no_grad()
def generate_answers(model: RagModel, questions: list[str], args: argparse.Namespace) -> list[str]:
    """One answer per question: RAG-token greedy over the marginal, RAG-sequence with --num_beams candidates
    per passage (seq2seq generators) rescored over all passages; --max_length counts new tokens. Both default
    to what the checkpoint's run decoded its test answers with."""
    enc = model.tokenize_questions(questions)
    g = model.generation.decoding(args.max_length, args.num_beams)
    answers = model.generate(enc["input_ids"], enc["attention_mask"], questions, g.max_new_tokens, g.num_beams)
    return [one_line(a) for a in answers]


def retrieve(
    model: RagModel, questions: list[str], n: int, batch_size: int = 32
) -> tuple[list[list[int]], list[list[str]], list[list[str]]]:
    """Top-n passage ids, titles and texts per question (RagModel.top_passages, as training's recall@k)."""
    # At most every passage: past the KB's size the retriever repeats the best hit (kb.index.fill_misses).
    ids, docs = model.top_passages(questions, min(n, len(model.retriever)), batch_size)
    return (
        [[int(i) for i in row] for row in ids],
        [[one_line(str(title)) for title in d["title"]] for d in docs],
        [list(d["text"]) for d in docs],
    )


def score_e2e(predictions: list[str], gold: Gold, gold_path: str, metrics: tuple[str, ...] = ("em", "f1")) -> dict:
    """EM, F1 (and ROUGE-L) against the best of each question's gold answers (SQuAD normalisation for EM/F1);
    corpus BLEU against each question's first gold answer."""
    missing = [i + 1 for i, a in enumerate(gold.answers) if not a]
    if missing:
        raise ValueError(f"{gold_path}: no gold answers on line(s) {missing[:10]}; e2e needs one per question")
    scores = {"em": calculate_exact_match(predictions, gold.answers), "f1": calculate_f1(predictions, gold.answers)}
    if "rouge_l" in metrics:
        scores["rouge_l"] = sum(max(rouge_l_score(p, g) for g in gs) for p, gs in zip(predictions, gold.answers))
        scores["rouge_l"] /= max(len(predictions), 1)
    if "bleu" in metrics:
        scores["bleu"] = corpus_bleu(predictions, [gs[0] for gs in gold.answers])
    return scores | {"n": len(predictions)}


def _counted(scores: dict, name: str) -> dict:
    """Rename a metric dict's `n` to `n_<name>`."""
    return {(f"n_{name}" if k == "n" else k): v for k, v in scores.items()}


def score_retrieval(
    ids: list[list[int]], titles: list[list[str]], texts: list[list[str]], gold: Gold, ks: tuple[int, ...], k: int
) -> dict[str, float]:
    """Recall@k and MRR@k by gold passage id, answer recall@k for questions without gold ids, and the
    reference's title precision@k; each with the number of questions it counts."""
    answers = [a if not g else [] for a, g in zip(gold.answers, gold.passage_ids)]
    return {
        **_counted(recall_at_k(ids, gold.passage_ids, ks), "gold_ids"),
        **_counted(mrr_at_k(ids, gold.passage_ids, ks), "gold_ids"),
        **_counted(answer_recall_at_k(texts, answers, ks), "answers_only"),
        **_counted(precision_at_k_titles(titles, gold.titles, k), "titles"),
        "n": len(ids),
    }


def _tagged(path: Path, tag: str) -> Path:
    """`preds.txt` -> `preds.<tag>.txt`."""
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _read_predictions(path: Path, n: int) -> list[str]:
    """Prediction lines (an empty answer is an empty line), checked against the number of questions."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; rerun with --recalculate")
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    if len(lines) != n:
        raise ValueError(f"{path} has {len(lines)} lines for {n} questions; rerun with --recalculate")
    return lines


def _batches(questions: list[str], size: int) -> list[list[str]]:
    return [questions[i : i + size] for i in range(0, len(questions), size)]


def e2e_predictions(checkpoint: str, args: argparse.Namespace, questions: list[str], path: Path) -> list[str]:
    """Generated answers, written one a line to `path`; or those already there, without --recalculate."""
    if path.exists() and not args.recalculate:
        logger.info("scoring the existing %s (pass --recalculate to generate again)", path)
        return _read_predictions(path, len(questions))
    model = load_model(checkpoint, args)
    answers = [a for batch in _batches(questions, args.eval_batch_size) for a in generate_answers(model, batch, args)]
    _write_lines(path, answers)
    return answers


def retrieval_predictions(
    checkpoint: str, args: argparse.Namespace, questions: list[str], path: Path
) -> tuple[list[list[int]], list[list[str]], list[list[str]]]:
    """Top-n ids, titles and texts per question; titles go to `path` (tab-separated, as the reference) and
    ids to `path` tagged `ids`, from which an existing run is rescored without --recalculate."""
    n, ids_path = max(*args.ks, args.k), _tagged(path, "ids")
    if path.exists() and not args.recalculate:
        logger.info("scoring the existing %s and %s (pass --recalculate to retrieve again)", path, ids_path)
        titles = [line.split("\t") if line else [] for line in _read_predictions(path, len(questions))]
        lines = _read_predictions(ids_path, len(questions))
        ids = [[int(i) for i in line.split("\t")] if line else [] for line in lines]
        passages = load_from_disk(kb_paths(checkpoint, args)[0]).select_columns(["text"])
        if min(map(len, ids), default=n) < min(n, len(passages)):
            raise ValueError(f"{ids_path} holds fewer than the top {n} that --ks/--k ask for; use --recalculate")
        return ids, titles, [passages[row]["text"] for row in ids]
    ids, titles, texts = retrieve(load_model(checkpoint, args), questions, n, args.eval_batch_size)
    _write_lines(path, ["\t".join(row) for row in titles])
    _write_lines(ids_path, ["\t".join(map(str, row)) for row in ids])
    return ids, titles, texts


def evaluate_checkpoint(
    checkpoint: str, args: argparse.Namespace, predictions_path: Path, metrics_path: Path
) -> dict[str, float]:
    """Predict (or reuse the predictions there without --recalculate), score, write and print the metrics."""
    questions = [q.strip() for q in read_lines(Path(args.evaluation_set))]
    gold = read_gold(args.gold_data_path, args.gold_data_mode or infer_gold_mode(args.gold_data_path))
    if len(gold.answers) != len(questions):
        raise ValueError(f"{args.gold_data_path} has {len(gold.answers)} lines, {args.evaluation_set} {len(questions)}")
    if not any(gold.answers) and not any(gold.passage_ids) and not any(gold.titles):
        raise InputError(
            f"{args.gold_data_path}: no gold answers, passage ids or titles on any line: nothing to score against"
        )
    if args.eval_mode == "e2e" and not any(gold.answers):
        raise InputError(f"{args.gold_data_path}: no gold answers on any line, which --eval_mode e2e scores")
    if any(gold.passage_ids):  # an id that is no row of the KB would be scored as a miss
        passages = kb_paths(checkpoint, args)[0]
        check_gold_ids(gold, args.gold_data_path, len(load_from_disk(passages)), passages)
    if args.eval_mode == "e2e":
        predictions = e2e_predictions(checkpoint, args, questions, predictions_path)
        metrics = score_e2e(predictions, gold, args.gold_data_path, args.metrics)
    else:
        ids, titles, texts = retrieval_predictions(checkpoint, args, questions, predictions_path)
        predictions = [" | ".join(row[: args.k]) for row in titles]
        metrics = score_retrieval(ids, titles, texts, gold, args.ks, args.k)
    if args.print_predictions:
        for question, prediction in zip(questions, predictions):
            print(f"Q: {question} - A: {prediction}")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"{checkpoint}: {json.dumps(metrics)}")
    return metrics


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Evaluate the model, or every checkpoint in step order; return {checkpoint: metrics}."""
    model = args.model_name_or_path or args.question_encoder_name_or_path
    for flag in ("model_name_or_path", "question_encoder_name_or_path", "generator_name_or_path"):
        check_model_path(flag, getattr(args, flag))
    for adapter in (args.question_encoder_adapter, args.generator_adapter):
        if adapter:
            check_adapter(adapter)
    checkpoints = checkpoint_dirs(model, args.eval_all_checkpoints)
    predictions_path = Path(args.predictions_path)
    metrics_path = Path(args.metrics_path) if args.metrics_path else predictions_path.with_suffix(".json")
    if not args.eval_all_checkpoints:
        return {checkpoints[0]: evaluate_checkpoint(checkpoints[0], args, predictions_path, metrics_path)}
    results = {}
    for checkpoint in checkpoints:
        tag = Path(checkpoint).name  # preds.checkpoint1200.txt, preds.checkpoint1200.json
        results[checkpoint] = evaluate_checkpoint(
            checkpoint, args, _tagged(predictions_path, tag), _tagged(metrics_path, tag)
        )
    metrics_path.write_text(json.dumps({Path(c).name: m for c, m in results.items()}, indent=1) + "\n")
    return results


def _ks(value: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in value.split(",") if k.strip())
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return ks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The reference's eval_rag.py flags, plus --ks, --metrics_path, jsonl gold data and KB overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="a RAG directory, e.g. OUTPUT/checkpoint1200")
    parser.add_argument(
        "--question_encoder_name_or_path",
        default=None,
        help="instead of a RAG model: a question encoder over --passages_path/--index_path, alone for --eval_mode "
        "retrieval (zero-shot retrieval), with --generator_name_or_path a RAG model of parts",
    )
    parser.add_argument(
        "--question_encoder_adapter", default=None, help="a peft adapter directory of --question_encoder_name_or_path"
    )
    parser.add_argument(
        "--generator_name_or_path",
        default=None,
        help="a generator (any seq2seq or causal LM) for the question encoder's passages, or in place of a "
        "checkpoint's own (e.g. beside a retriever_only checkpoint)",
    )
    parser.add_argument("--generator_adapter", default=None, help="a peft adapter directory of the generator")
    parser.add_argument(
        "--generator_type",
        choices=list(GENERATORS),
        default=None,
        help="default: seq2seq for an encoder-decoder config, else causal",
    )
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="with --generator_name_or_path: prompt with {title} {text} {question} (default: the family's; "
        "causal: the chat template if any)",
    )
    parser.add_argument(
        "--question_pooling",
        choices=["cls", "mean", "pooler"],
        default=None,
        help="with --question_encoder_name_or_path (default: the checkpoint's declaration)",
    )
    parser.add_argument("--question_prefix", default=None, help='with --question_encoder_name_or_path, e.g. "query: "')
    parser.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default=None,
        help="how the question encoder scores (default: what the checkpoint declares)",
    )
    parser.add_argument(
        "--model_type",
        choices=["rag_token", "rag_sequence"],
        default=None,
        help="default: from the config's architectures",
    )
    parser.add_argument("--eval_mode", choices=["e2e", "retrieval"], default="e2e")
    parser.add_argument(
        "--metrics",
        type=parse_metrics,
        default=("em", "f1"),
        help="e2e metrics, e.g. em,f1,rouge_l,bleu (em and f1 always)",
    )
    parser.add_argument("--evaluation_set", required=True, help="questions, one per line (e.g. test.source)")
    parser.add_argument("--gold_data_path", required=True, help="a .target, a .gold.jsonl or a qa .tsv file")
    parser.add_argument(
        "--gold_data_mode",
        choices=["qa", "ans", "jsonl", "titles"],
        default=None,
        help="qa: question<TAB>[answers]; ans: one answer a line; jsonl: the converters' gold "
        "records; titles: tab-separated gold titles (default: from the extension)",
    )
    parser.add_argument("--predictions_path", default="predictions.txt")
    parser.add_argument("--metrics_path", default=None, help="default: the predictions path with .json")
    parser.add_argument("--passages_path", default=None, help="default: the checkpoint's KB version")
    parser.add_argument("--index_path", default=None, help="default: the checkpoint's KB version")
    parser.add_argument(
        "--n_docs",
        type=int,
        default=None,
        help="passages per question when generating (e2e); default: the checkpoint's",
    )
    parser.add_argument("--k", type=int, default=1, help="k of the title precision@k")
    parser.add_argument("--ks", type=_ks, default=(1, 5, 10, 20), help="ks of recall@k and MRR@k, e.g. 1,5,20")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument(
        "--num_beams",
        type=int,
        default=None,
        help=f"default: the checkpoint's (its --num_beams), else {FALLBACK.num_beams}",
    )
    parser.add_argument("--min_length", type=int, default=1, help="accepted for compatibility; unused")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="new tokens per answer; default: the check"
        f"point's (--test_max_target_length of its run), else {FALLBACK.max_new_tokens}",
    )
    parser.add_argument(
        "--eval_all_checkpoints",
        action="store_true",
        help="evaluate every checkpoint<step> directory of --model_name_or_path",
    )
    parser.add_argument("--recalculate", action="store_true", help="predict again even if predictions exist")
    parser.add_argument("--print_predictions", action="store_true")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if (args.passages_path is None) != (args.index_path is None):
        parser.error("--passages_path and --index_path go together (an index only fits its own passages)")
    if (args.model_name_or_path is None) == (args.question_encoder_name_or_path is None):
        parser.error("give --model_name_or_path (a RAG model) or --question_encoder_name_or_path (retrieval only)")
    generator_flags = ("generator_adapter", "generator_type", "prompt_template")
    if not args.generator_name_or_path and any(getattr(args, flag) for flag in generator_flags):
        parser.error("--generator_adapter, --generator_type and --prompt_template go with --generator_name_or_path")
    if args.question_encoder_adapter and not args.question_encoder_name_or_path:
        parser.error("--question_encoder_adapter goes with --question_encoder_name_or_path")
    if args.question_encoder_name_or_path:
        if args.passages_path is None or args.eval_all_checkpoints:
            parser.error(
                "--question_encoder_name_or_path needs --passages_path/--index_path (the KB its context encoder "
                "built), and has no checkpoints to iterate"
            )
        if args.eval_mode == "e2e" and not args.generator_name_or_path:
            parser.error(
                "--question_encoder_name_or_path alone evaluates retrieval (--eval_mode retrieval); --eval_mode "
                "e2e needs --generator_name_or_path too"
            )
    elif args.question_pooling or args.question_prefix is not None:
        parser.error(
            "--question_pooling and --question_prefix go with --question_encoder_name_or_path; "
            "a RAG checkpoint carries its own"
        )
    if args.k < 1:
        parser.error("--k must be at least 1")
    return args


def cli() -> None:
    """The command line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
