#!/bin/sh
# The RAG-original baseline of finetune_rag_ray_end2end.sh: the same recipe and files (edit them there),
# with the context encoder frozen and the KB never re-encoded. Writes RUNS/rag-original.
exec env END2END=0 sh "$(dirname "$0")/finetune_rag_ray_end2end.sh" "$@"
