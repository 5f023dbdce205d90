"""Ask a trained model questions: its answer and the passages it drew on, with their scores.

    python rag_answer.py --model OUT/checkpoint120 --question "What is the incubation period of COVID-19?"
    python rag_answer.py --model EXPORT_DIR --questions_file questions.txt --json > answers.jsonl
    python rag_answer.py --model OUT/checkpoint120            # an interactive prompt; an empty line ends it

--model is a checkpoint<step> of finetune_rag.py or an export of export_model.py; the KB is the version it
names (--passages_path/--index_path override). Decoding, passages per question and prefixes are the run's.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from rag_end2end.data.readers import read_lines
from rag_end2end.model.rag import RagModel


def load(args: argparse.Namespace) -> RagModel:
    kb = (args.passages_path, args.index_path) if args.passages_path else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return RagModel.from_pretrained(args.model, kb=kb).to(device).eval()


def show(result: dict, as_json: bool, top: int) -> str:
    if as_json:
        return json.dumps(result, ensure_ascii=False)
    lines = [f"Q: {result['question']}", f"A: {result['answer'] if result['answer'] is not None else '(no generator)'}"]
    for rank, p in enumerate(result["passages"][:top], start=1):
        text = p["text"] if len(p["text"]) <= 200 else p["text"][:200] + "..."
        lines.append(f"  {rank}. [{p['id']}] {p['title']} (score {p['score']:.3f}, p {p['probability']:.2f}): {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint<step> of finetune_rag.py or an export_model.py export")
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--questions_file", default=None, help="one question a line")
    p.add_argument("--json", action="store_true", help="one JSON object a line: question, answer, passages")
    p.add_argument("--show_passages", type=int, default=3, help="passages printed per answer (without --json)")
    p.add_argument("--passages_path", default=None, help="another KB (with --index_path)")
    p.add_argument("--index_path", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available")
    args = p.parse_args(argv)
    if (args.passages_path is None) != (args.index_path is None):
        p.error("--passages_path and --index_path go together (an index only fits its own passages)")
    if any(not q.strip() for q in args.question):
        p.error("--question: an empty question (nothing to retrieve or answer for)")
    questions = args.question + (read_lines(args.questions_file) if args.questions_file else [])
    model = load(args)
    results = []
    if questions:
        for start in range(0, len(questions), args.batch_size):
            for result in model.answer(questions[start : start + args.batch_size]):
                print(show(result, args.json, args.show_passages), flush=True)
                results.append(result)
        return results
    while True:  # interactive
        try:
            question = input("question> ").strip()
        except EOFError:
            break
        if not question:
            break
        result = model.answer([question])[0]
        print(show(result, args.json, args.show_passages), flush=True)
        results.append(result)
    return results


def cli() -> None:
    """The command line."""
    main()
    sys.exit(0)


if __name__ == "__main__":
    cli()
