#!/bin/sh
# Every --training_mode on one CPU-sized setting, one table (docs/results/recipes-2026-11-30.md):
#   sh experiments/modes_cpu.sh /path/to/Question_Answer_Dataset_v1.2 OUT [SEEDS] [MODES]
# The setting of experiments/qa_cpu.sh, defined once in experiments/cpu_setting.sh (CMU Wikipedia QA,
# questions whose answer is in their article, split by article, the whole set's articles as the KB): all-MiniLM-L6-v2 as question and context encoder (mean pooling,
# cosine, tau 0.05, as its authors trained it), SmolLM2-135M-Instruct as a causal RAG-token generator over
# N_DOCS passages, the same 30 optimizer steps, learning rate and seeds for every recipe. Recipes whose
# context encoder learns re-encode the KB every INDEXING_FREQ steps and once more before validation, so
# each is tested against an index of its final weights. retriever_only has no generator: EM/F1 are dashes.
# Documents alone (issue 31; statements from data_prep/make_reconstruction_data.py on the KB, seed 42): MODES may
# also name recon_e2e (rag_end2end on statements only, --reconstruction_ratio 1, no human question, as many steps as
# the other rows, --retriever_dropout off as experiments/domain_shift_cpu.sh's row) and ict (retriever_only on the
# same statements). They validate and test on the human val/test questions, like every row.
# Finished runs are skipped when the script is run again; nothing existing is overwritten.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
INPUT=${1:?usage: sh experiments/modes_cpu.sh CMU_QA_DIR OUT [SEEDS] [MODES]}
OUT=${2:?usage: sh experiments/modes_cpu.sh CMU_QA_DIR OUT [SEEDS] [MODES]}
SEEDS=${3:-1}
MODES=${4:-"retriever_only lsr ralt dalm rag_original rag_end2end"}
. experiments/cpu_setting.sh
HARD_NEGATIVES=${HARD_NEGATIVES:-3}
prepare_cmu
build_kb
stamp "data and KB v0 ready"
case " $MODES " in *" recon_e2e "* | *" ict "*)
    [ -e "$OUT/recon/stats.json" ] || python data_prep/make_reconstruction_data.py --csv_path "$OUT/data/kb.csv" \
        --output_dir "$OUT/recon" --seed 42 ;;
esac
STEPS=$((N_TRAIN / BATCH))  # the question rows' optimizer steps (1 epoch); the documents rows train as many
RECON="--reconstruction_dir $OUT/recon --reconstruction_ratio 1 --max_steps $STEPS --val_check_interval $STEPS"

RUNS="" NAMES=""
for SEED in $SEEDS; do
    for MODE in $MODES; do
        RUN="$OUT/$MODE-seed$SEED"
        ROW_MODE=$MODE
        case $MODE in
            rag_end2end | lsr | dalm) EXTRA="--indexing_freq $INDEXING_FREQ --refresh_before_validation" ;;
            retriever_only) EXTRA="--indexing_freq $INDEXING_FREQ --refresh_before_validation \
                --hard_negatives $HARD_NEGATIVES" ;;
            recon_e2e) ROW_MODE=rag_end2end
                EXTRA="--indexing_freq $INDEXING_FREQ --refresh_before_validation --retriever_dropout off $RECON" ;;
            ict) ROW_MODE=retriever_only
                EXTRA="--indexing_freq $INDEXING_FREQ --refresh_before_validation --hard_negatives $HARD_NEGATIVES $RECON" ;;
            *) EXTRA="" ;;
        esac
        RESUME=""  # a run a session's end stopped goes on from its last.ckpt
        [ -e "$RUN/last.ckpt" ] && RESUME="--resume"
        [ -e "$RUN/test_results.txt" ] || python finetune_rag.py "$@" --output_dir "$RUN" $TRAIN --seed "$SEED" \
            --do_predict --training_mode "$ROW_MODE" $EXTRA $RESUME
        stamp "$MODE seed $SEED trained and tested"
        RUNS="$RUNS $RUN" NAMES="$NAMES $MODE"
    done
done
python tools/make_results_table.py $RUNS --names $NAMES --output "$OUT/table.md"
echo "modes_cpu.sh: done in $(($(date +%s) - START)) s; table in $OUT/table.md"
