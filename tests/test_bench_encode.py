"""bench/bench_encode.py's profile of the actors' encoding loop and its report (no Ray)."""

from pathlib import Path

import pytest
from datasets import Dataset

from rag_end2end.model.encoders import load_encoder, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    import bench_encode

    return bench_encode


def test_the_profile_splits_the_encoding_loop_into_forward_passes_and_the_rest(bench, tiny_models, tmp_path):
    path = tiny_models["context_encoder"]
    encoder, tokenizer = load_encoder(path, side="context").eval(), load_tokenizer(path)
    passages = Dataset.from_dict(
        {"title": [f"t{i}" for i in range(10)], "text": ["some words here " * i for i in range(10)]}
    )
    passages.save_to_disk(tmp_path / "passages")
    prof = bench.profile_encode(encoder, tokenizer, str(tmp_path / "passages"), batch_size=4, threads=1)
    assert prof["batches"] == 3
    assert 0 < prof["forward_s"] < prof["seconds"]
    assert prof["forward_share"] == pytest.approx(prof["forward_s"] / prof["seconds"])
    assert prof["rest_ms_per_batch"] == pytest.approx(1000 * (prof["seconds"] - prof["forward_s"]) / 3)
    result = {
        "passages": 10,
        "encoder": str(path),
        "batch_size": 4,
        "threads": 1,
        "index_factory": "Flat",
        "passages_per_s": {"bare_forward": [2.0]},
        "actor_encode_vs_bare": 1.0,
        "refresh_vs_bare": 0.5,
        "median_passages_per_s": {"bare_forward": 2.0, "actor_encode": 2.0, "whole_refresh": 1.0},
        "profile": prof,
    }
    assert f"{100 * prof['forward_share']:.1f} % in the forward pass" in bench.markdown(result)
