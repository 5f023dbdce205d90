"""Statement reconstruction in training (--reconstruction_dir, --reconstruction_ratio, --mask_probability): what the
generator and the in-graph context encoder read of a statement's own passage, the share of statement batches, the
retriever's gradient from statements alone (and ICT for retriever_only), real runs that log each kind's loss and
resume mid-epoch, and the refusals. The reconstruction data is built here from the tiny KB, not by the builder."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from faults import kill_actors
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from rag_end2end.data.mixing import Mask, MixedBatchSampler, draw_masks
from rag_end2end.data.qa_dataset import QA, RECONSTRUCTION
from rag_end2end.data.reconstruction import RECONSTRUCTION_MARKER, mask_passage
from rag_end2end.kb import search as kb_search
from rag_end2end.recipes import MODES
from rag_end2end.training import finetune as finetune_rag

pytestmark = pytest.mark.usefixtures("one_thread")
DUMMY_DATA = Path(__file__).resolve().parents[1] / "test_run" / "dummy-train-data"
HIDDEN = 32  # the tiny models' (rag_end2end/tiny_models.py)
N_PASSAGES = 40  # the dummy KB's 100-word passages: n_docs 40 retrieves every one, a statement's own passage too
SENTENCE = re.compile(r"(?<=[.!?] )[A-Z][^.!?]{40,240}[.!?](?= )")


def pick_statements(passages_path: Path) -> list[tuple[int, str]]:
    """One sentence of each passage that has one found in no other passage: (KB row, sentence)."""
    texts = list(load_from_disk(str(passages_path))["text"])
    picked = []
    for pid, text in enumerate(texts):
        for match in SENTENCE.finditer(text):
            if sum(match.group() in other for other in texts) == 1:
                picked.append((pid, match.group()))
                break
    return picked


def write_split(directory: Path, split: str, statements: list[tuple[int, str]]) -> None:
    """{split}.source/.target/.gold.jsonl in the format of data_prep/make_reconstruction_data.py."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{split}.source").write_text("".join(f"{RECONSTRUCTION_MARKER}{s}\n" for _, s in statements))
    (directory / f"{split}.target").write_text("".join(f"{s}\n" for _, s in statements))
    rows = [
        {"answers": [s], "gold_passage_ids": [pid], "mask": {"passage_id": pid, "sentence": s}} for pid, s in statements
    ]
    (directory / f"{split}.gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def statements(tiny_kb) -> list[tuple[int, str]]:
    picked = pick_statements(tiny_kb[0])
    assert len(picked) >= 16, "the dummy KB should give a statement in most passages"
    return picked


@pytest.fixture(scope="module")
def recon_dir(statements, tmp_path_factory) -> Path:
    """12 training statements, 4 held out."""
    directory = tmp_path_factory.mktemp("recon")
    write_split(directory, "train", statements[:12])
    write_split(directory, "val", statements[12:16])
    return directory


@pytest.fixture
def make_module(finetune_argv, tiny_models, tiny_kb, recon_dir):
    """A GenerativeQAModule over an in-process search of the tiny KB (no Ray), trained with statements."""

    def make(mode: str, *extra: str, ratio: str = "1", mask: str = "1", n_docs: int = N_PASSAGES, data=DUMMY_DATA):
        argv = finetune_argv(
            "--training_mode",
            mode,
            "--hard_negatives",
            "2",
            "--n_docs",
            str(n_docs),
            "--reconstruction_dir",
            str(recon_dir),
            "--reconstruction_ratio",
            ratio,
            "--mask_probability",
            mask,
            "--data_dir",
            str(data),
            *extra,
        )
        i = argv.index("--model_name_or_path")
        argv[i : i + 2] = [
            "--question_encoder_name_or_path",
            str(tiny_models["question_encoder"]),
            "--generator_name_or_path",
            str(tiny_models["generator"]),
        ]
        torch.manual_seed(0)
        args = finetune_rag.parse_args(argv)
        return finetune_rag.GenerativeQAModule(args, kb_search.KBSearch(*map(str, tiny_kb), HIDDEN))

    return make


def first_batch(module, size: int) -> dict:
    return next(iter(module._dataloader("train", size, shuffle=True)))


def record_prompts(module) -> list[str]:
    """The list that every prompt the generator builds from now on is appended to (its prompt building wrapped)."""
    prompts, generator = [], module.model.generator
    build = type(generator).prompts

    def recorded(questions, docs):
        made = build(generator, questions, docs)
        prompts.extend(made)
        return made

    generator.prompts = recorded
    return prompts


def read_step(module, batch: dict) -> tuple[list[str], list[str]]:
    """Every prompt the generator builds and every passage text the context encoder encodes in one training step
    (captured where each is made: the generator's prompt building, RagModel.encode_passages)."""
    model, encoded = module.model, []
    prompts = record_prompts(module) if model.generator is not None else []
    encode = type(model).encode_passages

    def recorded_passages(titles, texts):
        encoded.extend(texts)
        return encode(model, titles, texts)

    model.encode_passages = recorded_passages
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    return prompts, encoded


# ---------------------------------------------------------------- (a) what the model reads of a statement's passage


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_masked_statement_is_in_nothing_the_generator_or_the_context_encoder_reads(make_module, mode):
    """--mask_probability 1: the statement is in no prompt (neither its passage nor its question) and in no passage
    the context encoder encodes in the graph; 0: its own passage, retrieved (n_docs 40 is every passage) or mined as
    the positive, shows it to both. retriever_only is ICT: the positive is its passage without it. The whole
    statement, though the answer is cut to --max_target_length."""
    for mask, shown in (("1", False), ("0", True)):
        module = make_module(mode, "--max_target_length", "4", mask=mask)  # the answer: the statement's start
        batch = first_batch(module, 1)
        assert batch["kind"] == RECONSTRUCTION and batch["masks"][0] is not None
        statement = batch["masks"][0].sentence  # the whole statement (the answer is its start)
        prompts, encoded = read_step(module, batch)
        generator, encoder = module.model.generator is not None, module.objective.uses_context_encoder
        assert bool(prompts) == generator and bool(encoded) == encoder, (mode, len(prompts), len(encoded))
        assert any(statement in p for p in prompts) == (shown and generator), f"{mode} --mask_probability {mask}"
        assert any(statement in t for t in encoded) == (shown and encoder), f"{mode} --mask_probability {mask}"
        # The question the generator reads is the marker alone (seq2seq prompts: "title / text // question").
        assert all(p.endswith("// " + RECONSTRUCTION_MARKER.strip()) for p in prompts)


def test_only_a_statements_own_passage_is_cut_and_qa_batches_are_untouched(make_module, statements):
    module = make_module("rag_end2end", ratio="0.5", n_docs=N_PASSAGES)
    texts = list(load_from_disk(module.hparams.passages_path)["text"])
    kinds = {}
    for batch in module._dataloader("train", 2, shuffle=True):
        kinds.setdefault(batch.get("kind", QA), batch)
        if len(kinds) == 2:
            break
    prompts, _ = read_step(module, kinds[QA])
    assert all(any(p.endswith("// " + q) for p in prompts) for q in kinds[QA]["source_text"])
    batch = kinds[RECONSTRUCTION]
    prompts, encoded = read_step(module, batch)
    for i, (pid, sentence) in enumerate(batch["masks"]):
        shown = encoded[i * N_PASSAGES : (i + 1) * N_PASSAGES]  # question-major, every passage in some order
        assert sentence not in " ".join(shown)
        cut = [t for t in shown if t not in texts]
        assert cut == [mask_passage(texts[pid], sentence)], "not exactly its own passage, cut"


def test_the_masks_drawn_follow_the_probability_and_repeat_on_a_resume():
    masks = [Mask(i, f"s{i}") for i in range(2000)]
    lines = list(range(2000))
    drawn = draw_masks(masks, lines, 0.9, seed=7, step=3)
    kept = sum(m is not None for m in drawn) / len(masks)
    assert 0.87 < kept < 0.93
    assert drawn == draw_masks(masks, lines, 0.9, seed=7, step=3)  # the same step draws the same
    assert drawn != draw_masks(masks, lines, 0.9, seed=7, step=4)
    assert draw_masks(masks, lines, 1.0, 7, 3) == masks and draw_masks(masks, lines, 0.0, 7, 3) == [None] * 2000


def test_held_out_statements_validate_without_the_statement_in_the_prompt(make_module, recon_dir):
    """--data_dir RDIR validates on its held-out statements as statements: the generator's question is the marker
    (else it would copy the answer from its prompt), and nothing is cut from the passages."""
    module = make_module("rag_original", ratio="1", data=recon_dir)
    batch = next(iter(module.val_dataloader()))
    assert batch["kind"] == RECONSTRUCTION and batch["masks"] == [None] * len(batch["masks"])  # nothing to cut
    prompts = record_prompts(module)
    module.model.eval()
    module.validation_step(batch, 0)
    assert prompts and all(p.endswith("// " + RECONSTRUCTION_MARKER.strip()) for p in prompts)
    assert all(any(s in p for p in prompts) for s in batch["target_text"])  # their passages, uncut


# ---------------------------------------------------------------- (b) the mix


def sampler(
    n_qa: int, n_statements: int, ratio: float, batch: int = 4, replicas: int = 1, rank: int = 0, epoch: int = 0
) -> MixedBatchSampler:
    carrier = DistributedSampler(range(n_qa + n_statements), num_replicas=replicas, rank=rank, seed=3)
    carrier.set_epoch(epoch)
    return MixedBatchSampler(carrier, batch, n_qa=n_qa, n_statements=n_statements, ratio=ratio)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize(("n_qa", "n_statements"), [(40, 12), (37, 101)])
def test_statements_are_the_share_ratio_of_an_epochs_batches(ratio, n_qa, n_statements):
    n_qa = n_qa if ratio < 1 else 0
    for epoch in (0, 1):
        batches = list(sampler(n_qa, n_statements, ratio, epoch=epoch))
        statement = [all(i >= n_qa for i in b) for b in batches]
        assert all(s or all(i < n_qa for i in b) for s, b in zip(statement, batches)), "a batch mixes kinds"
        assert abs(sum(statement) - round(ratio * len(batches))) <= 1
        assert sorted(i for b in batches for i in b if i < n_qa) == list(range(n_qa))  # each QA pair once
        if ratio == 1:
            assert sorted(i for b in batches for i in b) == list(range(n_statements))  # each statement once
    assert list(sampler(n_qa, n_statements, ratio, epoch=0)) != list(sampler(n_qa, n_statements, ratio, epoch=1))


def test_ddp_ranks_share_the_pairs_and_step_through_the_same_kinds():
    ranks = [list(sampler(37, 20, 0.3, batch=3, replicas=2, rank=r, epoch=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(sampler(37, 20, 0.3, batch=3, replicas=2))
    kinds = [[b[0] >= 37 for b in batches] for batches in ranks]
    assert kinds[0] == kinds[1]  # every rank trains on the same kind at each step
    qa = [i for batches in ranks for b in batches for i in b if i < 37]
    assert sorted(set(qa)) == list(range(37)) and len(qa) == 38  # one pair repeated to pad, as DistributedSampler


def test_the_training_loader_of_the_module_gives_the_ratio(make_module):
    module = make_module("rag_original", ratio="0.25", n_docs=3)
    kinds = [batch.get("kind", QA) for batch in module.train_dataloader()]
    assert len(kinds) == len(module.train_dataloader()) == 20 + 7  # 40 pairs in 20 batches; 7 = round(20 / 3)
    assert kinds.count(RECONSTRUCTION) == 7 and set(kinds) == {QA, RECONSTRUCTION}


def test_a_loader_resumed_mid_epoch_gives_the_rest_of_that_epoch():
    """What Lightning does with the StatefulDataLoader: the state after 5 batches, loaded into a new loader (a new
    process), whose epoch Lightning sets before its first batch."""

    def loader():
        return StatefulDataLoader(list(range(30 + 11)), batch_sampler=sampler(30, 11, 0.4, epoch=1), collate_fn=list)

    whole = list(loader())
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + list(resumed) == whole


def test_lightning_can_put_its_ddp_sampler_into_the_mixed_loader(make_module):
    """Under DDP Lightning rebuilds the training loader with its DistributedSampler (rank, world size, the run's seed)
    in the batch sampler's `sampler` argument."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader

    module = make_module("rag_original", ratio="0.5", n_docs=3)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = module.train_dataloader()  # as Lightning calls the hook
    ddp = DistributedSampler(loader.dataset, num_replicas=2, rank=1, seed=module.hparams.seed)
    rebuilt = _update_dataloader(loader, ddp, mode=RunningStage.TRAINING)
    assert isinstance(rebuilt, StatefulDataLoader) and rebuilt.batch_sampler.sampler is ddp
    assert len(rebuilt) == 10 + 10  # rank 1's 20 pairs, 10 batches, and as many of statements
    assert {b.get("kind", QA) for b in rebuilt} == {QA, RECONSTRUCTION}


# ---------------------------------------------------------------- (c) the retriever learns from statements alone


@pytest.mark.parametrize("mode", ["rag_end2end", "rag_original", "retriever_only", "lsr"])
def test_a_statement_batch_trains_the_retriever(make_module, mode):
    module = make_module(mode, n_docs=3)
    batch = first_batch(module, 4)
    assert batch["kind"] == RECONSTRUCTION
    module.training_step(batch, 0).backward()
    parts = ["question_encoder", *(["ctx_encoder"] if module.objective.refreshes else [])]
    for part in parts:
        grads = [p.grad for p in getattr(module.model, part).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{mode}: no gradient in {part}"


def test_retriever_only_on_statements_is_the_inverse_cloze_task(make_module, statements):
    """Each statement's positive is its own passage without it; the others' passages are its in-batch negatives."""
    module = make_module("retriever_only", n_docs=3)
    batch = first_batch(module, 4)
    masks = module._masks(batch)
    mined = module._mined(batch, "train", masks)
    texts = list(load_from_disk(module.hparams.passages_path)["text"])
    for (pid, sentence), (_, positive) in zip(batch["masks"], mined.positive):
        assert positive == mask_passage(texts[pid], sentence) != texts[pid]
    _, encoded = read_step(module, batch)
    assert all(s not in t for s in batch["target_text"] for t in encoded[:4])


# ---------------------------------------------------------------- (d) real runs


def _metrics(out: Path) -> list[dict]:
    """The CSV log of the run's latest segment."""
    newest = max((out / "logs").rglob("metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return list(csv.DictReader(open(newest)))


def test_a_run_on_the_documents_alone_trains_on_statements_and_validates_on_qa(
    ray_local, finetune_argv, recon_dir, tmp_path
):
    data = tmp_path / "qa"  # held-out QA pairs only: no train.source
    data.mkdir()
    for split in ("val", "test"):
        for ext in ("source", "target"):
            shutil.copy(DUMMY_DATA / f"{split}.{ext}", data / f"{split}.{ext}")
    argv = finetune_argv(
        "--end2end",
        "--do_train",
        "--reconstruction_dir",
        str(recon_dir),
        "--reconstruction_ratio",
        "1",
        "--data_dir",
        str(data),
        "--max_steps",
        "4",
        "--val_check_interval",
        "2",
        "--log_every_n_steps",
        "1",
        "--num_sanity_val_steps",
        "0",
        "--indexing_freq",
        "100",
    )
    module = finetune_rag.main(finetune_rag.parse_args(argv))
    kill_actors(module)
    rows = _metrics(tmp_path / "out")
    steps = [r for r in rows if r.get("loss")]
    assert len(steps) == 4 and all(r["train_loss_recon"] == r["loss"] for r in steps)
    assert not any(r.get("train_loss_qa") for r in rows)
    assert [r["step"] for r in rows if r.get("val_em")] == ["1", "3"]  # two validations, on the 8 QA pairs
    assert module.val_dataloader().dataset.kind == QA and len(module.val_dataloader().dataset) == 8
    (events,) = (tmp_path / "out" / "logs").rglob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    assert len(board.Scalars("train_loss_recon")) == 4 and "train_loss_qa" not in board.Tags()["scalars"]


def test_a_mixed_run_logs_each_kinds_loss_and_resumes_mid_epoch_seeing_each_example_once(
    ray_local, finetune_argv, recon_dir, tmp_path, monkeypatch
):
    """Epochs of 20 QA batches and 20 statement batches (ratio 0.5). Stopped 3 batches into the second epoch and
    resumed, the run trains on the rest of that epoch's batches in its order (each QA pair once), and logs each
    batch's loss as train_loss_qa or train_loss_recon beside `loss`, never a value of an earlier step."""
    seen = []
    real_step = finetune_rag.GenerativeQAModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((batch.get("kind", QA), batch["index"].tolist()))
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(finetune_rag.GenerativeQAModule, "training_step", recording_step)
    argv = finetune_argv(
        "--do_train",
        "--num_sanity_val_steps",
        "0",
        "--check_val_every_n_epoch",
        "1000",
        "--reconstruction_dir",
        str(recon_dir),
        "--reconstruction_ratio",
        "0.5",
        "--log_every_n_steps",
        "1",
    )
    first = finetune_rag.main(finetune_rag.parse_args([*argv, "--max_steps", "43", "--save_last_every_n_steps", "43"]))
    kill_actors(first)
    plan = first.train_dataloader().batch_sampler
    expected = [
        (RECONSTRUCTION, [i - 40 for i in b]) if b[0] >= 40 else (QA, b)
        for epoch in (0, 1)
        for b in plan.epoch_batches(epoch)
    ]
    assert len(expected) == 80 and expected[:40] != expected[40:]
    assert seen == expected[:43]
    resume = [*argv, "--max_steps", "80", "--resume", "--allow_changed_settings"]
    kill_actors(finetune_rag.main(finetune_rag.parse_args(resume)))
    assert seen == expected, "the resumed epoch is not the rest of the stopped one"
    assert sorted(i for kind, b in seen[40:] if kind == QA for i in b) == list(range(40))
    rows = [r for r in _metrics(tmp_path / "out") if r.get("loss")]
    assert len(rows) == 37
    for row, (kind, _) in zip(rows, seen[43:]):
        assert row[f"train_loss_{kind}"] == row["loss"], row
        assert not row[f"train_loss_{QA if kind == RECONSTRUCTION else RECONSTRUCTION}"], row


# ---------------------------------------------------------------- (e) refusals


def refusal(capsys, argv: list[str]) -> str:
    """parse_args' one-line refusal (exit status 2, as the toolkit's other refused flags)."""
    with pytest.raises(SystemExit) as exit_info:
        finetune_rag.parse_args(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last
    return last


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--reconstruction_ratio", "0"], "--reconstruction_ratio must be in (0, 1]"),
        (["--reconstruction_ratio", "1.5"], "--reconstruction_ratio must be in (0, 1]"),
        ([], "give --reconstruction_ratio"),
        (["--reconstruction_ratio", "0.5", "--mask_probability", "1.2"], "--mask_probability must be in [0, 1]"),
        (["--reconstruction_ratio", "0.5", "--data_dir", "RDIR"], "its train split is statements"),
    ],
)
def test_bad_mix_settings_are_refused_in_one_line(finetune_argv, recon_dir, capsys, tmp_path, flags, says):
    argv = finetune_argv(
        "--do_train", "--reconstruction_dir", str(recon_dir), *(str(recon_dir) if f == "RDIR" else f for f in flags)
    )
    assert says in refusal(capsys, argv)
    assert not (tmp_path / "out").exists()
    ratio_alone = finetune_argv("--do_train", "--reconstruction_ratio", "0.5")
    assert "--reconstruction_ratio needs --reconstruction_dir" in refusal(capsys, ratio_alone)


def test_reconstruction_files_are_checked_before_any_work(finetune_argv, recon_dir, capsys, tmp_path):
    bad = tmp_path / "recon"
    shutil.copytree(recon_dir, bad)

    def refused() -> str:
        message = refusal(
            capsys, finetune_argv("--do_train", "--reconstruction_dir", str(bad), "--reconstruction_ratio", "0.5")
        )
        assert not (tmp_path / "out").exists(), "a refused run wrote its output directory"
        return message

    (bad / "train.gold.jsonl").unlink()
    assert f"--reconstruction_dir {bad} lacks train.gold.jsonl" in refused()
    shutil.copy(recon_dir / "train.gold.jsonl", bad)
    (bad / "train.target").write_text("".join((recon_dir / "train.target").read_text().splitlines(True)[:-1]))
    message = refused()
    assert f"{bad}/train.target 11 lines" in message and "must be line-aligned" in message
    shutil.copy(recon_dir / "train.target", bad)
    lines = (recon_dir / "train.gold.jsonl").read_text().splitlines(True)
    (bad / "train.gold.jsonl").write_text(
        "".join(lines[:2]) + '{"answers": ["x"], "mask": {"passage_id": "7"}}\n' + "".join(lines[3:])
    )
    assert f"{bad}/train.gold.jsonl:3: field `mask` must be null or" in refused()
    other = json.loads(lines[4])
    other["mask"]["passage_id"] = (other["mask"]["passage_id"] + 1) % N_PASSAGES  # another passage than its own
    (bad / "train.gold.jsonl").write_text("".join(lines[:4]) + json.dumps(other) + "\n" + "".join(lines[5:]))
    assert f"{bad}/train.gold.jsonl:5: the mask's sentence is not in passage" in refused()
    shutil.copy(recon_dir / "train.gold.jsonl", bad)
    assert finetune_rag.parse_args(finetune_argv("--reconstruction_dir", str(bad), "--reconstruction_ratio", "0.5"))


def test_documents_only_needs_no_qa_training_pairs_but_a_mix_does(finetune_argv, recon_dir, tmp_path):
    from rag_end2end.training.arguments import check_data_dir

    data = tmp_path / "qa"
    data.mkdir()
    for ext in ("source", "target"):
        shutil.copy(DUMMY_DATA / f"val.{ext}", data / f"val.{ext}")
    common = ["--do_train", "--reconstruction_dir", str(recon_dir), "--data_dir", str(data)]
    check_data_dir(finetune_rag.parse_args(finetune_argv(*common, "--reconstruction_ratio", "1")))
    with pytest.raises(FileNotFoundError, match=r"lacks train\.source, train\.target"):
        check_data_dir(finetune_rag.parse_args(finetune_argv(*common, "--reconstruction_ratio", "0.5")))


def test_the_python_api_passes_the_reconstruction_flags(recon_dir):
    from rag_end2end.api import _flags
    from rag_end2end.options import build_parser

    parsed = build_parser().parse_args(["--model_type", "rag_token"])
    flags = {"reconstruction_dir": recon_dir, "reconstruction_ratio": 0.5, "mask_probability": 0.9}
    argv = _flags(parsed, flags, "train")
    assert argv == [
        "--reconstruction_dir",
        str(recon_dir),
        "--reconstruction_ratio",
        "0.5",
        "--mask_probability",
        "0.9",
    ]
    assert np.isclose(build_parser().parse_args(["--model_type", "rag_token", *argv]).reconstruction_ratio, 0.5)
