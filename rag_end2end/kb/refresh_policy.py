"""Which passages a refresh re-encodes (--refresh_policy): all of them (`full`, the default), or a budget of 1/K of
the KB (--refresh_slices K) chosen as

- `rotating`: slice i mod K of the KB at the i-th partial refresh (contiguous slices: shard_bounds(n, K)), so that
  every passage is re-encoded at least once every K refreshes;
- `hot`: the passages retrieved for the training questions since the last refresh, the most often retrieved first,
  then their nearest neighbours in the live index (--hot_neighbours per passage), plus a seeded random share of
  the budget (--hot_random_share) from the rows not already chosen;

with a full refresh every N refreshes (--full_refresh_every; 0: never). A partial refresh keeps every other row's
vector as the live version holds it (kb.versions.publish_partial_kb_version).

    policy = RefreshPolicy("rotating", slices=4)
    rows = policy.rows(n_rows, history, recorded, search)   # sorted rows to re-encode, or None: all of them
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rag_end2end.kb.passages import shard_bounds

# search(rows, k) -> (len(rows), k) ids: the k nearest passages of each of `rows` in the live index, searched with the
# rows' stored vectors (Refresher.nearest_rows), best first.
Search = Callable[[np.ndarray, int], np.ndarray]
NEIGHBOUR_BATCH = 1024  # hot rows searched per call to the retrieval actors


@dataclass(frozen=True)
class RefreshPolicy:
    """--refresh_policy and its parameters; `seed` draws the hot set's random share (a generator of its own per
    refresh, so that training's random streams never move and a resumed run draws the same rows)."""

    name: str = "full"  # full, rotating or hot (options.REFRESH_POLICIES)
    slices: int = 4  # a partial refresh re-encodes 1/slices of the KB
    hot_random_share: float = 0.25  # hot: this share of the budget drawn at random from the rows not already chosen
    full_every: int = 0  # every N-th refresh re-encodes the whole KB; 0: never
    seed: int = 0
    hot_neighbours: int = 2  # hot: the nearest neighbours of each recorded row taken next (0: none)

    @property
    def partial(self) -> bool:
        return self.name != "full"

    def budget(self, n_rows: int) -> int:
        """Passages a partial refresh re-encodes: 1/slices of the KB, rounded up."""
        return -(-n_rows // self.slices)

    def check_kb(self, n_rows: int, kb: str) -> None:
        """Refuse more slices than the KB `kb` (how to name it) has passages."""
        if self.partial and self.slices > n_rows:
            raise ValueError(f"--refresh_slices {self.slices}: more slices than the {n_rows} passages of {kb}")

    def rows(
        self, n_rows: int, history: list[dict], recorded: Counter | None = None, search: Search | None = None
    ) -> np.ndarray | None:
        """The sorted rows the next refresh re-encodes, or None for all of them. `history`: the refreshes that
        went live so far (Refresher.history, restored on resume), whose count says which refresh this is and
        which slice comes next; `recorded`: how often each row was retrieved for training questions since then;
        `search`: finds the hot rows' neighbours in the live index (None: no neighbours)."""
        number = len(history) + 1  # this refresh's number, 1-based
        if not self.partial or (self.full_every and number % self.full_every == 0):
            return None
        if self.name == "rotating":
            done = sum(r.get("policy") == "rotating" for r in history)  # a failed refresh retries its slice
            start, end = shard_bounds(n_rows, self.slices)[done % self.slices]
            return np.arange(start, end, dtype=np.int64)
        neighbours = (self.hot_neighbours, search) if self.hot_neighbours and search is not None else None
        budget = self.budget(n_rows)
        return hot_rows(n_rows, budget, recorded or Counter(), self.hot_random_share, self.seed, number, neighbours)


def hot_rows(
    n_rows: int,
    budget: int,
    recorded: Counter,
    random_share: float,
    seed: int,
    number: int,
    neighbours: tuple[int, Search] | None = None,
) -> np.ndarray:
    """The hot set, sorted: the `recorded` rows most often retrieved (ties: the lower row), as many as the budget
    leaves after its random share; then, while that part of the budget has room, their nearest neighbours
    (`neighbours`: (m, search), m per recorded row; nearest_neighbours); then rows drawn at random (seeded by
    `seed` and the refresh's `number`) from the rows not chosen yet until `budget` rows are chosen (fewer recorded
    rows and neighbours leave more to chance)."""
    budget = min(budget, n_rows)
    hot_budget = budget - int(round(budget * random_share))
    ranked = sorted((row for row in recorded if 0 <= row < n_rows), key=lambda row: (-recorded[row], row))
    hot = np.array(ranked[:hot_budget], dtype=np.int64)
    if neighbours is not None and 0 < len(hot) < hot_budget:
        near = nearest_neighbours(hot, *neighbours, n_rows)
        hot = np.concatenate([hot, near[: hot_budget - len(hot)]])
    free = np.ones(n_rows, dtype=bool)  # a mask: np.setdiff1d sorted every row (44 s at 21 M rows on busy cores)
    free[hot] = False
    others = np.flatnonzero(free)  # the rows not chosen yet, in order: the same draw as before
    drawn = np.random.default_rng([seed, number]).choice(others, budget - len(hot), replace=False)
    return np.sort(np.concatenate([hot, drawn.astype(np.int64)]))


def nearest_neighbours(hot: np.ndarray, m: int, search: Search, n_rows: int) -> np.ndarray:
    """The `m` nearest other passages of each of the `hot` rows (their order: the most retrieved first) by `search`,
    best first: every hot row's nearest before any row's second nearest (ties: the more retrieved hot row's), each
    row once and none of the hot rows. The hot rows are searched NEIGHBOUR_BATCH at a time, each for m + 1 passages
    (the row itself is usually its own nearest; with dot products a longer vector may come first)."""
    found = []
    for start in range(0, len(hot), NEIGHBOUR_BATCH):
        batch = hot[start : start + NEIGHBOUR_BATCH]
        for row, ids in zip(batch.tolist(), np.asarray(search(batch, m + 1)).tolist()):
            others = list(dict.fromkeys(i for i in ids if i != row and 0 <= i < n_rows))[:m]
            found.append(others + [-1] * (m - len(others)))
    by_rank = np.asarray(found, dtype=np.int64).T.ravel()  # rank-major: the nearest of every hot row first
    by_rank = by_rank[(by_rank >= 0) & ~np.isin(by_rank, hot)]
    _, first = np.unique(by_rank, return_index=True)
    return by_rank[np.sort(first)]
