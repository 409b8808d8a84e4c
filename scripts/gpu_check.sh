#!/usr/bin/env bash
# The prepared GPU check of dinobench: one run inside one 9-minute call, on one CUDA card.
#
#   0. the machine                          card, nproc, /dev/shm, torch/torchvision/triton
#   1. correctness tests on CUDA            python3 -m pytest -m gpu -q tests
#   2. bench --compare --knn, batch 256     CIFAR-10 shapes, seed recipe, torch.compile,
#                                           k-NN on 50,000 x 10,000 images
#   3. bench, batch 1024                    the same without the reference pipeline
#   4. run on digits, 2 epochs              python -m dinobench run --device cuda --epochs 2
#   5. CIFAR-10, real images                a short run on the carried subset: the teacher's
#                                           k-NN against training seconds
#   6. the pytest-benchmark suite           pytest benchmarks --benchmark-only
#   7. the levers                           python benchmarks/levers.py (clip, EMA, ...)
#   8. STL-10 and MNIST shapes, eager       batch 512 / 1024, while time is left
#
# Stage 5 reads a CIFAR-10 subset from .data/gpu_check/cifar10.npz (an ignored folder):
# 10,000 train images (stratified) and the 1,000 exact test images, about 34 MB. The
# machine with the GPU does not get ../shared, so make the subset beforehand, where
# ../shared/data/cifar10.npz is, and name the folder in the call's carry list:
#
#   scripts/gpu_check.sh prepare            # once, here
#   run: scripts/gpu_check.sh, carry [".data"]
#
# Run from anywhere; it works in the repository root with PYTHONPATH=. and the machine's
# own python3 and torch (2.11 or later); nothing is downloaded. Everything goes to $OUT
# (default: a new temporary folder), at most 8 files and no folders: gpu_check.log (all
# output, the card's name first), one JSON per bench run (each rewritten as its parts
# finish), benchmarks.json, and runs.tar.gz with the two run folders (checkpoints left
# out). Each stage has its own time limit inside a total budget (DINOBENCH_CHECK_BUDGET
# seconds, default 540); a stage that fails does not stop the ones after it; the summary
# at the end lists every stage's exit code. Bench stages run with TORCH_LOGS=recompiles,
# so any recompilation is in the log.
#
# DINOBENCH_CHECK=cpu runs the same stages at CPU size (2 blocks, tiny batches, no
# compilation) to check the script end to end on a machine without a GPU; it makes the
# CIFAR-10 subset itself when it is missing and ../shared/data has the full file.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUBSET_DIR=.data/gpu_check

# prepare [SRC]: the CIFAR-10 subset of stage 5, from the full copy beside the repository.
prepare() {
    local src=${1:-../shared/data/cifar10.npz}
    mkdir -p "$SUBSET_DIR" && "$PY" - "$src" "$SUBSET_DIR/cifar10.npz" << 'EOF'
import os, sys
import numpy as np
from dinobench.data.subsets import stratified_indices
src, dst = sys.argv[1:3]
with np.load(src) as d:
    rows = stratified_indices(d["y_train"].reshape(-1), 10_000, np.random.default_rng(0))
    exact = "x_test_lossless_first1000" in d.files  # decoded without JPEG loss
    x_test = d["x_test_lossless_first1000"] if exact else d["x_test"][:1000]
    y_test = d["y_test_lossless_first1000"] if exact else d["y_test"][:1000]
    np.savez(dst + ".tmp.npz", x_train=d["x_train"][rows], y_train=d["y_train"][rows],
             x_test=x_test, y_test=y_test)
os.replace(dst + ".tmp.npz", dst)
mb = os.path.getsize(dst) / 2**20
assert mb <= 40, f"{dst} is {mb:.1f} MiB, over the 40 MiB meant to travel"
print(f"wrote {dst}: {len(rows):,} train and {len(x_test):,} test images, {mb:.1f} MiB")
EOF
}

if [ "${1:-}" = prepare ]; then
    prepare "${2:-}"
    exit
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET=${DINOBENCH_CHECK_BUDGET:-540}
WORK=$(mktemp -d)  # run folders, packed into $OUT/runs.tar.gz at the end
trap 'rm -rf "$WORK"' EXIT
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
    ((left -= 10))  # the kill grace of timeout below stays inside the budget
    ((limit > left)) && limit=$left
    say "== $name (limit ${limit} s): $*"
    if declare -F "$1" > /dev/null; then  # timeout runs programs: a child bash, then
        timeout -k 10 "$limit" bash -c "$(shell_state)"$'\n''"$@"' _ "$@" 2>&1 |
            tee -a "$LOG"
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    fi
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
    EAGER=("${FAST[@]}")
    STEPS=(2 2 2)
    REF=(--reference-workers 1)
    KNN=(--knn --knn-train 512 --knn-test 128)
    RUN_SMALL=(--depth 1 --batch-size 64 --train-subset 512 --no-probe)
    LEVERS=(--device cpu --depth 2 --rounds 2 --threads 1)
    CIFAR=(--train-subset 512 --test-subset 200 --epochs 2 --eval-every 1 --depth 2
           --batch-size 64)
    export DINOBENCH_BENCH_DEPTH=${DINOBENCH_BENCH_DEPTH:-2}
    export DINOBENCH_BENCH_ROUNDS=${DINOBENCH_BENCH_ROUNDS:-2} DINOBENCH_BENCH_THREADS=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [ ! -f "$SUBSET_DIR/cifar10.npz" ] && [ -f ../shared/data/cifar10.npz ]; then
        prepare
    fi
else
    DEV=(--device cuda)
    B_SMALL=(--batch-size 256) B_LARGE=(--batch-size 1024) B_STL=(--batch-size 512)
    FAST=(--compile --warmup 5 --repeats 3)
    EAGER=(--no-compile --warmup 3 --repeats 3)
    STEPS=(30 20 20)  # batch 256, batch 1024, the other shapes
    REF=()  # the bench's default: nproc - 2 workers, prefetch 1 from batch 512 on
    KNN=(--knn)
    RUN_SMALL=()
    LEVERS=(--device cuda)
    CIFAR=(--epochs "${DINOBENCH_CHECK_CIFAR_EPOCHS:-16}" --eval-every 2)
fi

say "dinobench GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT"
command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG"
say "nproc: $(nproc)"
df -h /dev/shm 2>&1 | tee -a "$LOG"
"$PY" - << 'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, torchvision
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "absent"
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"card: {card}; torch {torch.__version__}; torchvision {torchvision.__version__}; "
      f"triton {triton_version}; CUDA {torch.version.cuda}; python {platform.python_version()}")
EOF

# curve DIR: the teacher's k-NN against training seconds, from the run's per-epoch log.
curve() {
    "$PY" - "$1" << 'EOF'
import json, sys
from pathlib import Path
logs = sorted(Path(sys.argv[1]).glob("train_*.jsonl"))
if not logs:
    sys.exit(f"no training log in {sys.argv[1]}")
print("| epoch | training s | training + evaluation s | images/s | teacher k-NN top-1 |")
print("|---:|---:|---:|---:|---:|")
train = wall = 0.0
for line in logs[0].read_text().splitlines():
    rec = json.loads(line)
    train += rec["seconds"]
    wall += rec["seconds"] + rec.get("eval_seconds", 0.0)
    knn = rec.get("val_knn_top1", rec.get("knn_top1"))  # the field's name before and after
    knn = "" if knn is None else f"{knn:.2f}"           # the validation split came in
    print(f"| {rec['epoch']} | {train:.1f} | {wall:.1f} | {rec['images_per_s']:,.0f} | {knn} |")
EOF
}

# What a stage that is a shell function needs in its child bash.
shell_state() {
    declare -f curve run_and_curve cifar10_stage
    declare -p PY DEV CIFAR WORK SUBSET_DIR
}

# run_and_curve NAME FLAGS...: a dinobench run into $WORK/NAME, then its k-NN curve.
run_and_curve() {
    local name=$1
    shift
    "$PY" -m dinobench run "${DEV[@]}" --no-progress --out "$WORK/$name" "$@" &&
        curve "$WORK/$name"
}

cifar10_stage() {
    if [ ! -f "$SUBSET_DIR/cifar10.npz" ]; then
        echo "$SUBSET_DIR/cifar10.npz is missing: run 'scripts/gpu_check.sh prepare' where" \
             "../shared/data/cifar10.npz is, and carry .data"
        return 3
    fi
    run_and_curve cifar10 --datasets cifar10 --data-dir "$SUBSET_DIR" --no-probe \
        --label-budgets --warmup-epochs 2 "${CIFAR[@]}"
}

stage "correctness tests on CUDA" 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
stage "bench cifar10 batch 256 --compare --knn" 170 env TORCH_LOGS=recompiles \
    "${BENCH[@]}" "${DEV[@]}" "${B_SMALL[@]}" "${FAST[@]}" --steps "${STEPS[0]}" --compare \
    "${REF[@]}" "${KNN[@]}" --out "$OUT"
stage "bench cifar10 batch 1024" 110 env TORCH_LOGS=recompiles "${BENCH[@]}" "${DEV[@]}" \
    "${B_LARGE[@]}" "${FAST[@]}" --steps "${STEPS[1]}" --out "$OUT"
stage "run digits, 2 epochs" 75 run_and_curve digits --epochs 2 "${RUN_SMALL[@]}"
stage "run cifar10, real images" 120 cifar10_stage
stage "benchmark suite" 90 "$PY" -m pytest benchmarks --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$OUT/benchmarks.json" --benchmark-columns \
    min,median,mean,stddev,rounds
stage "levers" 60 "$PY" benchmarks/levers.py "${LEVERS[@]}"
stage "bench stl10, eager" 45 env TORCH_LOGS=recompiles "${BENCH[@]}" "${DEV[@]}" \
    --dataset-shape stl10 "${B_STL[@]}" "${EAGER[@]}" --steps "${STEPS[2]}" --out "$OUT"
stage "bench mnist, eager" 45 env TORCH_LOGS=recompiles "${BENCH[@]}" "${DEV[@]}" \
    --dataset-shape mnist "${B_LARGE[@]}" "${EAGER[@]}" --steps "${STEPS[2]}" --out "$OUT"

# One file for both run folders (only 8 files come back from a call), checkpoints left out.
tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=.lock -C "$WORK" . 2>&1 |
    tee -a "$LOG"
say ""
say "== summary ($((SECONDS - START)) s)"
for r in "${RESULTS[@]}"; do say "  $r"; done
ROWS="card|shapes|batch|autocast|torch.compile|first step|compilation|images/s|epoch of"
ROWS="$ROWS|FLOP per|MFU|peak memory|reference images/s|speed-up|k-NN"
grep -E "^\| ($ROWS)" "$LOG"  # the key rows of every bench table, last in the output
