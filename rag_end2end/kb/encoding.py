"""Encoding passages with a context encoder: the one rule for a passage's vector (`passage_embeddings`), batched
encoding of tokenised passages (`encode_token_ids`: version 0's build, the refresh, the benchmarks), and the body of
a refresh's Ray encoding actor (`ShardEncoder`), which holds one shard of the KB tokenised and re-encodes it with
each snapshot of the context encoder's weights."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
from datasets import load_from_disk
from tqdm.auto import tqdm

from rag_end2end.files import atomic_write
from rag_end2end.kb.parts import part_writer
from rag_end2end.kb.passages import tokenize_passages
from rag_end2end.kb.ray_start import quiet_actor

# torch is imported by the functions that encode: the retrieval actors and the index builder never encode, and
# torch costs a process ~2.7 s of start-up and ~185 MB of memory.
if TYPE_CHECKING:
    import torch


def passage_embeddings(encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The one place that says how a context encoder turns tokens into a passage vector."""
    return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).pooler_output


def encode_token_ids(
    encoder: torch.nn.Module,
    token_ids: list[list[int]] | np.ndarray,
    pad_token_id: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    offsets: np.ndarray | None = None,
    bf16: bool = False,
) -> np.ndarray:
    """Encode pre-tokenised passages in eval mode; batches are sorted by length to cut padding. `token_ids`: a
    list of ids per passage (tokenize_passages), or, with `offsets`, all passages' ids one after another in one
    integer array, passage i being `token_ids[offsets[i] : offsets[i + 1]]` (ShardEncoder's compact form).
    `bf16`: autocast the forward pass to bfloat16 (the refresh on GPUs); the vectors come back as float32."""
    import torch

    if offsets is None:  # the same batches, gathered from one flat copy
        offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in token_ids], out=offsets[1:])
        token_ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(offsets[-1]))
    encoder.eval()
    lengths = np.diff(offsets)
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in tqdm(range(0, len(order), batch_size), desc="encoding passages", disable=not progress):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        mask = np.arange(width) < lengths[rows, None]  # row j: passage rows[j]'s ids, then padding
        ids = np.full(mask.shape, pad_token_id, dtype=np.int64)
        ids[mask] = token_ids[(offsets[rows, None] + np.arange(width))[mask]]
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
        with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            emb = passage_embeddings(encoder, ids.to(device), mask.to(device)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(lengths), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    return out


class ShardEncoder:
    """Body of a Ray encoding actor: holds one contiguous shard of the KB, tokenised once at start-up,
    and re-encodes it with whatever context-encoder weights it is handed."""

    TOKENIZE_CHUNK = 4096  # passages tokenised at a time at start-up
    ENCODE_WINDOW = 65_536  # passages sorted by length, encoded and written at a time by encode_to

    def __init__(
        self,
        passages_path: str,
        start: int,
        end: int,
        tokenizer,
        build_encoder,
        encoder_config,
        threads: int = 1,
        device: str = "cpu",
    ):
        import torch

        quiet_actor()
        # Where to encode is the driver's word (kb_refresh.Refresher): "cuda" for an actor Ray gave a GPU share (Ray
        # makes that GPU its only visible one), "cpu" for one that asked for none. CUDA_VISIBLE_DEVICES is no guide:
        # Ray 2.60 leaves an exported one (SLURM's) in place for actors without GPUs (ray-project/ray#62492).
        self.device = device
        if device != "cpu" and not torch.cuda.is_available():
            raise RuntimeError(
                f"this encoding actor holds GPU {ray.get_gpu_ids()} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')}), but torch finds no CUDA device here (torch "
                f"{torch.__version__}): install a CUDA build of torch where the encoding actors run, or --index_gpus 0"
            )
        if device == "cpu":
            # An explicit budget (--index_cpus): the trainer shares these cores, and both slow down badly when
            # their threads together outnumber the cores.
            torch.set_num_threads(threads)
        # The shard's token ids in compact form (encode_token_ids' `offsets`): one int32 array of all its passages'
        # ids, 4 bytes a token where lists of Python ints take ~40, tokenised a chunk at a time so that neither
        # the texts nor the tokenizer's lists are ever held for the whole shard.
        passages = load_from_disk(passages_path).select_columns(["title", "text"])
        ids, lengths = [np.empty(0, dtype=np.int32)], [np.zeros(1, dtype=np.int64)]
        for chunk in range(start, end, self.TOKENIZE_CHUNK):
            rows = passages[chunk : min(chunk + self.TOKENIZE_CHUNK, end)]
            chunk_ids = tokenize_passages(tokenizer, rows["title"], rows["text"])
            lengths.append(np.array([len(x) for x in chunk_ids], dtype=np.int64))
            flat = itertools.chain.from_iterable(chunk_ids)
            ids.append(np.fromiter(flat, dtype=np.int32, count=int(lengths[-1].sum())))
        self.passages_path, self.start, self.end = passages_path, start, end
        self.token_ids = np.concatenate(ids)
        self.offsets = np.cumsum(np.concatenate(lengths))  # passage i: token_ids[offsets[i] : offsets[i + 1]]
        self.pad_token_id = tokenizer.pad_token_id
        self.encoder = build_encoder(encoder_config).to(self.device).eval()  # e.g. a class, or encoder_factory(...)

    @contextmanager
    def _weights(self, state_dict: dict, threads: int | None) -> Iterator[None]:
        """Load `state_dict`, with `threads` CPU threads until the block ends (when training waits for it)."""
        import torch

        self.encoder.load_state_dict(state_dict)
        before = torch.get_num_threads()
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
            if self.device != "cpu":
                # Hand the refresh's activations back to the GPU: PyTorch's allocator keeps freed blocks cached for
                # this process, and a training process sharing the GPU (--index_gpus 0.5) would go short of them
                # until the next refresh. The weights stay (the next refresh loads into them).
                torch.cuda.empty_cache()

    def _encode(self, offsets: np.ndarray, batch_size: int, token_ids: np.ndarray | None = None) -> np.ndarray:
        from rag_end2end.precision import native_bf16  # torch, which this module imports only where it encodes

        # bf16 on GPUs that have it: twice the throughput, and the KB is only searched with these vectors
        # (rag_end2end re-encodes the retrieved passages in float32 inside the graph).
        bf16 = self.device != "cpu" and native_bf16()  # not emulated (pre-Ampere): that would be slower
        token_ids = self.token_ids if token_ids is None else token_ids
        return encode_token_ids(
            self.encoder, token_ids, self.pad_token_id, batch_size, self.device, False, offsets, bf16
        )

    def encode(self, state_dict: dict, batch_size: int = 64, threads: int | None = None) -> np.ndarray:
        """The shard's embeddings under `state_dict`; `threads` CPU threads for this call."""
        with self._weights(state_dict, threads):
            return self._encode(self.offsets, batch_size)

    def encode_to(self, state_dict: dict, path: str, batch_size: int = 64, threads: int | None = None) -> int:
        """Encode the shard `ENCODE_WINDOW` passages at a time, appending each window's rows and vectors to the
        part file `path` of a version being built; returns the rows. The actor never holds the whole shard's
        vectors, and they go to disk from here instead of through Ray's object store to the builder."""
        n = len(self.offsets) - 1
        with self._weights(state_dict, threads), part_writer(self.passages_path, self.start, self.end, path) as write:
            for a in range(0, n, self.ENCODE_WINDOW):
                write(self._encode(self.offsets[a : min(a + self.ENCODE_WINDOW, n) + 1], batch_size))
        return n

    def encode_rows_to(
        self, state_dict: dict, rows: np.ndarray, path: str, batch_size: int = 64, threads: int | None = None
    ) -> int:
        """A partial refresh's share of this shard: encode the sorted KB `rows` (all inside the shard)
        `ENCODE_WINDOW` at a time, each window's vectors written, in that order, into the .npy file `path` as they
        come (a memory map; renamed into place once whole), so the actor holds one window's vectors, as encode_to;
        returns how many. The builder puts them into the new version beside the rows it keeps
        (kb.versions.publish_partial_kb_version)."""
        local = np.asarray(rows, dtype=np.int64) - self.start
        if len(local) and (local[0] < 0 or local[-1] >= self.end - self.start):
            raise ValueError(f"rows {rows[0]}..{rows[-1]} are not all in this shard [{self.start}, {self.end})")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._weights(state_dict, threads), atomic_write(path, "KB vectors") as tmp:
            out = None
            for a in range(0, len(local), self.ENCODE_WINDOW):
                window = local[a : a + self.ENCODE_WINDOW]
                lengths = self.offsets[window + 1] - self.offsets[window]
                offsets = np.concatenate([[0], np.cumsum(lengths)])  # the window's passages, one after another
                ids = np.concatenate([self.token_ids[self.offsets[r] : self.offsets[r + 1]] for r in window])
                vectors = self._encode(offsets, batch_size, ids)
                if out is None:  # the vectors' size is known from the first window
                    out = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.float32, shape=(len(local), vectors.shape[1])
                    )
                out[a : a + len(window)] = vectors
            if out is None:
                with open(tmp, "wb") as empty:
                    np.save(empty, np.empty((0, 0), dtype=np.float32))
            else:
                out.flush()
                del out  # unmapped before the rename
        return len(local)
