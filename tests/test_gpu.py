"""The GPU path: CUDA training in bf16-mixed with a refresh whose encoding actor shares the GPU, bf16 encoding,
and the model's loss and answers on CUDA against CPU. Skipped without CUDA; bench/gpu_check.sh runs them on a
lent GPU (`pytest -m gpu tests/test_gpu.py`)."""

import math

import numpy as np
import pytest
import ray
import torch

import finetune_rag
from kb_encode_utils import encode_token_ids, tokenize_passages
from rag_encoders import load_encoder, load_tokenizer
from rag_model import RagModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_encoding_on_cuda_matches_float32(tiny_models):
    path = str(tiny_models["context_encoder"])
    encoder, tokenizer = load_encoder(path, side="context").eval().cuda(), load_tokenizer(path)
    titles, texts = ["Aaron", "Moses", "Sinai"] * 20, ["a rod that became a snake", "the red sea", "a mountain"] * 20
    token_ids = tokenize_passages(tokenizer, titles, texts)
    pad = tokenizer.pad_token_id
    full = encode_token_ids(encoder, token_ids, pad, 16, "cuda", False, None, False)
    half = encode_token_ids(encoder, token_ids, pad, 16, "cuda", False, None, True)
    cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert half.dtype == np.float32 and cosine.min() > 0.99


def test_rag_model_on_cuda_gives_the_cpu_loss_and_answers(tiny_models, tiny_kb):
    model = RagModel.from_pretrained(str(tiny_models["rag_token"]), kb=(str(tiny_kb[0]), str(tiny_kb[1]))).eval()
    questions, answers = ["who held the rod?", "where is sinai?"], ["aaron", "egypt"]
    out = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        enc = model.tokenize_questions(questions)
        with torch.no_grad():
            loss = model(enc["input_ids"], enc["attention_mask"], questions, answers)[0].cpu()
            out[device] = (loss, model.generate(enc["input_ids"], enc["attention_mask"], questions, 6))
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-3, atol=1e-3)
    assert out["cuda"][1] == out["cpu"][1]
    answered = model.to("cuda").answer(questions)  # what rag_answer.py calls, on the GPU
    assert [a["answer"] for a in answered] == model.to("cpu").generate(
        **model.tokenize_questions(questions), questions=questions, max_new_tokens=32
    )


def test_end_to_end_on_cuda_in_bf16_with_a_refresh_that_shares_the_gpu(ray_local, finetune_argv):
    argv = finetune_argv("--do_train", "--end2end", "--indexing_freq", "2", "--max_steps", "8",
                         "--val_check_interval", "8", "--num_sanity_val_steps", "0", "--precision", "bf16-mixed",
                         "--index_gpus", "0.5")  # fmt: skip
    argv[argv.index("--accelerator") + 1] = "gpu"
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    for actor in module.retriever.actors:
        ray.kill(actor)
    assert module.device.type == "cuda" and module.trainer.precision == "bf16-mixed"
    assert module.kb.version >= 1, "no refresh went live"
    assert math.isfinite(float(module.trainer.callback_metrics["loss"]))
    assert all(p.device.type == "cuda" for p in module.model.ctx_encoder.parameters())
