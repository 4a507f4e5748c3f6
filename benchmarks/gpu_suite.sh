#!/usr/bin/env bash
# The GPU checks of issue 21 in one run (under 8 minutes on one GPU): the CUDA-only tests, then
# certify() throughput at batch 256-4096 and certified training steps, all on DEVICE.
#
#   bash benchmarks/gpu_suite.sh                  # on a machine with CUDA; writes gpu_suite.md
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_suite.sh   # a dry run of the script itself on the CPU
#
# OUT (default: the current folder) receives gpu_suite.md (the tables) and gpu_suite.log.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
QUICK="${QUICK:-0}"
OUT="${OUT:-.}"
mkdir -p "$OUT"
table="$OUT/gpu_suite.md"
log="$OUT/gpu_suite.log"
if [ "$QUICK" = 1 ]; then
    batches=(256); epochs=3; certify_extra=(--methods ibp --pairs 3); data=digits
    train_methods=(ibp); train_extra=(--no-step-cost --flat)
else
    batches=(256 1024 4096); epochs=20; certify_extra=(); data=digits28
    train_methods=(ibp crown-ibp crown-ibp-per-margin); train_extra=()
fi

section() { printf '\n## %s\n\n' "$1" | tee -a "$table"; }
run() {  # run a command, its stdout to the table, its stderr to the log; keep going on failure
    echo "\$ $*" | tee -a "$table"
    timeout "${STEP_TIMEOUT:-240}" "$@" >>"$table" 2>>"$log" || echo "(exit $?)" | tee -a "$table"
}

{
    echo "# GPU suite, $(date -u +%Y-%m-%d), device $DEVICE"
    python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} >"$table"
: >"$log"

section "CUDA-only tests"
run python -m pytest -q -p no:cacheprovider tests/bounds/test_bounds_gpu.py tests/certification/test_gpu_scaling.py

for batch in "${batches[@]}"; do
    section "certify() throughput, batch $batch"
    run python benchmarks/bench_certify.py --device "$DEVICE" --batch-size "$batch" --no-lirpa \
        "${certify_extra[@]}"
done

section "certified training ($data, default CNN), $epochs epochs"
run python benchmarks/bench_train.py --device "$DEVICE" --data "$data" --epochs "$epochs" \
    --methods "${train_methods[@]}" --no-crown --batch-size 256 "${train_extra[@]}"

echo "tables in $table, errors in $log"
