"""Any `AutoModel` encoder (BERT, MiniLM, bge, e5, ...) as RAG's question or context encoder, besides DPR.

RAG reads a question encoder as `encoder(ids, attention_mask=mask)[0]` and a context encoder as
`encoder(ids, attention_mask=mask, return_dict=True).pooler_output`: both must be one (B, d) vector per text.
DPR models answer so already; `PooledEncoder` makes any other encoder answer so by pooling its last hidden
state (`cls`: the first token, `mean`: the mean over real tokens, `pooler`: the model's own `pooler_output`).

Similarity is part of an encoder's identity: `dot` (DPR), `cosine` (e5, bge and MiniLM were trained for it:
the pooled vector is L2-normalised) or `l2` (negative squared Euclidean distance, as FAISS's IndexFlatL2 ranks). It
is read from what a checkpoint declares (our pooling.json, or a sentence-transformers `Normalize` module) unless
overridden. A question encoder also carries the retrieval temperature tau: for dot and cosine it returns q / tau, so
that RAG's doc scores q.d become similarity / tau before the softmax over passages in rag_model.RagModel, and FAISS
rankings are unchanged; for l2 it returns q itself (a point of the passages' space, which an L2 index searches) and
`passage_scores` divides -||q - d||^2 by tau.
Cosine scores lie in [-1, 1]: without a small tau the passage softmax is almost uniform.

    q_enc = load_encoder("intfloat/e5-small-v2", pooling="mean", side="question")
    q_tok = with_prefix(AutoTokenizer.from_pretrained("intfloat/e5-small-v2"), "query: ")
    ctx_tok = with_prefix(AutoTokenizer.from_pretrained("intfloat/e5-small-v2"), "passage: ")

One encoder for both sides: pass the same module as question and context encoder, e.g.
`RagModel(q_enc, q_tok, generator, ctx_encoder=q_enc, ctx_tokenizer=ctx_tok)`. Its parameters are counted once
(`parameters()` de-duplicates them) and receive the gradients of both sides; a state dict holds them under
both names; RagModel.save_pretrained saves each side in its own directory.
The Ray encoding actors rebuild either kind as `encoder_factory(encoder)(encoder.config)`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.dpr.modeling_dpr import DPREncoder
from transformers.utils import ModelOutput, cached_file

from rag_end2end.model.settings import DEFAULT_TEMPERATURE, Scoring
from rag_end2end.options import SIMILARITIES
from rag_end2end.precision import LOAD_DTYPE, float32_scores

POOLINGS = ("cls", "mean", "pooler")
# SIMILARITIES: options (the flags' choices); DEFAULT_TEMPERATURE (tau per similarity): model.settings
MIN_TEMPERATURE = 0.01  # a learned tau is clamped here (CLIP's bound), so scores stay finite
POOLING_FILE = "pooling.json"
PREFIX_FILE = "text_prefix.json"  # the prefix a PrefixedTokenizer puts before texts, saved beside it
# side -> the DPR class of that side and the attribute holding its DPREncoder (BERT + optional projection)
DPR_SIDES = {"question": (DPRQuestionEncoder, "question_encoder"), "context": (DPRContextEncoder, "ctx_encoder")}
ST_MODES = {"cls_token": "cls", "mean_tokens": "mean"}  # sentence-transformers' pooling_mode_* names (before 5)


@dataclass
class PooledOutput(ModelOutput):
    """The pooled (B, d) vector first, so that `out[0]` and `out.pooler_output` are the same tensor."""

    pooler_output: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # read (as None) by transformers' RagModel
    attentions: tuple[torch.Tensor, ...] | None = None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the token vectors, padding excluded; summed in float32 so that fp16 sums cannot overflow."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask[:, :, None].float()
    return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).to(hidden.dtype)


class PooledEncoder(torch.nn.Module):
    """An encoder that returns one pooled vector per text, as RAG's question and context encoders must:
    L2-normalised for cosine similarity, and divided by the retrieval temperature (question side)."""

    def __init__(
        self,
        model: PreTrainedModel,
        pooling: str = "cls",
        normalize: bool = False,
        temperature: float | None = None,
        learn_temperature: bool = False,
        similarity: str | None = None,
    ):
        """temperature: tau of a question encoder (its dot or cosine vectors are divided by it); None on the context
        side. similarity, when given, decides `normalize` (cosine) and l2 (vectors unscaled, scored by distance)."""
        super().__init__()
        if similarity is not None and similarity not in SIMILARITIES:
            raise ValueError(f"similarity {similarity!r}: use one of {', '.join(SIMILARITIES)}")
        if similarity is not None:
            normalize = similarity == "cosine"
        self.l2 = similarity == "l2"
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not supported: use one of {', '.join(POOLINGS)}")
        if temperature is not None and temperature < MIN_TEMPERATURE:
            raise ValueError(f"retrieval temperature {temperature} is below {MIN_TEMPERATURE}")
        if learn_temperature and temperature is None:
            raise ValueError("a learned temperature needs a starting value")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.learn_temperature = learn_temperature
        if learn_temperature:  # learned as log tau, so that it stays positive
            self.log_temperature = torch.nn.Parameter(torch.tensor(float(temperature)).log())
        else:
            self.fixed_temperature = temperature
        self.freeze_unused_pooler()

    def freeze_unused_pooler(self) -> None:
        """Freeze the model's pooler unless it pools with it: an unused pooler gets no gradient, which DDP
        (find_unused_parameters=False) takes for an error. Again after `requires_grad_(True)` (recipes.freeze)."""
        if self.pooling != "pooler":
            for name, param in self.model.named_parameters():
                if name.startswith("pooler"):
                    param.requires_grad_(False)

    @property
    def config(self) -> PretrainedConfig:
        """The wrapped model's config (`hidden_size`, `prefix`, ...), as RAG code reads it from encoders."""
        return self.model.config

    @property
    def similarity(self) -> str:
        return "cosine" if self.normalize else "l2" if self.l2 else "dot"

    @property
    def temperature(self) -> torch.Tensor | float | None:
        """tau, by which a question encoder divides its vectors; None on the context side."""
        if self.learn_temperature:
            return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)
        return self.fixed_temperature

    @property
    def temperature_value(self) -> float | None:
        """tau as a plain number (detached), for saving and logging."""
        tau = self.temperature
        return float(tau.detach()) if isinstance(tau, torch.Tensor) else tau

    def settings(self) -> dict:
        """What pooling.json declares: how texts become vectors and how vectors are scored."""
        settings = {"pooling": self.pooling, "normalize": self.normalize, "similarity": self.similarity}
        if self.temperature is not None:
            settings |= {"temperature": self.temperature_value, "learn_temperature": self.learn_temperature}
        return settings

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PooledOutput | tuple[torch.Tensor, ...]:
        """The pooled vectors (B, d) and the last hidden state (B, T, d)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # not every model takes them
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "mean":
            pooled = mean_pool(hidden, attention_mask)
        else:
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ValueError(
                    f"pooling='pooler', but {type(self.model).__name__} returns no pooler_output: "
                    "use pooling='cls' or 'mean'"
                )
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        if not self.l2 and (self.learn_temperature or self.fixed_temperature not in (None, 1.0)):
            pooled = pooled / self.temperature
        result = PooledOutput(pooler_output=pooled, last_hidden_state=hidden)
        return result if return_dict else result.to_tuple()

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        pooling: str = "cls",
        normalize: bool = False,
        model_cls: type[PreTrainedModel] | None = None,
        temperature: float | None = None,
        learn_temperature: bool = False,
        similarity: str | None = None,
    ) -> PooledEncoder:
        """A randomly initialised encoder of this architecture: what a Ray actor builds before `load_state_dict`."""
        if model_cls is None:
            model_cls = DPREncoder if config.model_type == "dpr" else None
        model = model_cls(config) if model_cls else AutoModel.from_config(config, trust_remote_code=False)
        return cls(model, pooling, normalize, temperature, learn_temperature, similarity)

    def factory(self) -> Callable[[PretrainedConfig], PooledEncoder]:
        """`factory(config)` rebuilds this encoder (randomly initialised); picklable, for Ray's `ShardEncoder`."""
        return functools.partial(
            type(self).from_config,
            pooling=self.pooling,
            normalize=self.normalize,
            temperature=self.temperature_value,
            learn_temperature=self.learn_temperature,
            similarity=self.similarity,
            model_cls=type(self.model),
        )

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """The wrapped model (loadable by AutoModel too) and `pooling.json` beside it (with the current tau)."""
        self.model.save_pretrained(directory, **kwargs)
        (Path(directory) / POOLING_FILE).write_text(json.dumps(self.settings(), indent=1))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        pooling: str | None = None,
        similarity: str | None = None,
        cache_dir: str | None = None,
        side: str | None = None,
        temperature: float | None = None,
        learn_temperature: bool | None = None,
    ) -> PooledEncoder:
        """Load a checkpoint. Each setting: the argument, else what the checkpoint declares (`read_pooling`),
        else cls pooling, dot similarity and that similarity's default tau (question side; none for passages).
        `side` picks the half of a DPR checkpoint."""
        saved = read_pooling(name_or_path, cache_dir)
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=False)
        model = _load_model(name_or_path, config, cache_dir, side)
        similarity, temperature, learn = _scoring(saved, side or "question", similarity, temperature, learn_temperature)
        return cls(
            model, pooling or saved.get("pooling", "cls"), similarity == "cosine", temperature, learn, similarity
        )


def declared_similarity(settings: dict) -> str:
    """The similarity a pooling.json (or sentence-transformers) declaration names; dot when it names none."""
    return settings.get("similarity") or ("cosine" if settings.get("normalize") else "dot")


def encoder_similarity(encoder: torch.nn.Module) -> str:
    """How an encoder's vectors are meant to be compared: a PooledEncoder says; DPR's are dot products."""
    return encoder.similarity if isinstance(encoder, PooledEncoder) else "dot"


def passage_scores(
    equation: str, q: torch.Tensor, d: torch.Tensor, question_encoder: torch.nn.Module | None
) -> torch.Tensor:
    """Doc scores of question vectors `q` against passage vectors `d` in float32 outside autocast (`equation`:
    "bd,bnd->bn" for each question's own passages, "bd,pd->bp" for every passage of a batch): q.d for dot and
    cosine (q carries 1/tau), -||q - d||^2 / tau for l2 (tau: the question encoder's; learned ones get gradient).
    The one place where a similarity becomes a score: RAG's doc scores, reranking and InfoNCE all call it."""
    scores = float32_scores(equation, q, d)
    if encoder_similarity(question_encoder) != "l2":
        return scores
    q_sq = q.float().pow(2).sum(-1, keepdim=True)  # (B, 1)
    d_sq = d.float().pow(2).sum(-1)  # (B, n) or (P,)
    return -(q_sq - 2 * scores + d_sq) / question_encoder.temperature


def encoder_scoring(encoder: torch.nn.Module) -> Scoring:
    """How a question encoder scores (rag_settings.json's `question_encoder`): a PooledEncoder's pooling.json
    settings; a DPR encoder's dot products (at tau 1)."""
    return Scoring(**encoder.settings()) if isinstance(encoder, PooledEncoder) else Scoring(similarity="dot")


def _scoring(
    saved: dict, side: str, similarity: str | None, temperature: float | None, learn: bool | None
) -> tuple[str, float | None, bool]:
    """(similarity, tau, learn tau): each the argument, else the checkpoint's declaration, else the default.
    Passages are never scaled (tau None); a saved tau applies only with the similarity it was saved with."""
    if similarity is not None and similarity not in SIMILARITIES:
        raise ValueError(f"similarity {similarity!r}: use one of {', '.join(SIMILARITIES)}")
    chosen = similarity or declared_similarity(saved)
    if side != "question":
        return chosen, None, False
    if temperature is None:
        same = declared_similarity(saved) == chosen
        temperature = saved.get("temperature") if same else None
        temperature = temperature or DEFAULT_TEMPERATURE[chosen]
    learn = bool(saved.get("learn_temperature", False)) if learn is None else learn
    return chosen, float(temperature), learn


def _find(name_or_path: str | os.PathLike, filename: str, cache_dir: str | None, subfolder: str = "") -> str | None:
    """The local path of a checkpoint's file (a directory or the hub cache), or None when it has none."""
    return cached_file(
        name_or_path,
        filename,
        cache_dir=cache_dir,
        subfolder=subfolder,
        _raise_exceptions_for_gated_repo=False,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )


def read_pooling(name_or_path: str | os.PathLike, cache_dir: str | None = None) -> dict:
    """{"pooling": ..., "normalize": ...} that a checkpoint declares: our pooling.json, else the Pooling and
    Normalize modules of a sentence-transformers checkpoint (all-MiniLM, bge, e5 ship them); {} if neither."""
    if path := _find(name_or_path, POOLING_FILE, cache_dir):
        return json.loads(Path(path).read_text())
    if not (path := _find(name_or_path, "modules.json", cache_dir)):
        return {}
    modules = json.loads(Path(path).read_text())
    settings = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith(".Pooling"):
            path = _find(name_or_path, "config.json", cache_dir, subfolder=module.get("path", ""))
            flags = json.loads(Path(path).read_text()) if path else {}
            modes = [key[len("pooling_mode_") :] for key, on in flags.items() if key.startswith("pooling_mode_") and on]
            named = flags.get("pooling_mode")  # sentence-transformers >= 5 writes {"pooling_mode": "mean"}
            modes += [named] if isinstance(named, str) else list(named or [])
            if modes:  # an unsupported mode (max, lasttoken, ...) is kept, to fail with its name
                settings["pooling"] = "+".join(ST_MODES.get(mode, mode) for mode in modes)
    return settings


def _load_model(
    name_or_path: str | os.PathLike, config: PretrainedConfig, cache_dir: str | None, side: str | None
) -> PreTrainedModel:
    """The model a PooledEncoder wraps, in float32 (precision.py): the AutoModel, or for a DPR checkpoint the
    DPREncoder of its side (DPRQuestionEncoder and DPRContextEncoder return no last hidden state, their DPREncoder
    does)."""
    if config.model_type != "dpr":
        return AutoModel.from_pretrained(
            name_or_path, config=config, cache_dir=cache_dir, trust_remote_code=False, dtype=LOAD_DTYPE
        )
    arch = (config.architectures or [None])[0]
    if arch == "DPREncoder":  # saved by PooledEncoder.save_pretrained
        return DPREncoder.from_pretrained(name_or_path, config=config, cache_dir=cache_dir, dtype=LOAD_DTYPE)
    arch_side = {cls.__name__: s for s, (cls, _) in DPR_SIDES.items()}.get(arch)
    side = side or arch_side
    if side not in DPR_SIDES:
        raise ValueError(f"{name_or_path} is a DPR checkpoint ({arch}): give side='question' or 'context'")
    if arch_side not in (None, side):
        raise ValueError(f"{name_or_path} holds a {arch}, not a {side} encoder")
    dpr_cls, attr = DPR_SIDES[side]
    return getattr(dpr_cls.from_pretrained(name_or_path, config=config, cache_dir=cache_dir, dtype=LOAD_DTYPE), attr)


def load_encoder(
    name_or_path: str | os.PathLike,
    pooling: str | None = None,
    cache_dir: str | None = None,
    side: str = "question",
    similarity: str | None = None,
    temperature: float | None = None,
    learn_temperature: bool | None = None,
) -> torch.nn.Module:
    """A question or context encoder from any checkpoint. DPR checkpoints load as DPRQuestionEncoder /
    DPRContextEncoder, unchanged, unless asked for cls/mean pooling, cosine similarity or a temperature;
    anything else as a PooledEncoder. Weights load in float32 whatever dtype the checkpoint declares (precision.py);
    remote code is never run."""
    if side not in DPR_SIDES:
        raise ValueError(f"side {side!r}: use 'question' or 'context'")
    config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=False)
    if config.model_type == "dpr":
        saved = read_pooling(name_or_path, cache_dir)
        pooling = pooling or saved.get("pooling", "pooler")
        sim, tau, learn = _scoring(saved, side, similarity, temperature, learn_temperature)
        plain = sim == "dot" and tau in (None, 1.0) and not learn
        if pooling == "pooler" and plain and (config.architectures or [None])[0] != "DPREncoder":
            return DPR_SIDES[side][0].from_pretrained(
                name_or_path, config=config, cache_dir=cache_dir, dtype=LOAD_DTYPE
            )
    return PooledEncoder.from_pretrained(
        name_or_path, pooling, similarity, cache_dir, side, temperature, learn_temperature
    )


def with_scoring(
    encoder: torch.nn.Module, similarity: str | None, temperature: float | None, learn_temperature: bool = False
) -> torch.nn.Module:
    """A loaded question encoder (e.g. the DPR one inside a RAG checkpoint) scoring with `similarity` and tau, as
    `Scoring.rescored` rules; the encoder itself when nothing changes. A DPR encoder is wrapped as a PooledEncoder
    over its DPREncoder, unless the result is its own dot products at tau 1."""
    pooled = isinstance(encoder, PooledEncoder)
    declared = encoder_scoring(encoder)
    target = declared.rescored(similarity, temperature, learn_temperature)
    plain_dpr = (
        not pooled and target.similarity == "dot" and target.temperature in (None, 1.0) and not target.learn_temperature
    )
    if target == declared or plain_dpr:
        return encoder
    inner = encoder.model if pooled else getattr(encoder, DPR_SIDES["question"][1], None)
    if inner is None:
        raise ValueError(f"cannot set the similarity of a {type(encoder).__name__}")
    return PooledEncoder(
        inner, target.pooling, target.normalize, target.temperature, target.learn_temperature, target.similarity
    )


def context_side(question_encoder: torch.nn.Module) -> torch.nn.Module:
    """The context encoder of `--shared_encoder`: the same transformer, pooled and normalised alike, unscaled."""
    if isinstance(question_encoder, PooledEncoder):
        return PooledEncoder(question_encoder.model, question_encoder.pooling, similarity=question_encoder.similarity)
    return question_encoder


def encoder_factory(encoder: torch.nn.Module) -> Callable[[PretrainedConfig], torch.nn.Module]:
    """What rebuilds `encoder` from `encoder.config` in a Ray actor (ShardEncoder's `encoder_cls`)."""
    return encoder.factory() if isinstance(encoder, PooledEncoder) else type(encoder)


class PrefixedTokenizer:
    """A tokenizer that puts `prefix` before every text it encodes (e5's "query: " / "passage: "): single texts
    and the first text of (title, text) pairs. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, prefix: str):
        self.tokenizer, self.prefix = tokenizer, prefix

    def _prefixed(self, text):
        if text is None or isinstance(text, str):
            return text if text is None else self.prefix + text
        return [self._prefixed(t) if isinstance(t, str) else (self.prefix + t[0], *t[1:]) for t in text]

    def __call__(self, text=None, *args, **kwargs):
        if kwargs.get("is_split_into_words"):
            raise ValueError("PrefixedTokenizer takes texts, not pre-split words")
        return self.tokenizer(self._prefixed(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs) -> list[int]:
        return self.tokenizer.encode(self._prefixed(text), *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "tokenizer":  # not yet set while unpickling: no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs):
        """The wrapped tokenizer and the prefix (`text_prefix.json`), which `load_tokenizer` puts back."""
        files = self.tokenizer.save_pretrained(directory, **kwargs)
        (Path(directory) / PREFIX_FILE).write_text(json.dumps({"prefix": self.prefix}))
        return files

    def __repr__(self) -> str:
        return f"PrefixedTokenizer({self.prefix!r}, {self.tokenizer!r})"


def with_prefix(tokenizer, prefix: str | None):
    """`tokenizer` with `prefix` before every text; the tokenizer itself when there is no prefix."""
    return PrefixedTokenizer(tokenizer, prefix) if prefix else tokenizer


def saved_prefix(name_or_path: str | os.PathLike, cache_dir: str | None = None) -> str | None:
    """The prefix a saved PrefixedTokenizer declares (`text_prefix.json`), or None."""
    path = _find(name_or_path, PREFIX_FILE, cache_dir)
    return json.loads(Path(path).read_text())["prefix"] if path else None


def check_tokenizer(tokenizer, encoder: torch.nn.Module, what: str = "encoder") -> None:
    """Refuse a tokenizer that does not fit its encoder, naming the directory it came from: more tokens than the
    encoder's embedding table has rows (ids past it), or fewer than half of them. The second is what a directory
    without its `tokenizer.json` gives (transformers then builds one from whatever else is there, e.g. a vocab.txt of
    the special tokens alone): every word would become [UNK], and training and refreshes would go on, silently."""
    rows = getattr(getattr(encoder, "config", None), "vocab_size", None)
    if not rows:
        return
    size = len(tokenizer)
    if rows // 2 <= size <= rows:
        return
    source = str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    why = (
        f"ids up to {size - 1} would index past the table"
        if size > rows
        else "most words would become its unknown token"
    )
    held = ""
    if Path(source).is_dir():
        held = f" (the directory holds {', '.join(sorted(p.name for p in Path(source).iterdir())) or 'nothing'})"
    raise ValueError(
        f"{source}: its tokenizer has {size:,} tokens, the {what}'s embedding table {rows:,} rows: {why}; is its "
        f"tokenizer.json missing{held}? Save the encoder's own tokenizer there"
        + (" (or name its directory with --context_encoder_tokenizer_name)" if what == "context encoder" else "")
    )


def load_tokenizer(name_or_path: str | os.PathLike, prefix: str | None = None, cache_dir: str | None = None):
    """AutoTokenizer with the prefix it was saved with (or `prefix`, which wins)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
    return with_prefix(tokenizer, prefix if prefix is not None else saved_prefix(name_or_path, cache_dir))
