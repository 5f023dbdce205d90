"""rag_settings.json, typed: everything but weights that a RagModel is built from (how it retrieves, scores,
prompts, smooths and decodes). `RagModel.save_pretrained` writes it and `RagModel.from_pretrained` builds the model
from it; model assembly, export and evaluation read and change it only through `RagSettings`, so its keys are
named here alone.

    settings = RagSettings.from_json("OUT/checkpoint120/rag_settings.json")  # refuses unknown or missing keys
    settings = settings.replace(n_docs=3)                                     # refuses unknown names
    settings.to_json(path)                                                    # atomic: a temporary file, renamed

The file keeps the format earlier versions wrote (the same keys; the generator's `template` and `max_length`
only with a generator), so their checkpoints and exports load, and what they load writes back byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETTINGS_FILE = "rag_settings.json"
CHECKPOINT_DIR = "checkpoint{step}"  # a run's model directories (RagModel.save_pretrained), one per kept step
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint(\d+)$")  # not `checkpoint12.tmp-*`, a save still being written
MARGINALS = ("token", "sequence")
DOC_SCORES = ("fresh", "stored")
# tau per similarity: 1 leaves dot products as DPR was trained; 0.05 is the scale (20) of the
# MultipleNegativesRankingLoss that all-MiniLM-L6-v2 and most sentence-transformers were trained with.
DEFAULT_TEMPERATURE = {"dot": 1.0, "cosine": 0.05, "l2": 1.0}  # l2: the plain negative squared distance
_TAUS = ", ".join(f"{similarity} {tau:g}" for similarity, tau in DEFAULT_TEMPERATURE.items())  # for the docs
QUESTION_MAX_LENGTH = 512  # the truncation of questions where a run saved none
# Decoding of a checkpoint that saved none (a transformers RAG checkpoint): the reference eval_rag.py's defaults,
# as RagModel.generate's keyword arguments.
FALLBACK_GENERATION = {"num_beams": 4, "max_new_tokens": 50}


class SettingsError(ValueError):
    """A rag_settings.json (or a change to one) that names an unknown key, lacks a required one or has a value of
    the wrong type or choice; the message names the file and the key."""


def _doc(text: str, **meta: Any) -> dict:
    return {"doc": text, **meta}


@dataclass(frozen=True)
class Scoring:
    """How the question encoder makes and scores its vectors (the file's `question_encoder`; a pooled encoder's
    pooling.json holds the same). A DPR encoder used as saved declares its similarity alone."""

    pooling: str | None = field(default=None, metadata=_doc("cls, mean or pooler; null: a DPR encoder's own"))
    normalize: bool | None = field(default=None, metadata=_doc("L2-normalised vectors (cosine)"))
    similarity: str | None = field(default=None, metadata=_doc("dot, cosine or l2; null: as the encoder declares"))
    temperature: float | None = field(
        default=None,
        metadata=_doc(f"tau: doc scores are similarity / tau (null: the similarity's default, {_TAUS})"),
    )
    learn_temperature: bool | None = field(default=None, metadata=_doc("tau is learned (as log tau)"))

    def rescored(self, similarity: str | None, temperature: float | None, learn: bool = False) -> Scoring:
        """This scoring as a run's --similarity, --retrieval_temperature and --learn_temperature change it: itself
        when they change nothing (same similarity, no tau, tau not learned), else the similarity asked for (or the
        current one) with the tau asked for or that similarity's default. A DPR encoder's own pooler stays its
        pooling (`pooler`) once it is wrapped to scale or normalise."""
        chosen = similarity or self.similarity
        if chosen == self.similarity and temperature is None and not learn:
            return self
        chosen = chosen or "dot"
        tau = DEFAULT_TEMPERATURE[chosen] if temperature is None else float(temperature)
        return Scoring(self.pooling or "pooler", chosen == "cosine", chosen, tau, bool(learn))


@dataclass(frozen=True)
class Generation:
    """How the run decoded its test answers (--num_beams, --test_max_target_length): eval_rag.py and
    RagModel.answer decode alike unless told otherwise."""

    num_beams: int | None = field(
        default=None, metadata=_doc(f"beams, RAG-sequence with seq2seq (null: {FALLBACK_GENERATION['num_beams']})")
    )
    max_new_tokens: int | None = field(
        default=None, metadata=_doc(f"new tokens per answer (null: {FALLBACK_GENERATION['max_new_tokens']})")
    )

    def decoding(self, max_new_tokens: int | None = None, num_beams: int | None = None) -> Generation:
        """The decoding to use: each argument, else this run's, else FALLBACK_GENERATION's (all set)."""
        fallback = Generation(**FALLBACK_GENERATION)
        beams = self.num_beams if self.num_beams is not None else fallback.num_beams
        tokens = self.max_new_tokens if self.max_new_tokens is not None else fallback.max_new_tokens
        return Generation(num_beams=num_beams or beams, max_new_tokens=max_new_tokens or tokens)


@dataclass(frozen=True, kw_only=True)
class RagSettings:
    """rag_settings.json. Fields in the file's key order; a field without a default is required."""

    n_docs: int = field(default=5, metadata=_doc("passages per question"))
    marginal: str = field(default="token", metadata=_doc("token or sequence: the RAG marginal (--model_type rag_*)"))
    question_prefix: str = field(default="", metadata=_doc('put before each question (e5: "query: ")'))
    question_max_length: int | None = field(
        default=None, metadata=_doc(f"question truncation in tokens (null: {QUESTION_MAX_LENGTH})")
    )
    rerank_top: int = field(
        default=0, metadata=_doc("passages fetched, then re-ranked with fresh embeddings (Atlas; 0: none)")
    )
    doc_scores: str = field(
        default="stored",
        metadata=_doc("fresh: from the saved context encoder (then loaded by default); stored: the KB's vectors"),
    )
    generation: Generation = field(
        default_factory=Generation, metadata=_doc("how --do_predict decoded; eval_rag.py and answer() decode alike")
    )
    passage_prefix: str | None = field(default=None, metadata=_doc("put before each passage title (--passage_prefix)"))
    question_encoder: Scoring = field(metadata=_doc("how the question encoder pools and scores"))
    generator_family: str | None = field(metadata=_doc("seq2seq, causal, or null (retriever_only: no generator)"))
    template: str | None = field(
        default=None, metadata=_doc("the prompt; null: the family's default", with_generator=True)
    )
    max_length: int | None = field(
        default=None, metadata=_doc("prompt (+ answer) tokens of the generator", with_generator=True)
    )
    label_smoothing: float = field(default=0.0, metadata=_doc("label smoothing of the marginal (training only)"))

    def __post_init__(self) -> None:
        for name, choices in (("marginal", MARGINALS), ("doc_scores", DOC_SCORES)):
            if getattr(self, name) not in choices:
                raise SettingsError(f"{name} {getattr(self, name)!r}: use one of {', '.join(choices)}")
        if self.n_docs < 1:  # FAISS's bare `assert k > 0` otherwise, at the first question
            raise SettingsError(f"n_docs {self.n_docs}: passages per question must be >= 1")
        if self.rerank_top < 0 or (self.question_max_length is not None and self.question_max_length < 1):
            raise SettingsError(
                f"rerank_top {self.rerank_top} must be >= 0 and question_max_length {self.question_max_length} >= 1"
            )
        if not 0 <= self.label_smoothing < 1:
            raise SettingsError(f"label_smoothing {self.label_smoothing}: must be in [0, 1)")

    # ------------------------------------------------------------------ changes

    def replace(self, **changes: Any) -> RagSettings:
        """A copy with `changes` (field names); an unknown name is refused, naming it."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}: the settings are {', '.join(names)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the file

    def to_dict(self) -> dict:
        """The file's JSON object: nested settings without their unset (None) entries, the generator's fields only
        with a generator, as earlier versions wrote it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("with_generator") and self.generator_family is None:
                continue
            out[f.name] = _nested_dict(value) if dataclasses.is_dataclass(value) else value
        return out

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the file atomically: a temporary file beside it, renamed over it (a reader never sees half)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "settings") -> RagSettings:
        """The settings of a file's JSON object; `source` (the file) is named in every refusal."""
        values = _typed(cls, data, source, "")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata.get("with_generator") and values.get("generator_family") and f.name not in data
        ]
        if missing:
            raise SettingsError(f"{source}: missing key {missing[0]!r} (required with a generator)")
        try:
            return cls(**values)
        except SettingsError as e:
            raise SettingsError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RagSettings:
        """Read rag_settings.json; unknown or missing required keys, wrong types and bad choices are refused,
        naming the file and the key. A missing optional key takes its default (what earlier loaders assumed)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SettingsError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(data, str(path))


def _nested_dict(value: Any) -> dict:
    return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}


def _typed(cls: type, data: Any, source: str, prefix: str) -> dict:
    """`data`'s entries checked against `cls`'s fields: no unknown key, every required one, each of its type
    (an int where a float goes becomes a float); nested settings become their dataclass."""
    where = prefix.rstrip(".") or "the file"
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: {where} is {type(data).__name__}, expected a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise SettingsError(f"{source}: unknown key {prefix + key!r} (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SettingsError(f"{source}: missing key {prefix + name!r}")
            continue
        values[name] = _value(hints[name], data[name], source, prefix + name)
    return values


def _value(hint: Any, value: Any, source: str, key: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if dataclasses.is_dataclass(option):
            if isinstance(value, dict):
                return option(**_typed(option, value, source, key + "."))
        elif option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif option in (str, bool) and isinstance(value, option):
            return value
    expected = " or ".join(
        "null" if o is type(None) else "an object" if dataclasses.is_dataclass(o) else o.__name__ for o in options
    )
    raise SettingsError(f"{source}: key {key!r} is {json.dumps(value)}, expected {expected}")


def settings_table() -> str:
    """The Markdown table of rag_settings.json's keys (docs/outputs.md holds it; a test keeps them equal)."""
    rows = ["| key | type | default | what |", "|---|---|---|---|"]
    hints = typing.get_type_hints(RagSettings)
    for f in dataclasses.fields(RagSettings):
        rows.append(_row(f.name, hints[f.name], f))
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested = typing.get_type_hints(hint)
            rows += [_row(f"{f.name}.{g.name}", nested[g.name], g) for g in dataclasses.fields(hint)]
    return "\n".join(rows) + "\n"


def _row(name: str, hint: Any, f: dataclasses.Field) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kind = " or ".join(
        "null" if o is type(None) else "object" if dataclasses.is_dataclass(o) else o.__name__ for o in options
    )
    if f.default is not dataclasses.MISSING:
        default = "null" if f.default is None else json.dumps(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        default = json.dumps(_nested_dict(f.default_factory()))
    else:
        default = "required"
    if f.metadata.get("with_generator"):
        default += " (required with a generator)"
    return f"| `{name}` | {kind} | {default} | {f.metadata['doc']} |"


__all__ = [
    "DEFAULT_TEMPERATURE",
    "FALLBACK_GENERATION",
    "QUESTION_MAX_LENGTH",
    "SETTINGS_FILE",
    "Generation",
    "RagSettings",
    "Scoring",
    "SettingsError",
]


def checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    """The model directory of a run's step: `run/checkpoint<step>`."""
    return Path(run) / CHECKPOINT_DIR.format(step=step)


def checkpoint_dirs_in(run: str | os.PathLike) -> list[Path]:
    """The `checkpoint<step>` model directories of a run directory, in step order."""
    found = [(int(m[1]), p) for p in Path(run).iterdir() if (m := CHECKPOINT_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def refuse_training_state(path: str | os.PathLike) -> None:
    """A Lightning `.ckpt` (the training state that --resume reads) given where a model is read: refused in one line
    that names the model directory to pass instead (every run ends with one of its final weights)."""
    path = Path(path)
    if path.suffix != ".ckpt" or not path.is_file():
        return
    models = checkpoint_dirs_in(path.parent)
    instead = f"e.g. {models[-1]} (the latest)" if models else f"none is in {path.parent}: train on, or export one"
    raise FileNotFoundError(
        f"{path}: a Lightning training state (what --resume reads), not a model: pass a checkpoint<step> directory "
        f"of its run, {instead}"
    )
