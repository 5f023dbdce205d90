"""The GPU path: every recipe a few CUDA steps in bf16-mixed and in 16-mixed, a bf16-saved generator trained with
float32 master weights, end-to-end training in bf16-mixed with a refresh whose encoding actor shares the GPU, bf16
encoding against float32, and the model's loss and answers on CUDA against CPU. Skipped without CUDA;
bench/gpu_check.sh runs them on a lent GPU (`pytest -m gpu tests/test_gpu.py`; it allows them 190 s).

Devices are recorded during training (a callback): when `fit` returns, Lightning's strategy teardown has moved
the module back to the CPU (pytorch_lightning/strategies/strategy.py, Strategy.teardown: `lightning_module.cpu()`).
"""

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import pytorch_lightning as pl
import ray
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rag_end2end.kb.encoding import encode_token_ids
from rag_end2end.kb.passages import tokenize_passages
from rag_end2end.model.encoders import load_encoder, load_tokenizer
from rag_end2end.model.rag import RagModel
from rag_end2end.model.settings import FALLBACK_GENERATION, Generation
from rag_end2end.recipes import MODES
from rag_end2end.training import finetune as finetune_rag

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda"  # the device these tests are about (every test here is skipped without one)
ACCELERATOR = {"cuda": "gpu", "cpu": "cpu"}[DEVICE]
DUMMY_DATA = Path(__file__).resolve().parents[1] / "test_run" / "dummy-train-data"
STEPS = 3  # optimizer steps a recipe run takes: enough for a step after the first (optimizer state exists)


class DuringTraining(pl.Callback):
    """What training ran on, recorded after every training batch (after `fit`, the module is on the CPU again):
    the device types of all the module's parameters, the dtypes of the ones that train, the losses, the precision."""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.trained_dtypes: set[torch.dtype] = set()
        self.losses: list[float] = []
        self.precision = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.devices |= {p.device.type for p in pl_module.parameters()}
        self.trained_dtypes |= {p.dtype for p in pl_module.parameters() if p.requires_grad}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.precision = trainer.precision


def train(argv: list[str]) -> tuple[finetune_rag.GenerativeQAModule, DuringTraining]:
    """finetune_rag.main() on `argv` with a DuringTraining callback added to the Trainer it builds; the run's
    retrieval actors are killed after."""
    seen = DuringTraining()

    class Trainer(pl.Trainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            kwargs.update(enable_progress_bar=False, enable_model_summary=False)
            super().__init__(*args, callbacks=[*(callbacks or []), seen], **kwargs)

    with mock.patch.object(finetune_rag.pl, "Trainer", Trainer):
        module = finetune_rag.main(finetune_rag.parse_args(argv))
    for actor in module.retriever.actors:
        ray.kill(actor)
    return module, seen


def assert_trained_on_the_gpu(module, seen: DuringTraining, precision: str, steps: int) -> None:
    assert seen.devices == {DEVICE}, f"parameters on {seen.devices} during training"
    # Mixed precision keeps float32 master weights: bf16/fp16 is autocast's, per op, never the weights'.
    assert seen.trained_dtypes == {torch.float32}, f"trained parameters in {seen.trained_dtypes}"
    assert seen.precision == precision
    assert len(seen.losses) == steps and all(map(math.isfinite, seen.losses)), seen.losses
    assert module.trainer.global_step == steps


def on_gpu(argv: list[str], precision: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--accelerator") + 1] = ACCELERATOR
    return [*argv, "--precision", precision]


@pytest.fixture(scope="module")
def gold_data(tmp_path_factory) -> Path:
    """The dummy QA set with a gold passage per question (line i: passage i % 8 of the KB), so that the InfoNCE
    recipes (retriever_only, dalm) have a positive for every question and compute their contrastive loss."""
    data = tmp_path_factory.mktemp("gold-data")
    shutil.copytree(DUMMY_DATA, data, dirs_exist_ok=True)
    for split in ("train", "val", "test"):
        n = len((data / f"{split}.source").read_text().splitlines())
        rows = [json.dumps({"answers": ["x"], "gold_passage_ids": [i % 8]}) for i in range(n)]
        (data / f"{split}.gold.jsonl").write_text("\n".join(rows) + "\n")
    return data


def recipe_argv(finetune_argv, tiny_models, data: Path, *extra: str, generator: Path | None = None) -> list[str]:
    """The README's set-up in small: separate encoders and a causal generator (as MiniLM + SmolLM2), `STEPS`
    optimizer steps, then one validation batch of 4 questions (generation under the same precision)."""
    argv = finetune_argv(
        "--do_train",
        "--n_docs",
        "3",
        "--hard_negatives",
        "2",
        "--max_steps",
        str(STEPS),
        "--val_check_interval",
        str(STEPS),
        "--n_val",
        "4",
        "--num_sanity_val_steps",
        "0",
        *extra,
    )
    i = argv.index("--model_name_or_path")
    argv[i : i + 2] = [
        "--question_encoder_name_or_path",
        str(tiny_models["question_encoder"]),
        "--generator_name_or_path",
        str(generator or tiny_models["causal_generator"]),
        "--generator_type",
        "causal",
    ]
    argv[argv.index("--data_dir") + 1] = str(data)
    return argv


# Quick ones first: if the check's timeout stops the run, the parts most runs need have reported.


def test_bf16_encoding_on_cuda_matches_float32(tiny_models, tiny_kb):
    path = str(tiny_models["context_encoder"])
    encoder, tokenizer = load_encoder(path, side="context").eval().to(DEVICE), load_tokenizer(path)
    passages = datasets.load_from_disk(str(tiny_kb[0]))  # the dummy KB: 100-word passages, up to 128 tokens
    token_ids = tokenize_passages(tokenizer, passages["title"], passages["text"])
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "batch_size": 16, "device": DEVICE, "progress": False}
    full = encode_token_ids(encoder, token_ids, bf16=False, **kwargs)
    half = encode_token_ids(encoder, token_ids, bf16=True, **kwargs)
    assert half.dtype == np.float32 and half.shape == full.shape
    error = np.linalg.norm(half - full, axis=1) / np.linalg.norm(full, axis=1)
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.0039); autocast rounds each matmul's inputs and output
    # to it and keeps LayerNorm and softmax in float32. The whole tiny encoder cast to bf16 (weights and every
    # activation) is 0.5 % off float32 at most on the dummy KB (measured on CPU), so 3 % (8 roundoffs) leaves room
    # for CUDA's kernels while a wrong vector (no eval mode, another pooling, lost positions) is off by far more.
    assert error.max() < 0.03, f"bf16 vectors off float32 by up to {error.max():.4f} (relative L2)"
    # ... and bf16 did run: float32 twice on one GPU agrees to ~1e-7, bf16 differs by ~1e-3.
    assert error.max() > 1e-5, "the bf16 pass equals the float32 one: autocast did not apply"


@pytest.mark.parametrize("model_type", ["rag_token", "rag_sequence"])
def test_rag_model_on_cuda_gives_the_cpu_loss_and_answers(tiny_models, tiny_kb, model_type):
    model = RagModel.from_pretrained(str(tiny_models[model_type]), kb=(str(tiny_kb[0]), str(tiny_kb[1]))).eval()
    questions, answers = ["who held the rod?", "where is sinai?"], ["aaron", "egypt"]
    beams = 1 if model_type == "rag_token" else 2  # RAG-sequence decodes a beam per passage (HF generate)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 on both sides
    try:
        out = {}
        for device in ("cpu", DEVICE):
            model.to(device)
            enc = model.tokenize_questions(questions)
            with torch.no_grad():
                loss, doc_scores = model(enc["input_ids"], enc["attention_mask"], questions, answers)
                generated = model.generate(enc["input_ids"], enc["attention_mask"], questions, 6, num_beams=beams)
            out[device] = (loss.cpu(), doc_scores.cpu(), generated)
    finally:
        torch.set_float32_matmul_precision(precision)
    # Float32 on both devices; only the order of the sums differs: ~1e-7 relative per op (float32's epsilon), some
    # 1e-6 over these few layers and a 2,000-word log-softmax. 1e-4 is 100 times that, and any real difference (a
    # mask, a passage, a cast) moves the per-token NLL (~7.6 nats here) and the doc scores by far more.
    torch.testing.assert_close(out[DEVICE][0], out["cpu"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[DEVICE][1], out["cpu"][1], rtol=1e-4, atol=1e-5)
    # Greedy (or 2-beam) tokens flip between devices only at a near-tie of two logits (< 1e-5 apart): rare enough.
    assert out[DEVICE][2] == out["cpu"][2]

    # answer() (what tools/rag_answer.py calls) on the GPU decodes as generate() does with the same settings: this
    # checkpoint saved none, so FALLBACK_GENERATION's (4 beams, 50 new tokens).
    assert model.generation == Generation()
    model.to(DEVICE)
    answered = model.answer(questions)
    enc = model.tokenize_questions(questions)
    expected = model.generate(enc["input_ids"], enc["attention_mask"], questions, **FALLBACK_GENERATION)
    assert [a["answer"] for a in answered] == expected
    assert all(len(a["passages"]) == model.n_docs for a in answered)


def test_end_to_end_on_cuda_in_bf16_with_a_refresh_that_shares_the_gpu(ray_local, finetune_argv):
    argv = finetune_argv(
        "--do_train",
        "--end2end",
        "--indexing_freq",
        "2",
        "--max_steps",
        "8",
        "--val_check_interval",
        "8",
        "--num_sanity_val_steps",
        "0",
        "--index_gpus",
        "0.5",
    )
    module, seen = train(on_gpu(argv, "bf16-mixed"))
    assert_trained_on_the_gpu(module, seen, "bf16-mixed", 8)  # the context encoder's parameters included
    assert module.kb.version >= 1, "no refresh went live"


def test_a_generator_saved_in_bf16_trains_with_float32_master_weights_under_16_mixed(
    ray_local, finetune_argv, tiny_models, gold_data, tmp_path
):
    """Hub generators are mostly saved in bf16 (SmolLM2 is); 16-mixed needs float32 weights (GradScaler refuses
    fp16 gradients, and bf16 weights lose AdamW's small updates to rounding): the loader must load float32."""
    saved = tmp_path / "generator-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_models["causal_generator"]).to(torch.bfloat16).save_pretrained(saved)
    AutoTokenizer.from_pretrained(tiny_models["causal_generator"]).save_pretrained(saved)
    weights = safetensors.torch.load_file(saved / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # what the test is about: a bf16 checkpoint
    argv = recipe_argv(finetune_argv, tiny_models, gold_data, "--training_mode", "rag_original", generator=saved)
    module, seen = train(on_gpu(argv, "16-mixed"))
    assert_trained_on_the_gpu(module, seen, "16-mixed", STEPS)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_recipe_trains_a_few_cuda_steps(ray_local, finetune_argv, tiny_models, gold_data, mode, precision):
    """Each --training_mode, a few optimizer steps and a validation batch on the GPU: a recipe that breaks on
    CUDA or under a precision (a host tensor mixed into the GPU's, a dtype the scaler refuses) fails here."""
    argv = on_gpu(recipe_argv(finetune_argv, tiny_models, gold_data, "--training_mode", mode), precision)
    module, seen = train(argv)
    assert_trained_on_the_gpu(module, seen, precision, STEPS)
