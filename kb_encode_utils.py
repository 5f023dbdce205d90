"""The reference's module name, kept for its users' imports; the code is in `rag_end2end.kb`'s modules, each named
for its job (passages, encoding, index, parts, similarity, versions, ray_start), and `rag_end2end.files`."""

from rag_end2end.files import process_alive, remove_orphaned_temporaries, temporary_sibling, writing
from rag_end2end.kb.encoding import ShardEncoder, encode_token_ids, passage_embeddings
from rag_end2end.kb.index import IndexConfig, build_faiss_index, new_faiss_index
from rag_end2end.kb.parts import (
    PART_BATCH_ROWS,
    part_path,
    part_writer,
    vectors_array,
    with_embeddings,
    write_passages_part,
)
from rag_end2end.kb.passages import shard_bounds, split_documents, split_text, tokenize_passages
from rag_end2end.kb.ray_start import quiet_actor
from rag_end2end.kb.similarity import (
    KB_INFO_FILE,
    UNIT_NORM_TOLERANCE,
    check_kb_similarity,
    kb_similarity,
    write_kb_info,
)
from rag_end2end.kb.versions import (
    READY_MARKER,
    VERSION_DIR_RE,
    KBBuilder,
    KBVersion,
    build_kb_version,
    list_versions,
    prune_versions,
    publish_kb_version,
    read_version,
    remove_unreachable_versions,
    save_kb,
    staging_dir,
    version_dir,
)
from rag_end2end.options import add_index_args

__all__ = [
    "split_text",
    "split_documents",
    "passage_embeddings",
    "tokenize_passages",
    "encode_token_ids",
    "quiet_actor",
    "ShardEncoder",
    "shard_bounds",
    "IndexConfig",
    "add_index_args",
    "new_faiss_index",
    "build_faiss_index",
    "with_embeddings",
    "vectors_array",
    "temporary_sibling",
    "remove_orphaned_temporaries",
    "process_alive",
    "writing",
    "save_kb",
    "write_kb_info",
    "kb_similarity",
    "check_kb_similarity",
    "KBVersion",
    "version_dir",
    "read_version",
    "list_versions",
    "prune_versions",
    "remove_unreachable_versions",
    "staging_dir",
    "part_path",
    "part_writer",
    "write_passages_part",
    "publish_kb_version",
    "build_kb_version",
    "KBBuilder",
    "READY_MARKER",
    "VERSION_DIR_RE",
    "KB_INFO_FILE",
    "UNIT_NORM_TOLERANCE",
    "PART_BATCH_ROWS",
]
