"""The reference's module name, kept for its users' imports; the code is in `rag_end2end.kb.ray_start` (Ray
start-up, the GPU plan), `rag_end2end.kb.actors` (the retrieval actors) and `rag_end2end.kb.retriever` (the
retrievers). `ShardAnswer` is `rag_end2end.kb.search.Hits`, what every retrieval actor now answers."""

from rag_end2end.kb.actors import RetrievalActor, ShardActor, start_retrieval_actors, start_shard_actors
from rag_end2end.kb.ray_start import (
    RAY_ADDRESS_ENV,
    GpuPlan,
    check_reachable,
    init_ray,
    plan_gpus,
    shutdown_ray,
    visible_gpu_ids,
)
from rag_end2end.kb.retriever import (
    MAX_RETRIEVAL_ATTEMPTS,
    RELOAD_TIMEOUT_S,
    RETRIEVAL_TIMEOUT_S,
    RETRY_PAUSE_S,
    RagRayDistributedRetriever,
    ShardedRetriever,
    merge_shard_answers,
)
from rag_end2end.kb.search import Hits as ShardAnswer

__all__ = [
    "GpuPlan",
    "visible_gpu_ids",
    "plan_gpus",
    "init_ray",
    "shutdown_ray",
    "check_reachable",
    "RetrievalActor",
    "start_retrieval_actors",
    "ShardAnswer",
    "ShardActor",
    "start_shard_actors",
    "RagRayDistributedRetriever",
    "merge_shard_answers",
    "ShardedRetriever",
    "RAY_ADDRESS_ENV",
    "MAX_RETRIEVAL_ATTEMPTS",
    "RETRY_PAUSE_S",
    "RETRIEVAL_TIMEOUT_S",
    "RELOAD_TIMEOUT_S",
]
