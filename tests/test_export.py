"""Using what the toolkit trains outside it, on tiny models: tools/export_model.py's sentence-transformers encoders
(the toolkit's own vectors back from sentence-transformers), the plain transformers generator and the KB;
RagModel.from_pretrained(...).answer, tools/rag_answer.py and the LangChain retriever on a checkpoint and its export;
bad input refused with the path named and nothing overwritten."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForSeq2SeqLM

from rag_end2end.deploy import answer as rag_answer
from rag_end2end.deploy import export as export_model
from rag_end2end.files import process_alive
from rag_end2end.kb import build as use_own_knowledge_dataset
from rag_end2end.kb import search as kb_search
from rag_end2end.kb.versions import checkpoint_kb
from rag_end2end.model.rag import RagModel
from rag_end2end.model.settings import SETTINGS_FILE
from rag_end2end.training import finetune as finetune_rag

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
DUMMY_CSV = REPO / "test_run" / "dummy-kb" / "my_knowledge_dataset.csv"
DUMMY_DATA = REPO / "test_run" / "dummy-train-data"
QUESTIONS = ["Who turned the rod into a snake?", "Where did the river run red?"]


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory) -> Path:
    """A rag_end2end checkpoint of mean-pooled, cosine-scored tiny encoders with e5-style prefixes, over a KB
    that its own context encoder built (so the stored vectors are that encoder's)."""
    work = tmp_path_factory.mktemp("export")
    ctx = str(tiny_models["context_encoder"])
    kb_args = use_own_knowledge_dataset.parse_args(
        [
            "--csv_path",
            str(DUMMY_CSV),
            "--output_dir",
            str(work / "kb"),
            "--index_type",
            "flat",
            "--dpr_ctx_encoder_model_name",
            ctx,
            "--pooling",
            "mean",
            "--similarity",
            "cosine",
            "--passage_prefix",
            "passage: ",
            "--device",
            "cpu",
        ]
    )
    passages, index = use_own_knowledge_dataset.main(kb_args)
    args = finetune_rag.parse_args(
        [
            "--question_encoder_name_or_path",
            str(tiny_models["question_encoder"]),
            "--generator_name_or_path",
            str(tiny_models["generator"]),
            "--context_encoder_name",
            ctx,
            "--model_type",
            "rag_token",
            "--training_mode",
            "rag_end2end",
            "--question_pooling",
            "mean",
            "--context_pooling",
            "mean",
            "--similarity",
            "cosine",
            "--question_prefix",
            "query: ",
            "--passage_prefix",
            "passage: ",
            "--n_docs",
            "3",
            "--passages_path",
            str(passages),
            "--index_path",
            str(index),
            "--data_dir",
            str(DUMMY_DATA),
            "--output_dir",
            str(work / "run"),
            "--max_source_length",
            "32",
            "--test_max_target_length",
            "5",
        ]
    )
    module = finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(str(passages), str(index), 32))
    ckpt = work / "run" / "checkpoint0"
    module.save_hf_checkpoint(ckpt)
    (work / "run" / "run_info.json").write_text(json.dumps({"training_mode": "rag_end2end", "trains": ["all"]}))
    (work / "run" / "test_results.txt").write_text("test_em: 0.25\n")
    return ckpt


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_model.export(checkpoint, tmp_path_factory.mktemp("out") / "export")


def test_sentence_transformers_give_the_toolkits_vectors(checkpoint, exported):
    from sentence_transformers import SentenceTransformer

    model = RagModel.from_pretrained(checkpoint, load_context_encoder=True).eval()
    tau = model.question_encoder.temperature_value
    with torch.no_grad():
        ours = model.encode_questions(**model.tokenize_questions(QUESTIONS)).numpy() * tau
    st_q = SentenceTransformer(str(exported / "question_encoder"), device="cpu")
    theirs = st_q.encode(QUESTIONS, prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)

    kb = load_from_disk(str(exported / "kb" / "passages"))
    st_p = SentenceTransformer(str(exported / "context_encoder"), device="cpu")
    pairs = [("passage: " + title, text) for title, text in zip(kb["title"], kb["text"])]
    vectors = st_p.encode(pairs, convert_to_numpy=True, batch_size=16)
    stored = np.asarray(kb["embeddings"], dtype=np.float32)
    cosine = (vectors * stored).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(stored, axis=1)
    assert cosine.min() > 1 - 1e-4, "the context encoder does not reproduce the KB's stored vectors"
    card = (exported / "README.md").read_text()
    assert "rag_end2end" in card and "test_em: 0.25" in card and "('passage: ' + title, text)" in card


def test_the_generator_is_a_plain_transformers_model(checkpoint, exported):
    theirs = AutoModelForSeq2SeqLM.from_pretrained(exported / "generator").state_dict()
    ours = RagModel.from_pretrained(checkpoint).generator.model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_checkpoint_and_export_answer_alike_in_python_and_from_the_command_line(checkpoint, exported, capsys):
    results = {}
    for path in (checkpoint, exported):
        model = RagModel.from_pretrained(path).eval()
        assert isinstance(model.retriever, kb_search.KBSearch) and model.n_docs == 3
        results[path] = model.answer(QUESTIONS)
    a, b = results[checkpoint], results[exported]
    assert [r["answer"] for r in a] == [r["answer"] for r in b] and all(isinstance(r["answer"], str) for r in a)
    for ra, rb in zip(a, b):
        assert [p["id"] for p in ra["passages"]] == [p["id"] for p in rb["passages"]]
        assert [p["score"] for p in ra["passages"]] == pytest.approx([p["score"] for p in rb["passages"]], abs=1e-4)
        assert sum(p["probability"] for p in ra["passages"]) == pytest.approx(1.0)
        kb = load_from_disk(str(exported / "kb" / "passages"))
        assert all(kb[p["id"]]["title"] == p["title"] for p in ra["passages"])

    rag_answer.main(["--model", str(exported), "--question", QUESTIONS[0], "--question", QUESTIONS[1], "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["answer"] for r in lines] == [r["answer"] for r in a]
    assert [p["id"] for p in lines[0]["passages"]] == [p["id"] for p in a[0]["passages"]]


def test_answers_list_passages_best_first_when_fresh_scores_reorder_the_index(checkpoint, tmp_path, capsys):
    """A run whose doc scores come from its context encoder re-scores the passages the index found (here a KB of
    random vectors): answers, rag_answer.py and the LangChain retriever list them by that score, highest first."""
    from rag_end2end.kb.index import IndexConfig
    from rag_end2end.kb.parts import with_embeddings
    from rag_end2end.kb.versions import checkpoint_kb, save_kb

    try:
        from rag_end2end.deploy.langchain import CheckpointRetriever
    except ImportError:  # langchain-core is optional
        CheckpointRetriever = None
    passages = load_from_disk(checkpoint_kb(checkpoint)[0])
    vectors = np.random.default_rng(0).standard_normal((len(passages), 32)).astype(np.float32)
    kb = (tmp_path / "passages", tmp_path / "index.faiss")
    save_kb(
        with_embeddings(passages, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)),
        *kb,
        IndexConfig("flat"),
        similarity="cosine",
    )
    model = RagModel.from_pretrained(checkpoint, kb=tuple(map(str, kb)), n_docs=6).eval()
    assert model.ctx_encoder is not None  # fresh doc scores
    with torch.no_grad():
        found = model.retrieve(**model.tokenize_questions(QUESTIONS))
    assert any((row[1:] > row[:-1]).any() for row in found.doc_scores), "the index order already is the score order"
    for result in model.answer(QUESTIONS):
        scores = [p["score"] for p in result["passages"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 6
    argv = ["--model", str(checkpoint), "--passages_path", str(kb[0]), "--index_path", str(kb[1])]
    rag_answer.main([*argv, "--question", QUESTIONS[0], "--question", QUESTIONS[1], "--show_passages", "3"])
    lines = capsys.readouterr().out.splitlines()
    for start in (0, 5):  # Q:, A:, then the 3 passages (the run's n_docs)
        shown = [float(line.split("(score ")[1].split(",")[0]) for line in lines[start + 2 : start + 5]]
        assert shown == sorted(shown, reverse=True) and len(shown) == 3
    docs = CheckpointRetriever(model=model, k=6).invoke(QUESTIONS[0]) if CheckpointRetriever else []
    assert [d.metadata["score"] for d in docs] == sorted((d.metadata["score"] for d in docs), reverse=True)


def test_langchain_retriever_returns_the_models_passages(exported):
    pytest.importorskip("langchain_core")
    from rag_end2end.deploy.langchain import CheckpointRetriever

    retriever = CheckpointRetriever.from_path(str(exported), k=3)
    docs = retriever.invoke(QUESTIONS[0])
    expected = RagModel.from_pretrained(exported).eval().answer(QUESTIONS[:1])[0]["passages"]
    assert [d.metadata["id"] for d in docs] == [p["id"] for p in expected]
    assert [d.metadata["title"] for d in docs] == [p["title"] for p in expected]
    assert [d.page_content for d in docs] == [p["text"] for p in expected]
    assert [d.metadata["score"] for d in docs] == pytest.approx([p["score"] for p in expected], abs=1e-4)


@pytest.fixture(scope="module")
def talking(checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of `checkpoint` whose generator says something (at its init scale the tiny generator emits only
    [CLS]: larger weights, real answers), and its export."""
    work = tmp_path_factory.mktemp("talking")
    shutil.copytree(checkpoint, work / "checkpoint0")
    generator = AutoModelForSeq2SeqLM.from_pretrained(work / "checkpoint0" / "generator")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in generator.parameters():
            p.normal_(0, 0.3)
    generator.save_pretrained(work / "checkpoint0" / "generator")
    return work / "checkpoint0", export_model.export(work / "checkpoint0", work / "export")


def test_langchain_chain_answers_from_a_checkpoint_or_an_export_as_the_model_does(talking):
    """retriever -> rag_prompt -> the trained generator (a LangChain chat model) gives RagModel.answer's answer over
    the same passages, from a checkpoint and from its export; the chat model alone answers a bare question too."""
    pytest.importorskip("langchain_core")
    from rag_end2end.deploy.langchain import CheckpointChatModel, CheckpointRetriever, rag_chain, rag_chain_from_path

    checkpoint, exported = talking
    for path in (checkpoint, exported):
        expected = RagModel.from_pretrained(path).eval().answer(QUESTIONS[:1])[0]
        assert expected["answer"].strip()
        out = rag_chain_from_path(str(path), device="cpu", with_sources=True).invoke(QUESTIONS[0])
        assert out["question"] == QUESTIONS[0] and out["answer"] == expected["answer"]
        assert [d.metadata["id"] for d in out["context"]] == [p["id"] for p in expected["passages"]]
    chat = CheckpointChatModel.from_path(str(exported), device="cpu")
    assert chat.invoke(QUESTIONS[0]).content == expected["answer"]
    retriever = CheckpointRetriever.from_path(str(exported), k=3)
    assert rag_chain(retriever, chat).invoke(QUESTIONS[0]) == expected["answer"]


def test_langchain_chain_takes_any_chat_model_in_place_of_the_generator(exported):
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel, ParrotFakeChatModel

    from rag_end2end.deploy.langchain import CheckpointRetriever, rag_chain, rag_chain_from_path

    retriever = CheckpointRetriever.from_path(str(exported), k=2)
    docs = retriever.invoke(QUESTIONS[0])
    prompt = rag_chain(retriever, ParrotFakeChatModel()).invoke(QUESTIONS[0])  # the parrot returns its prompt
    assert prompt.endswith("Question: " + QUESTIONS[0])
    assert all(f"{d.metadata['title']} / {d.page_content}" in prompt for d in docs)
    out = rag_chain_from_path(str(exported), k=2, model=FakeListChatModel(responses=["forty days"]), with_sources=True)
    result = out.invoke(QUESTIONS[0])
    assert result["answer"] == "forty days" and [d.id for d in result["context"]] == [d.id for d in docs]


def test_langchain_k_is_bounded_by_the_kb(exported):
    pytest.importorskip("langchain_core")
    from rag_end2end.deploy.langchain import CheckpointChatModel, CheckpointRetriever

    retriever = CheckpointRetriever.from_path(str(exported), k=1)
    size = len(retriever.model.retriever)
    assert len(CheckpointRetriever(model=retriever.model, k=size).invoke(QUESTIONS[0])) == size
    for k in (0, size + 1):
        with pytest.raises(ValueError, match=rf"^k={k}: passages per query must be an integer from 1 to .*{size}"):
            CheckpointRetriever(model=retriever.model, k=k)
    retriever.k = size + 1  # set after construction: refused at the query
    with pytest.raises(ValueError, match="k="):
        retriever.invoke(QUESTIONS[0])
    with pytest.raises(ValueError, match="no generator"):
        CheckpointChatModel(model=retriever.model)


def test_bad_input_names_the_path_and_overwrites_nothing(checkpoint, exported, tmp_path):
    before = sorted(p.name for p in exported.iterdir())
    with pytest.raises(FileExistsError, match=str(exported)):
        export_model.export(checkpoint, exported)
    assert sorted(p.name for p in exported.iterdir()) == before
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        export_model.export(tmp_path, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        RagModel.from_pretrained(tmp_path)
    moved = tmp_path / "checkpoint0"
    shutil.copytree(checkpoint, moved)
    kb = json.loads((moved / "kb_version.json").read_text())
    (moved / "kb_version.json").write_text(json.dumps(kb | {"passages_path": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="gone"):
        export_model.export(moved, tmp_path / "y")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone")):
        RagModel.from_pretrained(moved)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob("y.tmp-*"))


def test_a_relative_kb_path_that_leads_out_of_the_run_is_refused(checkpoint, tmp_path):
    """kb_version.json's relative paths stay inside the run (or export) they came with; a KB elsewhere is named by
    an absolute path, as finetune_rag.py writes one."""
    moved = tmp_path / "run" / "checkpoint0"
    shutil.copytree(checkpoint, moved)
    kb = json.loads((moved / "kb_version.json").read_text())
    (moved / "kb_version.json").write_text(json.dumps(kb | {"passages_path": "../../../etc"}))
    with pytest.raises(ValueError, match=r"kb_version.json: passages_path '../../../etc' leads out of the run"):
        RagModel.from_pretrained(moved)
    absolute = str(Path(checkpoint_kb(checkpoint)[0]).absolute())
    (moved / "kb_version.json").write_text(json.dumps(kb | {"passages_path": absolute}))
    assert checkpoint_kb(moved)[0] == absolute


def test_an_export_killed_mid_write_leaves_a_temporary_that_the_next_export_clears(checkpoint, tmp_path):
    """SIGKILL skips every cleanup: what the killed process wrote stays under its temporary name (with its PID), is
    never read as an export, and goes when the next export to that name starts."""
    out = tmp_path / "export"
    code = (
        "import os, signal, sys\n"
        "import rag_end2end.deploy.export as e\n"
        "def killed(*args):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.write_transformers_rag = killed\n"  # half-way: the encoders, generator and KB are written
        f"e.export({str(checkpoint)!r}, {str(out)!r})\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = tmp_path.glob("export.tmp-*")
    writer = int(left.name.removeprefix("export.tmp-").split("-")[0])  # files.temporary_sibling: NAME.tmp-PID-HEX
    assert not process_alive(writer) and (left / "question_encoder").is_dir() and not out.exists()
    export_model.export(checkpoint, out)
    assert not left.exists() and (out / SETTINGS_FILE).is_file()


@pytest.mark.parametrize("model_type", ["rag_token", "rag_sequence"])
def test_dpr_bart_exports_a_transformers_rag_model_that_answers_as_the_toolkit(
    tiny_models, tiny_kb, tmp_path, model_type
):
    """transformers' RagRetriever and Rag*ForGeneration load DIR/rag: the same passages, prompts (token ids) and
    doc scores as the toolkit, and for RAG-token the same greedy answers."""
    from transformers import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer

    passages, index = tiny_kb
    args = finetune_rag.parse_args(
        [
            "--model_name_or_path",
            str(tiny_models[model_type]),
            "--model_type",
            model_type,
            "--training_mode",
            "rag_original",
            "--passages_path",
            str(passages),
            "--index_path",
            str(index),
            "--data_dir",
            str(DUMMY_DATA),
            "--output_dir",
            str(tmp_path / "run"),
            "--n_docs",
            "3",
            "--test_max_target_length",
            "6",
        ]
    )
    module = finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(str(passages), str(index), 32))
    torch.manual_seed(0)
    with torch.no_grad():  # at its init scale the tiny generator emits only [CLS]: larger weights, real answers
        for p in module.model.generator.model.parameters():
            p.normal_(0, 0.3)
    module.save_hf_checkpoint(tmp_path / "run" / "checkpoint0")
    out = export_model.export(tmp_path / "run" / "checkpoint0", tmp_path / "export")
    model = RagModel.from_pretrained(out).eval()
    ours = model.answer(QUESTIONS)

    rag_class = RagSequenceForGeneration if model_type == "rag_sequence" else RagTokenForGeneration
    retriever = RagRetriever.from_pretrained(str(out / "rag"))
    rag = rag_class.from_pretrained(str(out / "rag"), retriever=retriever).eval()
    tokenizer = RagTokenizer.from_pretrained(str(out / "rag"))
    enc = tokenizer.question_encoder(QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        q = rag.question_encoder(enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        found = retriever(enc["input_ids"].numpy(), q.numpy(), n_docs=3, return_tensors="pt")
        doc_scores = torch.bmm(q[:, None], found["retrieved_doc_embeds"].float().transpose(1, 2))[:, 0]
        r = model.retrieve(**model.tokenize_questions(QUESTIONS))
    assert found["doc_ids"].tolist() == [[p["id"] for p in a["passages"]] for a in ours]
    prompts = model.generator._encode(model.generator.prompts(QUESTIONS, r.docs))["input_ids"]
    assert torch.equal(found["context_input_ids"], prompts)
    torch.testing.assert_close(doc_scores, r.doc_scores, rtol=1e-5, atol=1e-5)
    if model_type == "rag_token":
        with torch.no_grad():
            # max_length counts the decoder start, and forced_eos_token_id ends at it: room for our 6 and an EOS
            generated = rag.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                num_beams=1,
                max_length=1 + 6 + 1,
                do_sample=False,
            )
        theirs = [a.strip() for a in tokenizer.generator.batch_decode(generated, skip_special_tokens=True)]
        ours = model.answer(QUESTIONS, num_beams=1)
        assert theirs == [a["answer"] for a in ours] and any(theirs)


def test_a_lora_generator_exports_as_its_base_and_the_adapter(tiny_models, tiny_kb, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    passages, index = tiny_kb
    args = finetune_rag.parse_args(
        [
            "--question_encoder_name_or_path",
            str(tiny_models["question_encoder"]),
            "--generator_name_or_path",
            str(tiny_models["causal_generator"]),
            "--generator_type",
            "causal",
            "--model_type",
            "rag_token",
            "--training_mode",
            "rag_original",
            "--peft",
            "generator",
            "--passages_path",
            str(passages),
            "--index_path",
            str(index),
            "--data_dir",
            str(DUMMY_DATA),
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    module = finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(str(passages), str(index), 32))
    batch = next(iter(module._dataloader("train", 2, shuffle=False)))
    module.training_step(batch, 0).backward()
    with torch.no_grad():  # lora_B starts at zero: a step makes the adapter change the outputs
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    ckpt = tmp_path / "run" / "checkpoint1"
    module.save_hf_checkpoint(ckpt)
    merged_out = export_model.export(ckpt, tmp_path / "merged")
    out = export_model.export(ckpt, tmp_path / "adapters", adapters=True)
    tok = AutoTokenizer.from_pretrained(out / "generator")
    ids = tok(["Context: a rod / a snake\\nQuestion: who?\\nAnswer:"], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(out / "generator").eval()
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "generator_adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_out / "generator").eval()(ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, merged, atol=1e-4)  # the adapter is not a no-op
    module.model.generator.model = module.model.generator.model.merge_and_unload()  # no adapter any more
    module.save_hf_checkpoint(tmp_path / "run" / "checkpoint2")
    with pytest.raises(FileNotFoundError, match="no LoRA generator"):
        export_model.export(tmp_path / "run" / "checkpoint2", tmp_path / "z", adapters=True)


def test_rag_answer_asks_at_a_prompt_until_an_empty_line(exported, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS[0] + "\n\n"))
    results = rag_answer.main(["--model", str(exported), "--show_passages", "2"])
    out = capsys.readouterr().out
    assert len(results) == 1 and f"Q: {QUESTIONS[0]}" in out
    assert out.count("(score ") == 2 and f"[{results[0]['passages'][0]['id']}]" in out
