"""FAISS on GPUs where this process has them, and on CPU everywhere else, unchanged.

One rule says whether FAISS may use GPUs here (`visible_gpus`: a faiss built with GPU support, and GPUs visible to
this process: in a Ray actor, the ones Ray gave it); `to_gpu` moves an index there for search and `train_index`
runs the k-means of IVF/PQ training there. With the pinned faiss-cpu, no GPU, or `--faiss_gpu off`, both return the
CPU index untouched, so CPU-only set-ups behave exactly as before:

    index = to_gpu(read_index(path), "auto")        # a GPU index (replicas or shards over several GPUs), or `index`
    train_index(index, sample, "auto")              # IVF lists and PQ codebooks trained on the GPUs; `index` stays
                                                    # a CPU index: what a KB version stores is the same kind of file

Modes (`--faiss_gpu`): auto (GPUs when there are some, else CPU with one info log line), replicate (a full copy of
the index on each GPU; queries are split among them), shard (1/n of the vectors on each GPU, every query searched
on all and merged: n times the index fits), off. HNSW has no GPU version in faiss: an HNSW index stays on CPU.
The GPU wheel that replaces faiss-cpu: docs/large-kbs.md, "FAISS on GPUs".
"""

from __future__ import annotations

import functools
import logging
import math
import sys

import faiss
import numpy as np

from rag_end2end.options import FAISS_GPU_MODES

FORCED_MODES = ("replicate", "shard")  # the user asked for GPUs: refuse or fail rather than fall back to CPU
GPU_WHEEL = "faiss-gpu"  # the PyPI package (CUDA 12) that replaces faiss-cpu at the same version
log = logging.getLogger(__name__)


def faiss_has_gpu() -> bool:
    """Whether this faiss was built with GPU support (faiss-gpu; faiss-cpu has no StandardGpuResources)."""
    return hasattr(faiss, "StandardGpuResources")


def faiss_build() -> str:
    """This faiss, for messages: e.g. "faiss 1.15.1, a CPU-only build"."""
    return f"faiss {faiss.__version__}, a {'GPU' if faiss_has_gpu() else 'CPU-only'} build"


def _ray_gave_no_gpu() -> bool:
    """In a Ray worker that Ray gave no GPU. Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it found it for an actor with
    num_gpus=0, so such an actor sees every GPU of its machine, including those Ray gave other actors."""
    ray = sys.modules.get("ray")  # only a process that uses Ray can be a Ray worker: never import it here
    if ray is None or not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    return context.worker.mode == ray.WORKER_MODE and not context.get_accelerator_ids().get("GPU")


def visible_gpus() -> int:
    """GPUs FAISS may use in this process: 0 without GPU support or in a Ray worker Ray gave no GPU; else every GPU
    faiss sees (CUDA_VISIBLE_DEVICES applies, and Ray sets it to the GPUs it gave an actor)."""
    if not faiss_has_gpu() or _ray_gave_no_gpu():
        return 0
    return faiss.get_num_gpus()


@functools.cache
def _note(message: str, level: int = logging.INFO) -> None:
    """Log `message` once per process (an actor loads every KB version, a builder trains every refresh)."""
    log.log(level, message)


def check_mode(mode: str) -> None:
    if mode not in FAISS_GPU_MODES:
        raise ValueError(f"--faiss_gpu {mode!r}: choose one of {', '.join(FAISS_GPU_MODES)}")


def forced_gpu_refusal(mode: str, index_gpus: float) -> str | None:
    """Why `--faiss_gpu mode` with `--index_gpus index_gpus` cannot run (None when it can, as far as the flags
    tell): a forced GPU mode needs a faiss with GPU support and index GPUs to run on. finetune_rag.py's check."""
    if mode not in FORCED_MODES:
        return None
    if not faiss_has_gpu():
        return (
            f"--faiss_gpu {mode}: {faiss_build()} has no GPU support; replace faiss-cpu with {GPU_WHEEL} "
            "(docs/large-kbs.md, FAISS on GPUs), or leave --faiss_gpu auto"
        )
    if index_gpus <= 0:
        return f"--faiss_gpu {mode} runs FAISS on the index GPUs: give --index_gpus > 0 (e.g. 0.5 to share one)"
    return None


def gpus_for(mode: str) -> int:
    """GPUs FAISS uses in this process under `mode`: 0 for off, and for auto without any (one info log line); a
    forced mode without any raises ValueError naming the flag."""
    check_mode(mode)
    if mode == "off":
        return 0
    n = visible_gpus()
    if n == 0:
        why = f"{faiss_build()} has no GPU support" if not faiss_has_gpu() else "no GPU is visible to this process"
        if mode in FORCED_MODES:
            raise ValueError(f"--faiss_gpu {mode}: {why}")
        _note(f"FAISS runs on CPU here: {why}")
    return n


def is_hnsw(index: faiss.Index) -> bool:
    """Whether `index` searches an HNSW graph (behind any pre-transform): faiss has no GPU version of it."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexHNSW)


def cloner_options(index: faiss.Index, shard: bool) -> faiss.GpuMultipleClonerOptions:
    """How `index` is copied to GPUs: sharded or replicated; float16 lookup tables for an IVF-PQ whose float32
    tables exceed a GPU block's 48 KiB of shared memory (more than 48 one-byte sub-quantizers, e.g. PQ96)."""
    co = faiss.GpuMultipleClonerOptions()
    co.shard = shard
    ivf = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None and pq.M * pq.ksub * 4 > 48 * 1024:
        co.useFloat16 = True  # for an IVF-PQ the cloner reads it as GpuIndexIVFPQConfig.useFloat16LookupTables
    return co


def _on_gpus(index: faiss.Index, n: int, co: faiss.GpuMultipleClonerOptions) -> faiss.Index:
    """`index` copied to GPU 0 (n == 1) or over the first n GPUs as `co` says (replicas or shards)."""
    if n == 1:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index, co)
        gpu.referenced_objects = [res]  # the resources live as long as the index
        return gpu
    return faiss.index_cpu_to_all_gpus(index, co, ngpu=n)


def to_gpu(index: faiss.Index, mode: str = "auto") -> faiss.Index:
    """`index` on this process's GPUs for search (`mode`: replicate or shard over several; auto replicates), or
    `index` itself when FAISS stays on CPU (see gpus_for) or the index is HNSW, which faiss cannot search on a GPU.
    In auto mode an index faiss cannot copy (an unsupported type, too little GPU memory) stays on CPU with a
    warning; a forced mode raises. The copy answers `search` like the CPU index (top-k, scores, ids)."""
    n = gpus_for(mode)
    if n == 0:
        return index
    if is_hnsw(index):
        _note("HNSW has no GPU version in faiss: the HNSW index stays on CPU", logging.WARNING)
        return index
    try:
        return _on_gpus(index, n, cloner_options(index, shard=mode == "shard"))
    except RuntimeError as err:
        if mode in FORCED_MODES:
            raise RuntimeError(f"--faiss_gpu {mode}: faiss cannot put this index on the GPU ({err})") from None
        log.warning("FAISS: the index stays on CPU: faiss could not copy it to the GPU (%s)", err)
        return index


def train_index(index: faiss.Index, vectors: np.ndarray, mode: str = "auto") -> None:
    """`index.train(vectors)`, with the k-means of an IVF index (its coarse quantizer's lists: Wikipedia's 65,536
    are hours of CPU) and of its PQ codebooks assigning on this process's GPUs when FAISS goes on GPU here: the
    faiss way of training on GPU for a CPU index (a GPU flat index as the clustering index). Everything else, and
    `index` itself, stay on CPU, so the stored index is the CPU index it always was. On CPU (gpus_for: 0) this is
    exactly `index.train(vectors)`."""
    n = gpus_for(mode)
    ivf = faiss.try_extract_index_ivf(index) if n else None
    if ivf is None:
        index.train(vectors)
        return
    ivf = faiss.downcast_index(ivf)
    helpers = []  # the GPU indexes lent to the trainers: faiss keeps raw pointers to them
    # 0: k-means with the quantizer's own metric (inner product here); 2: k-means in L2, then the quantizer (e.g.
    # HNSW) is built on the centroids; 1: the quantizer trains itself (e.g. residual quantizers): left on CPU.
    trains_alone = ord(ivf.quantizer_trains_alone)
    if trains_alone in (0, 2):
        metric = ivf.quantizer.metric_type if trains_alone == 0 else faiss.METRIC_L2
        helpers.append(_on_gpus(faiss.IndexFlat(ivf.d, metric), n, faiss.GpuMultipleClonerOptions()))
        ivf.clustering_index = helpers[-1]
    pq = getattr(ivf, "pq", None)  # IVF-PQ: each sub-quantizer's 256 centroids, on the residuals
    if pq is not None:
        helpers.append(_on_gpus(faiss.IndexFlatL2(pq.dsub), n, faiss.GpuMultipleClonerOptions()))
        pq.assign_index = helpers[-1]
    try:
        index.train(vectors)
    finally:  # no pointer to a freed GPU index stays behind (a second train() would follow it)
        ivf.clustering_index = None
        if pq is not None:
            pq.assign_index = None


def gpu_share(index_gpus: float, faiss_actors: int, cluster_gpus: float) -> float:
    """Ray GPUs each of `faiss_actors` FAISS actors asks for: beside the encoding actors' `index_gpus` they share
    what the cluster has left, at most as much again, split evenly (a whole number each above one GPU, as Ray
    needs); 0 when nothing is left. E.g. 1 GPU and --index_gpus 0.5: the encoders 0.5, two FAISS actors 0.25 each."""
    left = min(index_gpus, cluster_gpus - index_gpus)
    if left <= 0 or faiss_actors < 1:
        return 0.0
    share = left / faiss_actors
    return float(math.floor(share)) if share >= 1 else math.floor(share * 10_000) / 10_000


def faiss_actor_gpus(mode: str, index_gpus: float, faiss_actors: int) -> tuple[float, str]:
    """(Ray GPUs each FAISS actor asks for, the mode they run with) in a Ray cluster: the retrieval actors (or
    shards) and the refresh's index builder, `faiss_actors` in all. (0, "off") keeps them on CPU, where they ask Ray
    for no GPU, as before: --faiss_gpu off, a faiss without GPU support, --index_gpus 0, or no GPU left beside the
    encoders (auto: one info log line; a forced mode raises ValueError naming the flags)."""
    check_mode(mode)
    if mode == "off":
        return 0.0, "off"
    if not faiss_has_gpu():
        why = f"{faiss_build()} has no GPU support ({GPU_WHEEL}: docs/large-kbs.md)"
    elif index_gpus <= 0:
        why = "--index_gpus 0: no index GPUs"
    else:
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        share = gpu_share(index_gpus, faiss_actors, cluster_gpus)
        if share:
            return share, mode
        why = (
            f"Ray's {cluster_gpus:g} GPU(s) leave no share beside --index_gpus {index_gpus:g} (the encoding "
            "actors'): give a fraction, e.g. --index_gpus 0.5, so that encoding and FAISS share a GPU"
        )
    if mode in FORCED_MODES:
        raise ValueError(f"--faiss_gpu {mode}: {why}")
    _note(f"FAISS searches and trains on CPU: {why}")
    return 0.0, "off"
