"""LoRA through peft for any RagModel part (`--peft generator|retriever|both`).

A part's transformer is wrapped in a `peft.PeftModel` where it sits (PooledEncoder.model, DPR's inner
DPREncoder, RagGenerator.model), so the RagModel calls it as before; only the low-rank matrices train.
Checkpoints and the KB refresh use `merged(part)`: a CPU copy with the adapters folded into the weights,
which loads and encodes as a plain model (eval_rag.py and the Ray encoding actors need no peft).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

INNER = ("model", "question_encoder", "ctx_encoder")  # where PooledEncoder, DPR*Encoder and RagGenerator keep it


def _inner(part: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module that holds the transformer, and the attribute it is held under."""
    for attr in INNER:
        if isinstance(getattr(part, attr, None), torch.nn.Module):
            return part, attr
    raise ValueError(f"no transformer found inside {type(part).__name__} to add LoRA to")


def default_targets(model: torch.nn.Module) -> list[str]:
    """peft's attention projections for the model family (BERT: query/value, Llama and BART: q_proj/v_proj)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for targets in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"]):  # DPR holds a BERT
        if set(targets) <= names:
            return targets
    raise ValueError(f"no default LoRA targets for {type(model).__name__}: pass --lora_target_modules")


def add_lora(part: torch.nn.Module, r: int, alpha: int, dropout: float, targets: list[str] | None = None) -> None:
    """Wrap the part's transformer in LoRA adapters, in place; its other weights are frozen."""
    holder, attr = _inner(part)
    model = getattr(holder, attr)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or default_targets(model))
    setattr(holder, attr, get_peft_model(model, config))


def has_lora(part: torch.nn.Module | None) -> bool:
    return part is not None and any(isinstance(m, PeftModel) for m in part.modules())


def train_only_lora(part: torch.nn.Module) -> None:
    """requires_grad on the adapters only (a recipe's freeze() turns the whole part on), and on a learned
    retrieval temperature, which is no weight of the adapted model."""
    for name, param in part.named_parameters():
        param.requires_grad_("lora_" in name or name == "log_temperature")


def merged(part: torch.nn.Module) -> torch.nn.Module:
    """A copy of the part on the CPU with every adapter folded into its weights: a plain model again, for the
    checkpoint export and the KB refresh. The part itself is not changed and is not copied on its own device:
    each parameter and buffer is copied to the CPU one at a time, and peft merges there (a deep copy on the GPU
    needed a second GPU-resident generator at every export: out of memory with a 7-8B one)."""
    if not has_lora(part):
        return part
    # deepcopy takes what `memo` already holds for an object: the CPU copies, which also keeps tied weights tied.
    memo = {}
    for tensor in [*part.parameters(), *part.buffers()]:
        cpu = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = (
            torch.nn.Parameter(cpu, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else cpu
        )
    part = copy.deepcopy(part, memo)
    holder, attr = _inner(part)
    setattr(holder, attr, getattr(holder, attr).merge_and_unload())
    return part


def load_adapter(part: torch.nn.Module, path: str) -> None:
    """The peft adapter saved at `path` (its adapter_config.json and weights: a --peft run's generator_adapter/,
    DALM's, any peft `save_pretrained`) folded into the part's transformer, in place: a plain model again, as an
    export merges it. Refused in one line when the adapter's weights find no module of the part (an adapter of
    another model would otherwise load as nothing and change nothing)."""
    check_adapter(path)
    holder, attr = _inner(part)
    try:
        model = get_peft_model(getattr(holder, attr), PeftConfig.from_pretrained(path))
    except ValueError as err:  # e.g. its target modules are none of this model's
        raise ValueError(f"{path}: {err} (an adapter of another model?)") from None
    result = set_peft_model_state_dict(model, load_peft_weights(path, device="cpu"))
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    if unexpected:
        raise ValueError(
            f"{path}: {len(unexpected)} adapter weights (e.g. {unexpected[0]}) fit no module of "
            f"{type(getattr(holder, attr)).__name__}: an adapter of another model"
        )
    setattr(holder, attr, model.merge_and_unload())


def check_adapter(path: str) -> None:
    """Refuse, before any model loads, a path that holds no peft adapter."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (not a peft adapter directory)")
