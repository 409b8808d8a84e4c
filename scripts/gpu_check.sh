#!/usr/bin/env bash
# The prepared GPU check of dinobench: one run, under 10 minutes, on one CUDA card.
#
#   1. correctness tests on CUDA          python3 -m pytest -m gpu -q tests
#   2. bench --compare, batch 256         CIFAR-10 shapes, seed recipe, torch.compile
#   3. bench --compare --knn, batch 1024  same, plus k-NN on 50,000 x 10,000 images
#   4. the pytest-benchmark suite         pytest benchmarks --benchmark-only
#   5. STL-10 and MNIST shapes, batch 512/1024, if time is left
#
# Run from anywhere; it works in the repository root with PYTHONPATH=. and the machine's
# own python3 and torch (2.11 or later); nothing is downloaded. Everything goes to $OUT
# (default: a new temporary folder): gpu_check.log (all output, the card's name first),
# one JSON per bench run, benchmarks.json. Each stage has its own time limit inside a
# total budget (DINOBENCH_CHECK_BUDGET seconds, default 570); a stage that fails does not
# stop the ones after it; the summary at the end lists every stage's exit code.
#
# DINOBENCH_CHECK=cpu runs the same stages at CPU size (2 blocks, tiny batches, no
# compilation) to check the script end to end on a machine without a GPU.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET=${DINOBENCH_CHECK_BUDGET:-570}
START=$SECONDS
RESULTS=()
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME LIMIT_SECONDS COMMAND...: run with a time limit cut to the budget left.
stage() {
    local name=$1 limit=$2 t0=$SECONDS left rc
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if ((left < 30)); then
        say "== $name: skipped, ${left} s of the budget left"
        RESULTS+=("$name: skipped")
        return
    fi
    ((limit > left)) && limit=$left
    say "== $name (limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "== $name: exit ${rc} after $((SECONDS - t0)) s"
    RESULTS+=("$name: exit ${rc} ($((SECONDS - t0)) s)")
}

if "$PY" -m dinobench bench --help > /dev/null 2>&1; then
    BENCH=("$PY" -m dinobench bench)
else  # the package CLI without the bench subcommand: the module's own entry point
    BENCH=("$PY" -m dinobench.bench)
fi

if [ "${DINOBENCH_CHECK:-gpu}" = cpu ]; then
    DEV=(--device cpu)
    B_SMALL=(--batch-size 16) B_LARGE=(--batch-size 32) B_STL=(--batch-size 8)
    FAST=(--depth 2 --warmup 1 --repeats 2 --no-compile --threads 1)
    STEPS=(2 2 2)
    REF=(--reference-workers 2)
    KNN=(--knn --knn-train 512 --knn-test 128)
    export DINOBENCH_BENCH_DEPTH=${DINOBENCH_BENCH_DEPTH:-2}
    export DINOBENCH_BENCH_ROUNDS=${DINOBENCH_BENCH_ROUNDS:-2} DINOBENCH_BENCH_THREADS=1
else
    DEV=(--device cuda)
    B_SMALL=(--batch-size 256) B_LARGE=(--batch-size 1024) B_STL=(--batch-size 512)
    FAST=(--compile --warmup 5 --repeats 3)
    STEPS=(30 20 20)  # batch 256, batch 1024, the other shapes
    REF=(--reference-workers 16)
    KNN=(--knn)
fi

say "dinobench GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT"
command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG"
"$PY" - << 'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"card: {card}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"python {platform.python_version()}")
EOF

stage "correctness tests on CUDA" 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
stage "bench cifar10 batch 256 --compare" 200 "${BENCH[@]}" "${DEV[@]}" "${B_SMALL[@]}" \
    "${FAST[@]}" --steps "${STEPS[0]}" --compare "${REF[@]}" --out "$OUT"
stage "bench cifar10 batch 1024 --compare --knn" 180 "${BENCH[@]}" "${DEV[@]}" \
    "${B_LARGE[@]}" "${FAST[@]}" --steps "${STEPS[1]}" --compare "${REF[@]}" \
    --no-reference-loader "${KNN[@]}" --out "$OUT"
stage "benchmark suite" 120 "$PY" -m pytest benchmarks --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$OUT/benchmarks.json" --benchmark-columns \
    min,median,mean,stddev,rounds
stage "bench stl10" 100 "${BENCH[@]}" "${DEV[@]}" --dataset-shape stl10 "${B_STL[@]}" \
    "${FAST[@]}" --steps "${STEPS[2]}" --out "$OUT"
stage "bench mnist" 100 "${BENCH[@]}" "${DEV[@]}" --dataset-shape mnist "${B_LARGE[@]}" \
    "${FAST[@]}" --steps "${STEPS[2]}" --out "$OUT"

say ""
say "== summary ($((SECONDS - START)) s)"
for r in "${RESULTS[@]}"; do say "  $r"; done
ROWS="card|shapes|batch|autocast|torch.compile|images/s|epoch of|FLOP per|MFU|peak memory"
ROWS="$ROWS|reference images/s|speed-up|k-NN"
grep -E "^\| ($ROWS)" "$LOG"  # the key rows of every bench table, last in the output
