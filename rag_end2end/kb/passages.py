"""A knowledge base's passages: documents split into 100-word passages (as the reference), tokenised as the
RAG retriever tokenises them, and contiguous row ranges (shards) of them for the encoding and shard actors."""

from __future__ import annotations

from datasets import Dataset


def split_text(text: str, n: int = 100, character: str = " ") -> list[str]:
    """Split `text` every `n` occurrences of `character` (100-word passages, as the reference)."""
    words = text.split(character)
    return [character.join(words[i : i + n]).strip() for i in range(0, len(words), n)]


def split_documents(docs: list[tuple[str, str]], n_words: int = 100) -> Dataset:
    """Turn (title, text) documents into a `datasets.Dataset` of 100-word passages."""
    titles, texts = [], []
    for title, text in docs:
        for passage in split_text(text, n_words):
            if passage:
                titles.append(title)
                texts.append(passage)
    return Dataset.from_dict({"title": titles, "text": texts})


def tokenize_passages(tokenizer, titles: list[str], texts: list[str]) -> list[list[int]]:
    """Tokenise (title, text) pairs exactly as the RAG retriever does for the in-graph encoder."""
    return tokenizer(list(titles), list(texts), truncation=True)["input_ids"]


def shard_bounds(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Balanced, non-empty, contiguous [start, end) row ranges; merging them in order restores row order."""
    if n_rows < 1 or n_shards < 1:
        raise ValueError(f"cannot split {n_rows} rows into {n_shards} shards")
    n_shards = min(n_shards, n_rows)
    base, extra = divmod(n_rows, n_shards)
    bounds, start = [], 0
    for i in range(n_shards):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds
