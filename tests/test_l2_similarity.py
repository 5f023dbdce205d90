"""--similarity l2 (the seed trainer's IndexFlatL2): FAISS L2 indexes (flat, HNSW, a factory) against a brute-force
search, the KB's declaration, and the model's doc scores (-||q - d||^2 / tau) and InfoNCE against direct
computations on tiny models."""

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faults import kill_actors

from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.kb import search as kb_search
from rag_end2end.kb.index import IndexConfig, build_faiss_index, read_index
from rag_end2end.model.encoders import PooledEncoder, load_encoder, passage_scores
from rag_end2end.recipes import infonce
from rag_end2end.training import finetune as finetune_rag
from rag_end2end.training.callbacks import KBRefreshCallback

pytestmark = pytest.mark.usefixtures("one_thread")
DUMMY_CSV = Path(__file__).resolve().parents[1] / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
HIDDEN = 32  # the tiny models' width (tiny_models.py)


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances, ids) of every query's k nearest vectors, by numpy over all pairs."""
    distances = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, ids, 1), ids


@pytest.mark.parametrize(
    "cfg",
    [IndexConfig("flat"), IndexConfig("hnsw"), IndexConfig(factory="IVF8,Flat", search_params="nprobe=8")],
    ids=["flat", "hnsw", "ivf-factory"],
)
def test_l2_indexes_find_what_a_brute_force_search_finds(cfg):
    rng = np.random.default_rng(0)
    # norms from 0.1 to 10: the nearest vector and the largest inner product disagree
    vectors = (rng.standard_normal((600, 16)) * rng.uniform(0.1, 10, (600, 1))).astype(np.float32)
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    index = build_faiss_index(vectors, cfg, "l2")
    assert index.metric_type == faiss.METRIC_L2
    if cfg.index_type == "flat" and not cfg.factory:
        assert isinstance(index, faiss.IndexFlatL2)
    distances, ids = index.search(queries, 5)
    want_distances, want_ids = brute_force(queries, vectors, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(distances, want_distances, rtol=1e-4)
    _, dot_ids = build_faiss_index(vectors, cfg).search(queries, 5)  # the same vectors by inner product
    assert (dot_ids[:, 0] != want_ids[:, 0]).mean() > 0.5


def test_l2_scores_and_infonce_are_negative_squared_distances_over_tau(tiny_models):
    encoder = load_encoder(tiny_models["question_encoder"], "cls", similarity="l2", temperature=0.5)
    assert isinstance(encoder, PooledEncoder) and encoder.similarity == "l2"
    assert encoder.settings()["similarity"] == "l2" and encoder.temperature == 0.5
    ids = torch.tensor([[2, 5, 7, 3], [2, 9, 4, 3]])
    q = encoder(ids, attention_mask=torch.ones_like(ids))[0]
    raw = PooledEncoder(encoder.model, "cls")(ids, attention_mask=torch.ones_like(ids))[0]
    torch.testing.assert_close(q, raw)  # an l2 question vector is a point of the passages' space, not q / tau
    d = torch.randn(2, 3, HIDDEN)
    want = -((q[:, None, :] - d) ** 2).sum(-1) / 0.5
    torch.testing.assert_close(passage_scores("bd,bnd->bn", q, d, encoder), want, rtol=1e-5, atol=1e-4)
    p = torch.randn(4, HIDDEN)
    owner, positive = torch.arange(4), torch.tensor([1, 3])
    want_loss = F.cross_entropy(-(torch.cdist(q, p) ** 2) / 0.5, positive)
    torch.testing.assert_close(
        infonce(q, p, owner, positive, question_encoder=encoder), want_loss, rtol=1e-4, atol=1e-4
    )
    rebuilt = encoder.factory()(encoder.config)  # what a Ray encoding actor builds
    assert rebuilt.similarity == "l2"


@pytest.fixture(scope="module")
def l2_kb(tiny_models, tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("l2-kb")
    args = ["--csv_path", str(DUMMY_CSV), "--output_dir", str(out), "--index_type", "flat", "--similarity", "l2"]
    args += ["--dpr_ctx_encoder_model_name", str(tiny_models["context_encoder"]), "--device", "cpu"]
    return use_own_knowledge_dataset.main(use_own_knowledge_dataset.parse_args(args))


def test_an_l2_kb_retrieves_and_scores_as_a_brute_force_search(tiny_models, l2_kb, tmp_path):
    passages, index = l2_kb
    assert json.loads((Path(passages) / "rag_kb.json").read_text()) == {"similarity": "l2"}
    assert read_index(index).metric_type == faiss.METRIC_L2
    argv = ["--training_mode", "rag_original", "--model_type", "rag_token", "--similarity", "l2"]
    argv += ["--retrieval_temperature", "0.5", "--question_pooling", "cls", "--n_docs", "3"]
    argv += ["--question_encoder_name_or_path", str(tiny_models["question_encoder"])]
    argv += ["--generator_name_or_path", str(tiny_models["generator"]), "--passages_path", str(passages)]
    argv += ["--index_path", str(index), "--index_type", "flat", "--output_dir", str(tmp_path / "run")]
    argv += ["--data_dir", str(Path(__file__).resolve().parents[1] / "test_run" / "dummy-train-data")]
    retriever = kb_search.KBSearch(str(passages), str(index), HIDDEN)
    module = finetune_rag.GenerativeQAModule(finetune_rag.parse_args(argv), retriever)
    model = module.model.eval()  # no dropout: both passes see one question vector
    assert model.question_encoder.similarity == "l2"
    enc = model.tokenize_questions(["what is a tiny model?", "how are passages stored?"])
    with torch.no_grad():
        r = model.retrieve(enc["input_ids"], enc["attention_mask"])
        q = model.encode_questions(enc["input_ids"], enc["attention_mask"]).numpy()
    stored = np.asarray(retriever.kb.passages.with_format("numpy")["embeddings"], dtype=np.float32)
    want_distances, want_ids = brute_force(q, stored, 3)
    got_distances = ((q[:, None, :] - stored[r.ids]) ** 2).sum(-1)
    # the nearest 3 (a near tie between two passages may come in either order)
    np.testing.assert_allclose(got_distances, want_distances, rtol=1e-4, atol=1e-4)
    assert (r.ids == want_ids).mean() >= 2 / 3
    np.testing.assert_allclose(r.doc_scores.numpy(), -got_distances / 0.5, rtol=1e-4, atol=1e-3)
    scores, _ = retriever.kb.search(q, 3)  # higher is better for every metric: what the shards' merge ranks
    np.testing.assert_allclose(scores, -want_distances, rtol=1e-4, atol=1e-3)


def test_an_l2_kb_with_a_dot_encoder_is_refused(tiny_models, l2_kb, finetune_argv):
    passages, index = l2_kb
    argv = finetune_argv("--passages_path", str(passages), "--index_path", str(index))
    with pytest.raises(ValueError, match=r"holds l2 embeddings .* scores with dot similarity.*--similarity l2"):
        finetune_rag.build_module(finetune_rag.parse_args(argv))


def test_end_to_end_training_with_l2_refreshes_an_l2_index(ray_local, tiny_models, l2_kb, tmp_path):
    """The from-scratch recipe's shape (any encoder pair + a seq2seq generator, --similarity l2) on tiny models: it
    trains, and the refresh re-encodes and publishes a KB version that is still declared and indexed as l2."""
    passages, index = l2_kb
    argv = ["--training_mode", "rag_end2end", "--model_type", "rag_token", "--similarity", "l2", "--n_docs", "3"]
    argv += ["--question_encoder_name_or_path", str(tiny_models["question_encoder"])]
    argv += ["--context_encoder_name", str(tiny_models["context_encoder"])]
    argv += ["--generator_name_or_path", str(tiny_models["generator"]), "--generator_type", "seq2seq"]
    argv += ["--passages_path", str(passages), "--index_path", str(index), "--index_type", "flat"]
    argv += ["--data_dir", str(Path(__file__).resolve().parents[1] / "test_run" / "dummy-train-data")]
    argv += ["--output_dir", str(tmp_path / "run"), "--accelerator", "cpu", "--devices", "1"]
    argv += ["--train_batch_size", "2", "--eval_batch_size", "4", "--do_train", "--max_steps", "4"]
    argv += ["--indexing_freq", "2", "--ray_namespace", f"test-l2-{tmp_path.name[-8:]}"]
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    refresh = next(c for c in module.trainer.callbacks if isinstance(c, KBRefreshCallback))
    assert refresh.history, "no refresh"
    newest = Path(module.kb.passages_path)
    assert module.kb.version >= 1 and module.kb.similarity == "l2"
    assert json.loads((newest / "rag_kb.json").read_text()) == {"similarity": "l2"}
    assert read_index(module.kb.index_path).metric_type == faiss.METRIC_L2
    kill_actors(module)


def test_an_l2_encoder_exports_as_a_euclidean_sentence_transformer(tiny_models, tmp_path):
    """sentence-transformers' euclidean similarity (-||q - d||) ranks as the toolkit's l2 doc scores do."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from rag_end2end.deploy.export import write_sentence_transformer
    from rag_end2end.model.encoders import load_tokenizer

    path = tiny_models["question_encoder"]
    encoder = load_encoder(path, "mean", side="question", similarity="l2")
    write_sentence_transformer(encoder, load_tokenizer(path), tmp_path / "st", {}, 32)
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert st.similarity_fn_name == "euclidean"
    texts = ["the river ran red", "a rod became a snake", "frogs came up"]
    vectors = st.encode(texts, convert_to_tensor=True)
    scores = st.similarity(vectors[:1], vectors)[0]
    assert torch.equal(scores.argsort(), (-((vectors[:1] - vectors) ** 2).sum(-1)).argsort())
