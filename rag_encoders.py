"""Any `AutoModel` encoder (BERT, MiniLM, bge, e5, ...) as RAG's question or context encoder, besides DPR.

RAG reads a question encoder as `encoder(ids, attention_mask=mask)[0]` and a context encoder as
`encoder(ids, attention_mask=mask, return_dict=True).pooler_output`: both must be one (B, d) vector per text.
DPR models answer so already; `PooledEncoder` makes any other encoder answer so by pooling its last hidden
state (`cls`: the first token, `mean`: the mean over real tokens, `pooler`: the model's own `pooler_output`),
optionally L2-normalised (e5, bge and MiniLM are trained for cosine similarity).

    q_enc = load_encoder("intfloat/e5-small-v2", pooling="mean", side="question")
    q_tok = with_prefix(AutoTokenizer.from_pretrained("intfloat/e5-small-v2"), "query: ")
    ctx_tok = with_prefix(AutoTokenizer.from_pretrained("intfloat/e5-small-v2"), "passage: ")

One encoder for both sides: pass the same module as question and context encoder, e.g.
`CausalRag(q_enc, ..., ctx_encoder=q_enc, ctx_tokenizer=ctx_tok)`. Its parameters are counted once
(`parameters()` de-duplicates them) and receive the gradients of both sides; a state dict holds them under
both names, so the context side is saved apart (finetune_rag.py already drops `.ctx_encoder.` keys).
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
    DPRContextEncoder,
    DPRQuestionEncoder,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.dpr.modeling_dpr import DPREncoder
from transformers.utils import ModelOutput, cached_file

POOLINGS = ("cls", "mean", "pooler")
POOLING_FILE = "pooling.json"
# side -> the DPR class of that side and the attribute holding its DPREncoder (BERT + optional projection)
DPR_SIDES = {"question": (DPRQuestionEncoder, "question_encoder"), "context": (DPRContextEncoder, "ctx_encoder")}
ST_MODES = {"cls_token": "cls", "mean_tokens": "mean"}  # sentence-transformers' pooling_mode_* names


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
    """An encoder that returns one pooled vector per text, as RAG's question and context encoders must."""

    def __init__(self, model: PreTrainedModel, pooling: str = "cls", normalize: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not supported: use one of {', '.join(POOLINGS)}")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        if pooling != "pooler":
            # An unused pooler gets no gradient, which DDP (find_unused_parameters=False) takes for an error.
            for name, param in model.named_parameters():
                if name.startswith("pooler"):
                    param.requires_grad_(False)

    @property
    def config(self) -> PretrainedConfig:
        """The wrapped model's config (`hidden_size`, `prefix`, ...), as RAG code reads it from encoders."""
        return self.model.config

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, normalize={self.normalize}"

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
                raise ValueError(f"pooling='pooler', but {type(self.model).__name__} returns no pooler_output: "
                                 "use pooling='cls' or 'mean'")  # fmt: skip
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        result = PooledOutput(pooler_output=pooled, last_hidden_state=hidden)
        return result if return_dict else result.to_tuple()

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        pooling: str = "cls",
        normalize: bool = False,
        model_cls: type[PreTrainedModel] | None = None,
    ) -> PooledEncoder:
        """A randomly initialised encoder of this architecture: what a Ray actor builds before `load_state_dict`."""
        if model_cls is None:
            model_cls = DPREncoder if config.model_type == "dpr" else None
        model = model_cls(config) if model_cls else AutoModel.from_config(config, trust_remote_code=False)
        return cls(model, pooling, normalize)

    def factory(self) -> Callable[[PretrainedConfig], PooledEncoder]:
        """`factory(config)` rebuilds this encoder (randomly initialised); picklable, for Ray's `ShardEncoder`."""
        return functools.partial(
            type(self).from_config, pooling=self.pooling, normalize=self.normalize, model_cls=type(self.model)
        )

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """The wrapped model (loadable by AutoModel too) and `pooling.json` beside it."""
        self.model.save_pretrained(directory, **kwargs)
        settings = {"pooling": self.pooling, "normalize": self.normalize}
        (Path(directory) / POOLING_FILE).write_text(json.dumps(settings, indent=1))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        pooling: str | None = None,
        normalize: bool | None = None,
        cache_dir: str | None = None,
        side: str | None = None,
    ) -> PooledEncoder:
        """Load a checkpoint. pooling/normalize: the arguments, else what the checkpoint declares
        (`read_pooling`), else cls without normalising. `side` picks the half of a DPR checkpoint."""
        saved = read_pooling(name_or_path, cache_dir)
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=False)
        model = _load_model(name_or_path, config, cache_dir, side)
        normalize = saved.get("normalize", False) if normalize is None else normalize
        return cls(model, pooling or saved.get("pooling", "cls"), normalize)


def _find(name_or_path: str | os.PathLike, filename: str, cache_dir: str | None, subfolder: str = "") -> str | None:
    """The local path of a checkpoint's file (a directory or the hub cache), or None when it has none."""
    return cached_file(
        name_or_path, filename, cache_dir=cache_dir, subfolder=subfolder, _raise_exceptions_for_gated_repo=False,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    )  # fmt: skip


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
            if modes:  # an unsupported mode (max, lasttoken, ...) is kept, to fail with its name
                settings["pooling"] = "+".join(ST_MODES.get(mode, mode) for mode in modes)
    return settings


def _load_model(
    name_or_path: str | os.PathLike, config: PretrainedConfig, cache_dir: str | None, side: str | None
) -> PreTrainedModel:
    """The model a PooledEncoder wraps: the AutoModel, or for a DPR checkpoint the DPREncoder of its side
    (DPRQuestionEncoder and DPRContextEncoder return no last hidden state, their DPREncoder does)."""
    if config.model_type != "dpr":
        return AutoModel.from_pretrained(name_or_path, config=config, cache_dir=cache_dir, trust_remote_code=False)
    arch = (config.architectures or [None])[0]
    if arch == "DPREncoder":  # saved by PooledEncoder.save_pretrained
        return DPREncoder.from_pretrained(name_or_path, config=config, cache_dir=cache_dir)
    arch_side = {cls.__name__: s for s, (cls, _) in DPR_SIDES.items()}.get(arch)
    side = side or arch_side
    if side not in DPR_SIDES:
        raise ValueError(f"{name_or_path} is a DPR checkpoint ({arch}): give side='question' or 'context'")
    if arch_side not in (None, side):
        raise ValueError(f"{name_or_path} holds a {arch}, not a {side} encoder")
    dpr_cls, attr = DPR_SIDES[side]
    return getattr(dpr_cls.from_pretrained(name_or_path, config=config, cache_dir=cache_dir), attr)


def load_encoder(
    name_or_path: str | os.PathLike,
    pooling: str | None = None,
    cache_dir: str | None = None,
    side: str = "question",
    normalize: bool | None = None,
) -> torch.nn.Module:
    """A question or context encoder from any checkpoint. DPR checkpoints load as DPRQuestionEncoder /
    DPRContextEncoder, unchanged, unless asked for cls/mean pooling or normalising; anything else as a
    PooledEncoder. Remote code is never run."""
    if side not in DPR_SIDES:
        raise ValueError(f"side {side!r}: use 'question' or 'context'")
    config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=False)
    if config.model_type == "dpr":
        saved = read_pooling(name_or_path, cache_dir)
        pooling = pooling or saved.get("pooling", "pooler")
        normalize = saved.get("normalize", False) if normalize is None else normalize
        if pooling == "pooler" and not normalize and (config.architectures or [None])[0] != "DPREncoder":
            return DPR_SIDES[side][0].from_pretrained(name_or_path, config=config, cache_dir=cache_dir)
    return PooledEncoder.from_pretrained(name_or_path, pooling, normalize, cache_dir, side)


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

    def __repr__(self) -> str:
        return f"PrefixedTokenizer({self.prefix!r}, {self.tokenizer!r})"


def with_prefix(tokenizer, prefix: str | None):
    """`tokenizer` with `prefix` before every text; the tokenizer itself when there is no prefix."""
    return PrefixedTokenizer(tokenizer, prefix) if prefix else tokenizer
