"""Generate training questions for a knowledge base that has none: a local causal LM picks a short phrase of each
(sampled) passage as the answer, then writes a question for it; filtered pairs become the files that prepare_squad.py
writes.

    python generate_qa.py --csv_path my_kb.csv --generator_name_or_path pretrained/smollm2-135m-instruct \
        --output_dir data/my_kb_qa [--max_passages 2000 --per_passage 2 --seed 42 --batch_size 16 \
        --max_new_tokens 64 --val_fraction 0.1 --test_fraction 0.1 --no_extractive --overwrite \
        --roundtrip_k 20 --question_encoder_name_or_path pretrained/minilm --question_first --threads 1]

The knowledge base is a `title<TAB>text` CSV, split into 100-word passages exactly as use_own_knowledge_dataset.py
splits it (passage ids are the rows of that KB), or --passages_path, a KB directory that script built (title, text).
Writes into --output_dir:
  kb.csv                       the documents (for --passages_path: one line per passage), so that
                               `use_own_knowledge_dataset.py --csv_path OUT/kb.csv` rebuilds the same passage rows
  {train,val,test}.source      one question per line
  {train,val,test}.target      its answer
  {train,val,test}.gold.jsonl  {"id", "question", "answers", "title", "gold_passage_ids": [its passage's row]}
  stats.json                   counts: passages, generations, each filter's rejections, questions per split
  dalm.csv                     every kept pair in DALM's format (Passage,Query,Answer; prepare_dalm_csv.py reads it)
  generations.jsonl            every raw generation, {"passage_id", "sample", "text"}, appended after each batch
  generation_settings.json     what the generations depend on (generator, prompt, decoding, KB digest)

Prompts, in two steps, each one user turn of the tokenizer's chat template when it has one, else plain text and a
blank line. Answer first (the default): PICK_INSTRUCTION, ending with ANSWER_CUE (`Answer:`), decoded under
CandidatePhrases, so the reply is one of answer_candidates (the passage's runs of at most MAX_CANDIDATE_WORDS words
between function words and punctuation); then QUESTION_FOR_ANSWER_INSTRUCTION with that answer, ending with CUE
(`Question:`), greedy: the first line of the reply is the question. Question first (--question_first, for models
that answer well in their own words): QUESTION_INSTRUCTION ending with CUE, then ANSWER_INSTRUCTION with that question
ending with ANSWER_CUE, greedy. The stored text is `Question: <question>\nAnswer:<answer>`, which parse_pair reads.
Sample 0 of a passage is greedy (its answer pick, question first its question); samples 1.. (--per_passage) are
drawn with --temperature and --top_p, seeded per batch from --seed. A question's decoding stops after its first line
(FirstLineDone). Passages are a seeded sample of --max_passages rows (default: all). On CPU beside other work (a
training run), --threads 1: threads that outnumber the free cores made generation about 6 times slower.

Resuming: generations.jsonl is flushed after each batch; rerunning the same command skips the (passage, sample)
pairs already there, so a crash or Ctrl-C loses at most one batch. The split files are written, from
generations.jsonl, only once every generation of the selection is done (--max_batches stops a run early, to
work in pieces). A finished output asked for again with other filters (FILTER_FLAGS), or with --overwrite, is
rewritten from its generations without generating again; delete generations.jsonl to generate anew.

Filters (each counted in stats.json `rejected`, in this order): unparseable output; question under
MIN_QUESTION_WORDS or over MAX_QUESTION_WORDS words; question holding the same REPEAT_RUN_WORDS words twice (a decoding
loop); answer over MAX_ANSWER_WORDS words; answer not in its passage (SQuAD-normalised, whole words; off with
--no_extractive); answer in its question; question repeating QUOTE_RUN_WORDS consecutive passage words; duplicate
question (normalised, over the whole KB); and with --roundtrip_k K, a question for which the
question encoder does not rank its passage in the top K of all KB passages (exact inner-product search).
Splits are by document (title), seeded: no document's questions are in two splits.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, StoppingCriteria

from rag_end2end.data.readers import check_model_path, read_kb_csv, run_main
from rag_end2end.data.squad import OUTPUT_FILES, SPLITS, check_output_dir, split_titles
from rag_end2end.evaluation.metrics import has_answer, normalize_answer
from rag_end2end.files import atomic_writes, temporary_sibling
from rag_end2end.kb.passages import split_documents
from rag_end2end.model.causal import encode_prompts, pad_id
from rag_end2end.options import add_debug_arg
from rag_end2end.precision import native_bf16

GENERATIONS_FILE = "generations.jsonl"
FILTER_FLAGS = ("extractive", "roundtrip_k")  # what a rerun may change without --overwrite (refilters)
DALM_FILE = "dalm.csv"  # every kept pair as DALM's CSV (Passage,Query,Answer), which prepare_dalm_csv.py reads back
SETTINGS_FILE = "generation_settings.json"
# Answer first (the default): the model picks the answer among ANSWER_CANDIDATES-style phrases of the passage
# (decoding constrained to them), then writes a question for it. Asked for a free answer instead, SmolLM2-135M-Instruct
# wrote sentences or words of its own: on 8 dummy-KB passages, 0 of 8 pairs passed the extractive filter, against 8
# of 8 this way (see docs/data.md).
PICK_INSTRUCTION = (
    "Title: {title}\nPassage: {text}\n\nCopy from the passage a short phrase (a name, a number or a term) "
    "that a question about the passage could have as its answer."
)
QUESTION_FOR_ANSWER_INSTRUCTION = (
    'Title: {title}\nPassage: {text}\n\nWrite a question about the passage whose answer is "{answer}". '
    "Do not put the answer in the question."
)  # a worked example from another text leaked into the questions (on 1 of 8 passages) and kept no more pairs
MAX_CANDIDATE_WORDS = 5
# Candidate answers are the passage's runs of up to MAX_CANDIDATE_WORDS words between these words and punctuation:
# a crude noun-phrase chunker ("34 per 100,000", "abnormal chest X-ray", "Shandong China") that needs no parser.
CANDIDATE_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but as is are was were be been being that which who whom this "
    "these those it its their there than then also not no into over under between among during after before while "
    "we our".split()
)
# citations ("[12]", "[1, 8]", "(Shi et al., 2015; ...)") break phrases too: their numbers answer nothing
_CITATION = re.compile(r"\[\d+(?:\s*[,–-]\s*\d+)*\]|\([^()]*\bet al\.?,? \d{4}[^()]*\)")
_CLAUSE_BREAK = re.compile(r"[,;:()\[\]]\s+|[.?!]\s+|\s+[()\[\]]|\s+-\s+")
# Question first (--question_first, for larger models): a question from the passage, then its answer from the passage
# and the question. Asked for both at once, SmolLM2-135M-Instruct wrote a usable pair for 3 of 40 CMU passages (25
# unparseable); asked for a question alone, it wrote a topical question for ~13 of 16.
QUESTION_INSTRUCTION = "Title: {title}\nPassage: {text}\n\nWrite one question that this passage answers."
ANSWER_INSTRUCTION = (
    "Title: {title}\nPassage: {text}\n\nQuestion: {question}\n\n"
    "Answer in at most five words, copied exactly from the passage."
)  # no worked example in either: small models copy its question into every reply
CUE = "Question:"  # ends every question prompt (after the chat template's turn too): the reply is the question
ANSWER_CUE = "Answer:"  # ends every answer prompt
ANSWER_NEW_TOKENS = 32  # at most: an answer over MAX_ANSWER_WORDS words is rejected anyway
MIN_QUESTION_WORDS = 3
MAX_QUESTION_WORDS = 40
MAX_ANSWER_WORDS = 20  # asked for a short phrase: a longer answer is a copied sentence, not a span to learn
# A question that repeats this many consecutive (normalised) passage words is a copied sentence with one word turned
# into "what": it is answered by string matching, not by understanding. 8 still lets a question name a long entity.
QUOTE_RUN_WORDS = 8
# A question that holds the same REPEAT_RUN_WORDS (normalised) words twice is a decoding loop ("What is the answer to
# the question: What is the answer to the question: ...").
REPEAT_RUN_WORDS = 4
REASONS = (
    "unparseable",
    "question_too_short",
    "question_too_long",
    "question_repeats_itself",
    "answer_too_long",
    "answer_not_in_passage",
    "answer_in_question",
    "quotes_passage",
    "duplicate_question",
    "roundtrip_miss",
)
# `Question:` / `Answer:` labels, as written or in markdown bold (`**Answer:**`, `**Answer**:`); case-sensitive,
# as the prompt spells them
_LABEL = r"(?<![A-Za-z])(?:\*\*|__)?{}(?:\*\*|__)?[ \t]*:(?:\*\*|__)?"
QUESTION_LABEL = re.compile(_LABEL.format("Question"))
ANSWER_LABEL = re.compile(_LABEL.format("Answer"))
_EDGE_CHARS = " \t*_\"'“”‘’`"
_ANSWER_IS = re.compile(r"^(?:the )?answer is\b:?", re.IGNORECASE)  # `Answer: The answer is X` is answer X


@dataclass
class KnowledgeBase:
    """Passages (row i is passage id i), the documents kb.csv holds, and where they came from."""

    titles: list[str]
    texts: list[str]
    documents: list[tuple[str, str]]
    source: str
    passages_path: str | None = None  # a built KB directory, whose embeddings the round-trip filter may use


@dataclass
class Pair:
    """A generated question with its answer and the passage it was generated from."""

    passage_id: int
    sample: int
    question: str
    answer: str
    title: str

    @property
    def id(self) -> str:
        """`p<passage row>-s<sample>`: unique, and stable across reruns."""
        return f"p{self.passage_id}-s{self.sample}"


# ----------------------------------------------------------------------------- knowledge base


def load_kb(csv_path: str | None = None, passages_path: str | None = None) -> KnowledgeBase:
    """Passages of a `title<TAB>text` CSV (split as use_own_knowledge_dataset.py does) or of a built KB directory."""
    if csv_path is not None:
        documents = read_kb_csv(csv_path)
        passages = split_documents(documents)
        return KnowledgeBase(list(passages["title"]), list(passages["text"]), documents, str(csv_path))
    from datasets import load_from_disk

    passages = load_from_disk(str(passages_path))
    missing = [c for c in ("title", "text") if c not in passages.column_names]
    if missing:
        raise ValueError(f"{passages_path}: the passages dataset lacks column(s) {', '.join(missing)}")
    titles, texts = list(passages["title"]), list(passages["text"])
    return KnowledgeBase(titles, texts, list(zip(titles, texts)), str(passages_path), str(passages_path))


def kb_digest(kb: KnowledgeBase) -> str:
    """sha256 of the passages in row order: generations name passages by row, so they belong to one KB."""
    h = hashlib.sha256()
    for title, text in zip(kb.titles, kb.texts):
        h.update(f"{title}\x00{text}\x01".encode())
    return h.hexdigest()


def kb_csv_text(documents: list[tuple[str, str]]) -> str:
    """The documents as `title<TAB>text` lines, quoted by the csv module where needed (read_kb_csv reads them)."""
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n").writerows(documents)
    return buffer.getvalue()


def check_kb_csv(path: Path, kb: KnowledgeBase, shown_as: Path) -> None:
    """Stop unless the kb.csv at `path` reads back (read_kb_csv + split_documents) as exactly the KB's passage rows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicates: already warned about when the KB itself was read
        passages = split_documents(read_kb_csv(path))
    titles, texts = passages["title"], passages["text"]
    if len(titles) != len(kb.titles):
        raise RuntimeError(f"{shown_as} would read back as {len(titles)} passages, not {len(kb.titles)}")
    for row, pair in enumerate(zip(titles, texts, kb.titles, kb.texts)):
        if pair[:2] != pair[2:]:
            raise RuntimeError(
                f"{shown_as} would not rebuild passage row {row} of {kb.source} as it is (e.g. a passage over 100 "
                "words, or a title or text with spaces around it); give the KB as --csv_path instead"
            )


# ----------------------------------------------------------------------------- prompts and generation


def prompt_kind(tokenizer) -> str:
    """`chat` when the tokenizer has a chat template, else `plain`."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def _prompt(tokenizer, content: str, cue: str) -> str:
    """`content` as a chat user turn with `cue` as the reply's start, or as plain text, a blank line and `cue`."""
    if prompt_kind(tokenizer) == "chat":
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + cue
    return f"{content}\n\n{cue}"


def build_prompt(tokenizer, title: str, text: str, question: str | None = None) -> str:
    """Question first: the question prompt for one passage (QUESTION_INSTRUCTION, then CUE), or with `question` its
    answer prompt (ANSWER_INSTRUCTION, then ANSWER_CUE)."""
    if question is None:
        return _prompt(tokenizer, QUESTION_INSTRUCTION.format(title=title, text=text), CUE)
    return _prompt(tokenizer, ANSWER_INSTRUCTION.format(title=title, text=text, question=question), ANSWER_CUE)


def pick_prompt(tokenizer, title: str, text: str) -> str:
    """Answer first: the prompt whose reply, constrained to answer_candidates, is the answer (PICK_INSTRUCTION)."""
    return _prompt(tokenizer, PICK_INSTRUCTION.format(title=title, text=text), ANSWER_CUE)


def question_for_answer_prompt(tokenizer, title: str, text: str, answer: str) -> str:
    """Answer first: the prompt whose first reply line is a question that `answer` answers."""
    return _prompt(tokenizer, QUESTION_FOR_ANSWER_INSTRUCTION.format(title=title, text=text, answer=answer), CUE)


def answer_candidates(text: str, max_words: int = MAX_CANDIDATE_WORDS) -> list[str]:
    """The passage's short phrases that may serve as answers, distinct, in passage order: runs of at most `max_words`
    words between CANDIDATE_STOPWORDS, clause punctuation and citations, edge punctuation removed. Each one passes the
    extractive filter (has_answer) against `text`, so a pair built on it is extractive by construction."""
    found: list[str] = []
    for clause in (c for part in _CITATION.split(text) for c in _CLAUSE_BREAK.split(part)):
        run: list[str] = []
        for word in [*clause.split(), None]:
            if word is not None and word.lower().strip(".,;:!?\"'") not in CANDIDATE_STOPWORDS:
                run.append(word)
                continue
            phrase = " ".join(run).strip(".,;:!?\"'()[]")
            run = []
            if phrase and len(phrase.split()) <= max_words and phrase not in found and has_answer(text, [phrase]):
                found.append(phrase)
    return found


def candidate_token_ids(tokenizer, phrases: list[str]) -> list[list[int]]:
    """Candidate phrases as the token ids the model writes after the answer cue (a space, then the phrase)."""
    return [tokenizer(" " + phrase, add_special_tokens=False)["input_ids"] for phrase in phrases]


class CandidatePhrases(LogitsProcessor):
    """Decoding restricted, row by row, to one of the row's candidate token sequences followed by EOS: the model
    chooses the answer (greedy or sampled) but cannot write one that is not in the passage. A row without
    candidates may only end."""

    def __init__(self, candidates: list[list[list[int]]], prompt_width: int, eos_ids: list[int]):
        self.candidates, self.prompt_width, self.eos_ids = candidates, prompt_width, eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, written in enumerate(input_ids[:, self.prompt_width :].tolist()):
            if any(token in self.eos_ids for token in written):
                mask[row] = 0  # finished: generate pads it
                continue
            n, allowed = len(written), set()
            for candidate in self.candidates[row]:
                if candidate[:n] == written:
                    allowed.update([candidate[n]] if n < len(candidate) else self.eos_ids)
            mask[row, sorted(allowed or self.eos_ids)] = 0
        return scores + mask


class FirstLineDone(StoppingCriteria):
    """Stops each row once its reply holds a complete first line (text, then a newline): question prompts keep only
    that line (_first_line), and a small model goes on after it, with an answer or more questions, up to
    max_new_tokens. What is kept is the same; the batch ends when its longest question does."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        # decoded as generate_texts decodes it: a newline after the first non-blank character ends that line, and
        # no later token can change the text before a newline
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip() for text in texts], device=input_ids.device)


def load_generator_tokenizer(name_or_path: str):
    """The generator's tokenizer; remote code is never run."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def load_generator(name_or_path: str, device: str, dtype: str = "auto") -> torch.nn.Module:
    """A local AutoModelForCausalLM in eval mode on `device`; remote code is never run."""
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") and native_bf16() else "float32"
    model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def batch_seed(seed: int, passage_id: int, sample: int) -> int:
    """The sampling seed of a batch, from its first (passage, sample): the same batch draws the same text."""
    return random.Random(f"{seed}-{passage_id}-{sample}").getrandbits(63)


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    sample: bool,
    seed: int,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    candidates: list[list[list[int]]] | None = None,
    first_line: bool = False,
) -> list[str]:
    """The model's continuations of `prompts`, batched with left padding: greedy, or sampled under `seed`; with
    `candidates`, each continuation is one of its prompt's candidate token sequences (CandidatePhrases); with
    `first_line`, each row stops after its first complete line (FirstLineDone): only that line is certain to be
    whole, the rest is cut short."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    ids = encode_prompts(prompts, tokenizer)
    pad, width = pad_id(tokenizer), max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    if candidates is not None and not eos:
        raise ValueError("answers picked among candidates must end with an EOS token, and the generator has none")
    processors = LogitsProcessorList([CandidatePhrases(candidates, width, eos)] if candidates is not None else [])
    if sample:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        logits_processor=processors,
        stopping_criteria=StoppingCriteriaList([FirstLineDone(tokenizer, width)] if first_line else []),
    )
    return tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)


# ----------------------------------------------------------------------------- generations file


def read_generations(path: str | Path) -> dict[tuple[int, int], str]:
    """{(passage_id, sample): text} of a generations.jsonl; an unfinished last line (a crash mid-write) is ignored,
    and a (passage, sample) written twice keeps its first text."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_text(encoding="utf-8")
    lines = data.split("\n")
    lines.pop()  # "" after the final newline, or an unfinished line
    found: dict[tuple[int, int], str] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            key, text = (int(record["passage_id"]), int(record["sample"])), str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: not a generation record ({e}); remove the line to go on") from None
        found.setdefault(key, text)
    return found


def drop_unfinished_line(path: Path) -> bool:
    """Cut a last line without its newline (a crash mid-write) off the file, so appending starts a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def append_generations(f, records: list[dict]) -> None:
    """Append records as JSON lines and push them to disk, so a crash after this loses none of them."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def recipe(question_first: bool) -> list[str]:
    """The instructions (and, answer first, the candidate rule) that the generations depend on."""
    if question_first:
        return [QUESTION_INSTRUCTION, ANSWER_INSTRUCTION]
    rule = [str(MAX_CANDIDATE_WORDS), _CITATION.pattern, _CLAUSE_BREAK.pattern, *sorted(CANDIDATE_STOPWORDS)]
    return [PICK_INSTRUCTION, QUESTION_FOR_ANSWER_INSTRUCTION, *rule]


def generation_settings(args: argparse.Namespace, kb: KnowledgeBase, kind: str) -> dict:
    """What the stored generations depend on: rerunning with other values would mix two kinds of output."""
    generator = args.generator_name_or_path
    return {
        "generator": os.path.abspath(generator) if os.path.exists(generator) else generator,
        "prompt": kind,
        "order": "question_first" if args.question_first else "answer_first",
        "instruction_sha256": hashlib.sha256("\x00".join(recipe(args.question_first)).encode()).hexdigest(),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "passages": len(kb.titles),
        "kb_sha256": kb_digest(kb),
    }


def check_settings(out: Path, settings: dict) -> None:
    """Record the settings with the first generation; refuse to add generations made under other settings."""
    path, generations = out / SETTINGS_FILE, out / GENERATIONS_FILE
    if not generations.is_file() or generations.stat().st_size == 0:
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        return
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    changed = [k for k in settings if saved.get(k) != settings[k]]
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in changed if not k.endswith("sha256"))
        shown = shown or ", ".join(changed)
        raise ValueError(
            f"{generations} was generated with other settings ({shown}); use another --output_dir, or delete "
            f"{generations} to generate anew"
        )


# ----------------------------------------------------------------------------- parsing and filters


def _strip_edges(text: str) -> str:
    """Whitespace collapsed, and markdown emphasis and quotes around the text removed."""
    return " ".join(text.split()).strip(_EDGE_CHARS)


def _first_line(text: str) -> str:
    """The first line of `text` that holds more than whitespace, or ''."""
    return next((line for line in text.split("\n") if line.strip()), "")


def parse_pair(text: str) -> tuple[str, str] | None:
    """(question, answer) from a `Question: ...` / `Answer: ...` reply, chatter around it ignored; None if either
    is missing or empty. Each is the first non-empty line after its label; a final period is dropped from the
    answer unless it ends an abbreviation (`U.S.`)."""
    q_label = QUESTION_LABEL.search(text)
    a_label = ANSWER_LABEL.search(text, q_label.end()) if q_label else None
    if a_label is None:
        return None
    question = _strip_edges(_first_line(text[q_label.end() : a_label.start()]))
    answer = _first_line(text[a_label.end() :])
    if (again := QUESTION_LABEL.search(answer)) is not None:  # `Answer: X Question: ...` on one line
        answer = answer[: again.start()]
    answer = _strip_edges(_ANSWER_IS.sub("", _strip_edges(answer)))
    if answer.endswith(".") and "." not in answer.rsplit(" ", 1)[-1][:-1]:
        answer = _strip_edges(answer[:-1])
    return (question, answer) if question and answer else None


def quotes_passage(question: str, passage: str, run: int = QUOTE_RUN_WORDS) -> bool:
    """Whether the question repeats `run` consecutive passage words (both SQuAD-normalised)."""
    q, p = normalize_answer(question).split(), normalize_answer(passage).split()
    grams = {tuple(p[i : i + run]) for i in range(len(p) - run + 1)}
    return any(tuple(q[i : i + run]) in grams for i in range(len(q) - run + 1))


def repeats_itself(question: str, run: int = REPEAT_RUN_WORDS) -> bool:
    """Whether the (SQuAD-normalised) question holds the same `run` consecutive words twice: a decoding loop."""
    words = normalize_answer(question).split()
    grams = [tuple(words[i : i + run]) for i in range(len(words) - run + 1)]
    return len(set(grams)) < len(grams)


def filter_reason(question: str, answer: str, passage: str, seen: set[str], extractive: bool = True) -> str | None:
    """Why a parsed pair is rejected (a REASONS name), or None when kept: then its normalised question joins `seen`."""
    n_words = len(question.split())
    if n_words < MIN_QUESTION_WORDS:
        return "question_too_short"
    if n_words > MAX_QUESTION_WORDS:
        return "question_too_long"
    if repeats_itself(question):
        return "question_repeats_itself"
    if len(answer.split()) > MAX_ANSWER_WORDS:
        return "answer_too_long"
    if extractive and not has_answer(passage, [answer]):
        return "answer_not_in_passage"
    if has_answer(question, [answer]):
        return "answer_in_question"  # answered by reading the question
    if quotes_passage(question, passage):
        return "quotes_passage"
    key = normalize_answer(question)
    if key in seen:
        return "duplicate_question"
    seen.add(key)
    return None


def filter_generations(
    generations: dict[tuple[int, int], str], kb: KnowledgeBase, extractive: bool = True
) -> tuple[list[Pair], Counter]:
    """Parse and filter generations in (passage, sample) order (the first of duplicate questions is kept)."""
    kept, rejected, seen = [], Counter(), set()
    for (row, sample), text in sorted(generations.items()):
        parsed = parse_pair(text)
        reason = "unparseable" if parsed is None else filter_reason(*parsed, kb.texts[row], seen, extractive)
        if reason:
            rejected[reason] += 1
        else:
            kept.append(Pair(row, sample, *parsed, kb.titles[row]))
    return kept, rejected


# ----------------------------------------------------------------------------- round trip


def roundtrip_hits(question_vectors: np.ndarray, passage_vectors: np.ndarray, rows: list[int], k: int) -> list[bool]:
    """Whether each question's passage (`rows[i]`) is among its top-k passages by inner product (exact search)."""
    import faiss

    index = faiss.IndexFlatIP(passage_vectors.shape[1])
    index.add(np.ascontiguousarray(passage_vectors, dtype=np.float32))
    _, top = index.search(np.ascontiguousarray(question_vectors, dtype=np.float32), min(k, len(passage_vectors)))
    return [row in set(ids.tolist()) for row, ids in zip(rows, top)]


@torch.no_grad()
def encode_questions(encoder: torch.nn.Module, tokenizer, questions: list[str], batch_size: int, device: str):
    """Question vectors as RAG reads them (`encoder(ids, attention_mask=mask)[0]`), as float32 numpy."""
    encoder.eval()
    out = []
    for start in range(0, len(questions), batch_size):
        enc = tokenizer(questions[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        out.append(encoder(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))[0])
    return torch.cat(out).float().cpu().numpy()


def passage_vectors(kb: KnowledgeBase, args: argparse.Namespace, question_encoder, question_tokenizer) -> np.ndarray:
    """Every KB passage's vector: by --context_encoder_name_or_path, else the --passages_path KB's own embeddings,
    else by the question encoder itself (one encoder for both sides)."""
    from rag_end2end.kb.encoding import encode_token_ids
    from rag_end2end.kb.passages import tokenize_passages
    from rag_end2end.kb.similarity import check_kb_similarity
    from rag_end2end.model.encoders import context_side, encoder_similarity, load_encoder, load_tokenizer

    similarity = encoder_similarity(question_encoder)
    if args.context_encoder_name_or_path is None and kb.passages_path is not None:
        from datasets import load_from_disk

        passages = load_from_disk(kb.passages_path)
        if "embeddings" in passages.column_names:
            check_kb_similarity(
                kb.passages_path, f"the question encoder {args.question_encoder_name_or_path}", similarity
            )
            return np.asarray(passages.with_format("numpy")["embeddings"], dtype=np.float32)
    if args.context_encoder_name_or_path is not None:
        name = args.context_encoder_name_or_path
        encoder = load_encoder(name, side="context").to(args.device)
        tokenizer = load_tokenizer(name)
        if encoder_similarity(encoder) != similarity:
            raise ValueError(
                f"the context encoder {name} scores with {encoder_similarity(encoder)} similarity, "
                f"the question encoder with {similarity}"
            )
    else:
        encoder, tokenizer = context_side(question_encoder), question_tokenizer
    token_ids = tokenize_passages(tokenizer, kb.titles, kb.texts)
    return encode_token_ids(encoder, token_ids, tokenizer.pad_token_id, args.batch_size, args.device)


def roundtrip_filter(pairs: list[Pair], kb: KnowledgeBase, args: argparse.Namespace) -> tuple[list[Pair], int]:
    """The pairs whose passage the question encoder ranks in the top --roundtrip_k, and how many were dropped."""
    from rag_end2end.model.encoders import load_encoder, load_tokenizer

    if not pairs:
        return pairs, 0
    name = args.question_encoder_name_or_path
    encoder, tokenizer = load_encoder(name, side="question").to(args.device), load_tokenizer(name)
    passages = passage_vectors(kb, args, encoder, tokenizer)
    questions = encode_questions(encoder, tokenizer, [p.question for p in pairs], args.batch_size, args.device)
    if questions.shape[1] != passages.shape[1]:
        raise ValueError(
            f"the question encoder {name} makes {questions.shape[1]}-d vectors but the passages are "
            f"{passages.shape[1]}-d: give the context encoder that matches it"
        )
    hits = roundtrip_hits(questions, passages, [p.passage_id for p in pairs], args.roundtrip_k)
    kept = [p for p, hit in zip(pairs, hits) if hit]
    return kept, len(pairs) - len(kept)


# ----------------------------------------------------------------------------- selection and splits


def select_passages(n_passages: int, max_passages: int | None, seed: int) -> list[int]:
    """Rows to generate for, ascending: all of them, or a seeded sample of `max_passages`."""
    if max_passages is None or max_passages >= n_passages:
        return list(range(n_passages))
    return sorted(random.Random(seed).sample(range(n_passages), max_passages))


def plan_batches(rows: list[int], per_passage: int, done: set[tuple[int, int]], batch_size: int) -> list[list]:
    """The (passage, sample) batches still to generate: sample by sample (0 is greedy, so a batch is one kind),
    passages ascending; what is done is skipped, so a rerun continues with the batches that were left."""
    batches = []
    for sample in range(per_passage):
        todo = [(row, sample) for row in rows if (row, sample) not in done]
        batches += [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    return batches


def split_by_document(pairs: list[Pair], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Pair]]:
    """Seeded split by document title (prepare_squad.split_titles), then a seeded shuffle within each split."""
    titles = split_titles([p.title for p in pairs], val_fraction, test_fraction, seed)
    rng, splits = random.Random(seed), {}
    for split in SPLITS:
        splits[split] = [p for p in pairs if p.title in titles[split]]
        rng.shuffle(splits[split])
    return splits


# ----------------------------------------------------------------------------- outputs


def split_files(splits: dict[str, list[Pair]]) -> dict[str, str]:
    """The contents of {split}.source, .target and .gold.jsonl."""
    files = {}
    for split, pairs in splits.items():
        files[f"{split}.source"] = "".join(p.question + "\n" for p in pairs)
        files[f"{split}.target"] = "".join(p.answer + "\n" for p in pairs)
        rows = [
            {
                "id": p.id,
                "question": p.question,
                "answers": [p.answer],
                "title": p.title,
                "gold_passage_ids": [p.passage_id],
            }
            for p in pairs
        ]
        files[f"{split}.gold.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return files


def dalm_csv(pairs: list[Pair], kb: KnowledgeBase) -> str:
    """Every kept pair as DALM's CSV: its passage's text, the question and the answer, with a header."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Passage", "Query", "Answer"])
    writer.writerows([kb.texts[p.passage_id], p.question, p.answer] for p in pairs)
    return text.getvalue()


def write_files(out: Path, files: dict[str, str], overwrite: bool) -> None:
    """Write every file under a temporary name, then rename them all into place (none replaced without overwrite)."""
    check_output_dir(out, overwrite)
    with atomic_writes([out / name for name in files], "the generated data") as tmp:
        for text, path in zip(files.values(), tmp):
            path.write_text(text, encoding="utf-8")


def verify_kb_csv(out: Path, kb: KnowledgeBase) -> str:
    """kb.csv's text, checked (through a temporary file) to rebuild the KB's passage rows; before any generation."""
    text, tmp = kb_csv_text(kb.documents), temporary_sibling(out / "kb.csv")
    try:
        tmp.write_text(text, encoding="utf-8")
        check_kb_csv(tmp, kb, out / "kb.csv")
    finally:
        tmp.unlink(missing_ok=True)
    return text


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kb = p.add_mutually_exclusive_group(required=True)
    kb.add_argument("--csv_path", help="the knowledge base: `title<TAB>text` lines, split into 100-word passages")
    kb.add_argument("--passages_path", help="or a KB directory built by use_own_knowledge_dataset.py (title, text)")
    p.add_argument("--generator_name_or_path", required=True, help="a local AutoModelForCausalLM directory")
    p.add_argument("--output_dir", required=True, help="where kb.csv, the splits, stats.json and generations go")
    p.add_argument("--max_passages", type=int, default=None, help="generate for a seeded sample of N passages")
    p.add_argument("--per_passage", type=int, default=1, help="pairs asked per passage: one greedy, then sampled")
    p.add_argument("--seed", type=int, default=42, help="seeds the passage sample, sampling and the split")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (and per encoder batch)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="for the sampled pairs (--per_passage > 1)")
    p.add_argument("--top_p", type=float, default=0.95, help="for the sampled pairs (--per_passage > 1)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of documents for val")
    p.add_argument("--test_fraction", type=float, default=0.1, help="fraction of documents for test")
    p.add_argument(
        "--no_extractive",
        dest="extractive",
        action="store_false",
        help="keep answers that do not occur in their passage",
    )
    p.add_argument(
        "--roundtrip_k",
        type=int,
        default=None,
        help="keep a pair only if the question encoder ranks its passage in its top K",
    )
    p.add_argument("--question_encoder_name_or_path", default=None, help="the round-trip filter's question encoder")
    p.add_argument(
        "--context_encoder_name_or_path",
        default=None,
        help="round trip: encodes the passages (default: the --passages_path KB's embeddings, else the "
        "question encoder itself)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="generator weights (auto: bfloat16 on a GPU with native bf16, else float32)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); 1 beside a training run on a small machine: "
        "threads that outnumber the free cores wait for each other at every step (6x slower on 2 shared cores)",
    )
    p.add_argument(
        "--max_batches",
        type=int,
        default=None,
        help="generate at most N batches in this run, then stop (rerun to continue)",
    )
    p.add_argument(
        "--question_first",
        action="store_true",
        help="ask for a question, then its answer in the model's words (larger models), instead of picking an answer "
        "phrase of the passage first, then asking for its question",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files of a finished run")
    add_debug_arg(p)
    args = p.parse_args(argv)
    fractions = (args.val_fraction, args.test_fraction)
    if not (all(0 <= f < 1 for f in fractions) and sum(fractions) < 1):
        p.error("--val_fraction and --test_fraction must be in [0, 1) and sum to less than 1")
    counts = ("max_passages", "per_passage", "batch_size", "max_new_tokens", "roundtrip_k", "max_batches", "threads")
    for flag in counts:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be positive and --top_p in (0, 1]")
    if args.roundtrip_k is not None and not args.question_encoder_name_or_path:
        p.error("--roundtrip_k needs --question_encoder_name_or_path")
    if args.roundtrip_k is None and (args.question_encoder_name_or_path or args.context_encoder_name_or_path):
        warnings.warn("an encoder is given without --roundtrip_k: the round-trip filter is off", stacklevel=1)
    for flag in ("generator_name_or_path", "question_encoder_name_or_path", "context_encoder_name_or_path"):
        try:
            check_model_path(flag, getattr(args, flag))
        except FileNotFoundError as err:
            p.error(str(err))
    return args


def question_first(
    model: torch.nn.Module,
    tokenizer,
    args: argparse.Namespace,
    passages: list[tuple[str, str]],
    sample: bool,
    seed: int,
) -> list[str]:
    """--question_first: a question for each (title, text) (sampled when `sample`), then its answer in the model's
    words (greedy); each pair as parse_pair reads it."""
    prompts = [build_prompt(tokenizer, title, text) for title, text in passages]
    texts = generate_texts(
        model, tokenizer, prompts, sample, seed, args.max_new_tokens, args.temperature, args.top_p, first_line=True
    )
    questions = [_first_line(t).strip() for t in texts]
    prompts = [build_prompt(tokenizer, title, text, q) for (title, text), q in zip(passages, questions)]
    answers = generate_texts(model, tokenizer, prompts, False, 0, min(args.max_new_tokens, ANSWER_NEW_TOKENS))
    return [f"{CUE} {q}\n{ANSWER_CUE}{a}" for q, a in zip(questions, answers)]


def answer_first(
    model: torch.nn.Module,
    tokenizer,
    args: argparse.Namespace,
    passages: list[tuple[str, str]],
    sample: bool,
    seed: int,
) -> list[str]:
    """The default: an answer picked among each passage's answer_candidates (sampled when `sample`, so a passage's
    samples differ), then a question for it (greedy); each pair as parse_pair reads it."""
    prompts = [pick_prompt(tokenizer, title, text) for title, text in passages]
    phrases = [answer_candidates(text) for _, text in passages]
    candidates = [candidate_token_ids(tokenizer, p) for p in phrases]
    longest = max((len(ids) for c in candidates for ids in c), default=0)  # room for any candidate, then EOS
    answers = generate_texts(
        model, tokenizer, prompts, sample, seed, longest + 1, args.temperature, args.top_p, candidates=candidates
    )
    # the phrase as the passage spells it: a tokenizer that lowercases or splits punctuation decodes it otherwise
    spelt = [
        {tokenizer.decode(ids, skip_special_tokens=True).strip(): phrase for phrase, ids in zip(p, c)}
        for p, c in zip(phrases, candidates)
    ]
    answers = [spelling.get(a.strip(), _strip_edges(a)) for spelling, a in zip(spelt, answers)]
    prompts = [question_for_answer_prompt(tokenizer, title, text, a) for (title, text), a in zip(passages, answers)]
    texts = generate_texts(model, tokenizer, prompts, False, 0, args.max_new_tokens, first_line=True)
    questions = [_first_line(t).strip() for t in texts]
    return [f"{CUE} {q}\n{ANSWER_CUE} {a}" for q, a in zip(questions, answers)]


def generate(
    args: argparse.Namespace, kb: KnowledgeBase, rows: list[int], out: Path
) -> tuple[dict[tuple[int, int], str], int, float]:
    """Generate what generations.jsonl lacks for `rows`; return every stored generation, how many this run made
    (0 when nothing was left) and the seconds it took. Stops after --max_batches batches."""
    path = out / GENERATIONS_FILE
    if drop_unfinished_line(path):
        print(f"{path}: dropped an unfinished last line (a run stopped while writing it)")
    done = read_generations(path)
    tokenizer = load_generator_tokenizer(args.generator_name_or_path)
    kind = prompt_kind(tokenizer)
    check_settings(out, generation_settings(args, kb, kind))
    batches = plan_batches(rows, args.per_passage, set(done), args.batch_size)
    if not batches:
        return done, 0, 0.0
    model = load_generator(args.generator_name_or_path, args.device, args.dtype)
    total = len(rows) * args.per_passage
    bar = tqdm(total=total, initial=total - sum(map(len, batches)), desc="generating", unit="pair")
    made, start = 0, time.perf_counter()
    with path.open("a", encoding="utf-8") as f, bar:
        for number, batch in enumerate(batches):
            if args.max_batches is not None and number >= args.max_batches:
                break
            generate_pair = question_first if args.question_first else answer_first
            texts = generate_pair(
                model,
                tokenizer,
                args,
                [(kb.titles[row], kb.texts[row]) for row, _ in batch],
                sample=batch[0][1] > 0,
                seed=batch_seed(args.seed, *batch[0]),
            )
            records = [{"passage_id": row, "sample": s, "text": t} for (row, s), t in zip(batch, texts)]
            append_generations(f, records)
            done.update(((row, s), t) for (row, s), t in zip(batch, texts))
            made += len(batch)
            bar.update(len(batch))
    return done, made, time.perf_counter() - start


def refilters(out: Path, args: argparse.Namespace) -> bool:
    """A finished output asked for again with other filters (FILTER_FLAGS): its generations are filtered anew and
    the pairs written anew without --overwrite, since nothing generated is lost. Not when its generations file is
    gone or empty: everything would be generated anew over the finished output, which needs --overwrite."""
    stats, generations = out / "stats.json", out / GENERATIONS_FILE
    if not stats.is_file() or not generations.is_file() or generations.stat().st_size == 0:
        return False
    finished = json.loads(stats.read_text(encoding="utf-8"))
    return any(finished.get(flag) != getattr(args, flag) for flag in FILTER_FLAGS)


def main(args: argparse.Namespace) -> dict | None:
    """Generate (or resume), filter and write the outputs; returns the stats, or None when stopped early."""
    out = Path(args.output_dir)
    replace = args.overwrite or refilters(out, args)
    check_output_dir(out, replace)
    kb = load_kb(args.csv_path, args.passages_path)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    kb_csv = verify_kb_csv(out, kb)
    rows = select_passages(len(kb.titles), args.max_passages, args.seed)
    print(f"{kb.source}: {len(kb.documents)} documents, {len(kb.titles)} passages; generating for {len(rows)}")
    try:
        done, made, seconds = generate(args, kb, rows, out)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out / GENERATIONS_FILE} holds every finished batch; rerun the command to resume")
        raise
    wanted = {(row, s): done[row, s] for row in rows for s in range(args.per_passage) if (row, s) in done}
    if len(wanted) < len(rows) * args.per_passage:
        print(
            f"stopped after --max_batches {args.max_batches}: {len(wanted)} of {len(rows) * args.per_passage} "
            f"generations done; rerun the command to continue"
        )
        return None

    pairs, rejected = filter_generations(wanted, kb, args.extractive)
    if args.roundtrip_k is not None:
        pairs, rejected["roundtrip_miss"] = roundtrip_filter(pairs, kb, args)
    splits = split_by_document(pairs, args.val_fraction, args.test_fraction, args.seed)
    stats = {
        "kb": kb.source,
        "generator": args.generator_name_or_path,
        "documents": len(kb.documents),
        "passages": len(kb.titles),
        "selected_passages": len(rows),
        "per_passage": args.per_passage,
        "generations": len(wanted),
        "extractive": args.extractive,
        "roundtrip_k": args.roundtrip_k,
        "rejected": {reason: rejected[reason] for reason in REASONS},
        "kept": len(pairs),
        "documents_per_split": {s: len({p.title for p in splits[s]}) for s in SPLITS},
        "questions": {s: len(splits[s]) for s in SPLITS},
        "questions_without_gold_passage": dict.fromkeys(SPLITS, 0),
    }
    files = {"kb.csv": kb_csv, **split_files(splits), DALM_FILE: dalm_csv(pairs, kb)}
    files["stats.json"] = json.dumps(stats, indent=1) + "\n"  # last: its presence says the rest is written
    assert set(files) == {*OUTPUT_FILES, DALM_FILE}
    write_files(out, files, replace)
    if empty := [f"{split}.source" for split in SPLITS if not splits[split]]:
        warnings.warn(
            f"{out}: {', '.join(empty)} empty ({len(pairs)} pairs kept, from "
            f"{len({p.title for p in pairs})} documents)",
            stacklevel=1,
        )
    n_passages = made / args.per_passage
    rate = f"{n_passages / seconds:.2f} passages/s" if seconds else "nothing left to generate"
    print(
        f"{made} generations ({n_passages:g} passages) in {seconds:.1f} s: {rate}; kept {len(pairs)} of "
        f"{len(wanted)} pairs ({dict(+rejected) or 'none'} rejected); wrote {out}"
    )
    return stats


def cli() -> None:
    """The command line."""
    run_main(main, parse_args())


if __name__ == "__main__":
    cli()
