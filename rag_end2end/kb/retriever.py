"""The retrievers the RAG model calls in training: `RagRayDistributedRetriever` spreads searches round-robin over
the Ray retrieval actors (kb.actors); `ShardedRetriever` sends each query to every shard actor and merges their
parts into the top-k one exact index over all passages gives, from one KB version (`merge_shard_answers`). A call
that meets a dead or stuck actor is retried (`_retrying`, the one retry loop of every call to these actors), so
training never sees the death."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rag_end2end.kb.index import fill_misses
from rag_end2end.kb.search import Hits
from rag_end2end.kb.versions import KBVersion

# A dead actor comes back within seconds (a new process that imports faiss and loads the KB): 40 tries
# 0.5 s apart ride that out, or go round the other actors.
MAX_RETRIEVAL_ATTEMPTS = 40
RETRY_PAUSE_S = 0.5
# A search takes milliseconds, but an actor Ray restarted first loads the live KB inside the call (minutes for a
# large one): an actor that gives no answer for this long is stuck (stopped, swapping, deadlocked) and restarted.
RETRIEVAL_TIMEOUT_S = 300.0
RELOAD_TIMEOUT_S = 1800.0  # the first call to an actor being restarted, which loads the KB before it answers
log = logging.getLogger(__name__)
T = TypeVar("T")


class RagRayDistributedRetriever:
    """Top-k search in the Ray retrieval actors, spread round-robin: `retrieve(q, n, embeddings=True) ->
    (embeddings or None, ids, docs)`, what rag_model.RagModel asks of any retriever. A call whose actor died is
    retried on the next actor (or the same one once Ray has restarted it), so training never sees the death;
    `actor_restarts` counts the actors that came back. `live_kb` is the newest version this rank has seen served
    or made live."""

    def __init__(self, actor_handles: list, rank: int = 0, timeout_s: float = RETRIEVAL_TIMEOUT_S):
        if not actor_handles:
            raise ValueError(f"{type(self).__name__} needs at least one retrieval actor")
        self.actors = list(actor_handles)
        self._index_of = {handle._actor_id.hex(): i for i, handle in enumerate(self.actors)}  # RayActorError's id
        self.timeout_s = timeout_s
        self.timeouts = 0  # calls that got no answer in timeout_s (their actor was restarted)
        self._next = rank  # ranks start at different actors so their requests interleave
        self.live_kb: KBVersion | None = None
        self.last_version: int | None = None
        self.actor_restarts = 0
        self._dead: set[int] = set()  # actors whose last call failed because they died
        # While set (by KBRefreshCallback, around training steps), every row `retrieve` returns is counted here: the
        # hot set of --refresh_policy hot.
        self.recorder: Counter | None = None

    def init_retrieval(self, kb: KBVersion) -> int:
        """Make sure every actor serves a version, loading `kb` if none; returns the newest version served."""
        self.live_kb = self.live_kb or kb
        versions = ray.get([a.ensure_live.remote(kb) for a in self.actors])
        return max(versions)

    def retrieve(self, query_vectors: np.ndarray, n_docs: int, embeddings: bool = True):
        """Top-`n_docs` passages for each query vector (the pooled question vector, already divided by tau: its
        inner product with a stored passage vector is the doc score), from one KB version."""
        hits = self.search(query_vectors, n_docs, embeddings)
        self._record(hits)
        return hits.embeddings, hits.ids, hits.docs

    def search(self, queries: np.ndarray, n_docs: int, embeddings: bool = True) -> Hits:
        """The top-`n_docs` of each query from one version, never recorded in the hot set (`retrieve` records)."""
        return self._retrying(lambda: self._ask_next(queries, n_docs, embeddings), "no retrieval actor answered")

    def _record(self, hits: Hits) -> None:
        if self.recorder is not None:
            self.recorder.update(np.asarray(hits.ids).ravel().tolist())

    def _ask_next(self, queries: np.ndarray, n_docs: int, embeddings: bool) -> Hits:
        """One call to the next actor in turn."""
        i = self._next % len(self.actors)
        self._next += 1
        (hits,) = self._get([self.actors[i].retrieve.remote(queries, n_docs, self.live_kb, embeddings)], [i])
        if i in self._dead:
            self._dead.discard(i)
            self.actor_restarts += 1
        self._served(hits.kb)
        return hits

    def _served(self, kb: KBVersion) -> None:
        """Record the version an answer came from."""
        if self.live_kb is None or kb.version >= self.live_kb.version:
            self.live_kb = kb
        self.last_version = kb.version

    def _retrying(self, attempt: Callable[[], T | None], what: str) -> T:
        """`attempt()` until it returns an answer, at most MAX_RETRIEVAL_ATTEMPTS times: the one retry loop of the
        calls to retrieval actors. An actor that died mid-call or is restarting (RayActorError) comes back by
        itself (max_restarts=-1): the call is made again RETRY_PAUSE_S later (round-robin, to the next actor); one
        that gave no answer in time (GetTimeoutError) was restarted by `_get`, and the call is made again at once;
        so is one whose answer was None (a shard's, overtaken by an activation)."""
        error = None
        for _ in range(MAX_RETRIEVAL_ATTEMPTS):
            try:
                answer = attempt()
            except GetTimeoutError as err:
                error = err
                continue
            except RayActorError as err:
                error = err
                time.sleep(RETRY_PAUSE_S)
                continue
            if answer is not None:
                return answer
        raise RuntimeError(f"{what} in {MAX_RETRIEVAL_ATTEMPTS} attempts") from error

    def _get(self, refs: list, actors: Sequence[int], timeout: bool = True) -> list:
        """`ray.get(refs)`, the calls just made to `actors` (positions in self.actors), within the timeout unless
        `timeout` is False. The actors still silent then are restarted (GetTimeoutError), a dead one is marked
        (RayActorError); either error is raised on, for `_retrying`."""
        try:
            return ray.get(refs, timeout=self._timeout(actors) if timeout else None)
        except GetTimeoutError:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            self._restart_stuck([actors[refs.index(ref)] for ref in pending])
            raise
        except RayActorError as err:
            died = self._index_of.get(err.actor_id)
            self._dead.update(actors if died is None else [died])
            raise

    def _timeout(self, actors: Sequence[int]) -> float:
        """How long a call to these actors may take: longer while one is being restarted (it loads the KB first)."""
        return max(self.timeout_s, RELOAD_TIMEOUT_S) if self._dead.intersection(actors) else self.timeout_s

    def _restart_stuck(self, stuck: list[int]) -> None:
        """Kill the actors that gave no answer in timeout_s; Ray restarts them (max_restarts=-1) and the next
        call goes to another actor, or to the restarted one, which first loads the live version."""
        self.timeouts += len(stuck)
        for i in stuck:
            log.warning(
                "retrieval actor %d gave no answer in %.0f s: restarting it, retrying the call elsewhere",
                i,
                self.timeout_s,
            )
            ray.kill(self.actors[i], no_restart=False)
            self._dead.add(i)

    def stage(self, kb: KBVersion) -> list:
        """Start loading `kb` in every actor; returns the object refs to poll (an actor that dies meanwhile
        loads it in `activate`)."""
        return [a.stage.remote(kb) for a in self.actors]

    def activate(self, kb: KBVersion) -> None:
        """Switch every actor to `kb` (milliseconds: a pointer assignment each, for actors that staged it)."""
        for i, actor in enumerate(self.actors):
            self._retrying(
                lambda i=i, actor=actor: self._get([actor.activate.remote(kb.version, kb)], [i], timeout=False),
                f"retrieval actor {i} did not make v{kb.version} live",
            )
        self.live_kb = kb


def merge_shard_answers(answers: list[Hits], n_docs: int) -> Hits:
    """The best `n_docs` over the shards' answers (with scores, from one version): by score, ties to the lower global
    id, so that the result is what one exact index over all rows returns."""
    scores = np.concatenate([a.scores for a in answers], axis=1)
    ids = np.concatenate([a.ids for a in answers], axis=1)
    order = np.lexsort((ids, -scores), axis=1)[:, :n_docs]
    # What no shard found (fewer hits than n_docs over them all: a shard's miss scores -inf) is filled as one index's
    # search fills it.
    order = fill_misses(order, ~np.isfinite(np.take_along_axis(scores, order, 1)))
    embeds = None if answers[0].embeddings is None else np.concatenate([a.embeddings for a in answers], axis=1)
    docs = []
    for query, picks in enumerate(order):
        pooled = {col: [v for a in answers for v in a.docs[query][col]] for col in answers[0].docs[query]}
        docs.append({col: [values[j] for j in picks] for col, values in pooled.items()})
    top_embeds = None if embeds is None else np.take_along_axis(embeds, order[:, :, None], 1)
    top_ids, top_scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    return Hits(top_ids, top_embeds, docs, answers[0].kb, top_scores)


class ShardedRetriever(RagRayDistributedRetriever):
    """Exact top-k over shard actors (start_shard_actors): each query goes to every shard at once and their
    answers are merged by score. An answer never mixes KB versions: while an activation travels over the
    shards they may answer from two versions, and the odd ones are asked again for one version all hold."""

    def search(self, queries: np.ndarray, n_docs: int, embeddings: bool = True) -> Hits:
        """The top-`n_docs` over all shards, from one version, with their scores."""
        return self._retrying(lambda: self._fan_out(queries, n_docs, embeddings), "the retrieval shards gave no answer")

    def _fan_out(self, queries: np.ndarray, n_docs: int, embeddings: bool) -> Hits | None:
        """One query to every shard, their parts merged; None when a second activation overtook it."""
        refs = [s.search.remote(queries, n_docs, None, self.live_kb, embeddings) for s in self.actors]
        answers = self._one_version(queries, n_docs, self._get(refs, range(len(refs))), embeddings)
        if answers is None:
            return None
        self.actor_restarts += len(self._dead)
        self._dead.clear()
        hits = merge_shard_answers(answers, n_docs)
        self._served(hits.kb)
        return hits

    def _one_version(
        self, queries: np.ndarray, n_docs: int, answers: list[Hits], embeddings: bool
    ) -> list[Hits] | None:
        """`answers` all from one version: the shards that answered from another are asked for it. None when
        no version was found that every shard still holds."""
        # Activated versions first (a restarted shard's own pick may be stale), newest first: every shard holds
        # a version being activated (staged, live or just replaced) until `activate` releases it.
        preference = sorted({(not a.adopted, a.kb.version): a.kb for a in answers}.items(), reverse=True)
        tried = set()
        for (_, version), kb in preference:
            odd = [i for i, a in enumerate(answers) if a.kb.version != version]
            if not odd:
                return answers
            if version in tried:
                continue
            tried.add(version)
            again = self._get(
                [self.actors[i].search.remote(queries, n_docs, kb, None, embeddings) for i in odd], odd, timeout=False
            )
            if all(a is not None for a in again):
                return [again[odd.index(i)] if i in odd else a for i, a in enumerate(answers)]
        return None

    def activate(self, kb: KBVersion) -> None:
        """Switch every shard to `kb` (each staged it), then let each drop the version it replaced."""
        super().activate(kb)
        for shard in self.actors:
            try:
                ray.get(shard.release.remote(kb.version))
            except RayActorError:  # restarted: it holds nothing to release
                pass
