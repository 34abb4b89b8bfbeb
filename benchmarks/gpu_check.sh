#!/usr/bin/env bash
# The checks that need a GPU, in one go (docs/training.md, "Measured on one GPU"):
#   1. configs/lits_atlas.yaml as shipped (paper widths, patch 256x256x16, bf16-mixed, DDP over every
#      GPU of the node) trains one epoch (at most STEPS steps) on phantom cohorts, validates on whole
#      held-out volumes with overlap 0.8, and tests best.ckpt; Lightning's SimpleProfiler writes where
#      the time went (OUT/fit-fit_profile.txt: run_training_batch counts the steps);
#      the step timer prints steps/s and the share of time waiting for data per epoch (default workers);
#   2. GPU memory, sampled by nvidia-smi every 0.5 s during 1;
#   3. the same fit with the network compiled (--model.compile true), default mode then
#      "reduce-overhead" (CUDA graphs), at most STEPS steps each: steps/s and data wait again;
#   4. the model, inference and quaternion benchmarks (benchmarks/run.py --only model,inference,quaternion)
#      on the GPU (dense vs 8-multiplication quaternion convolutions, fp32 and bf16).
# Usage: benchmarks/gpu_check.sh OUT [STEPS]; AQCF (default "aqcf") names the program, PYTHON (default
# python3) the interpreter of the benchmarks, EXTRA adds arguments to fit and test (the tests use it to
# run this on a CPU with a tiny network); SKIP_COMPILE=1 / SKIP_BENCH=1 leave out 3 / 4.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [STEPS]}
steps=${2:-100}
aqcf=${AQCF:-aqcf}
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$out"
# a CSV logger alone: the check must not depend on a W&B account
cat > "$out/csv_logger.yaml" <<YAML
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: ., name: csv}
YAML
common=(--config configs/lits_atlas.yaml --config "$out/csv_logger.yaml"
        --data.ct_root "$out/phantoms/LiTS" --data.mri_root "$out/phantoms/ATLAS" --data.cache_dir "$out/cache"
        --trainer.default_root_dir "$out/run" "${extra[@]}")

seconds() { date +%s.%N; }
t0=$(seconds)
$aqcf synth --out "$out/phantoms" --n-ct 10 --n-mri 10 --no-progress --overwrite
t1=$(seconds)
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader -lms 500 > "$out/gpu_memory.csv" &
  smi=$!
  trap 'kill $smi 2> /dev/null || true' EXIT
fi
$aqcf fit "${common[@]}" --overwrite true --trainer.max_epochs 1 --trainer.max_steps "$steps" \
  --trainer.limit_train_batches "$steps" --trainer.enable_progress_bar false \
  --trainer.profiler lightning.pytorch.profilers.SimpleProfiler \
  --trainer.profiler.dirpath "$out" --trainer.profiler.filename fit_profile | tee "$out/fit.log"
t2=$(seconds)
$aqcf test "${common[@]}" --ckpt_path "$out/run/checkpoints/best.ckpt" --trainer.enable_progress_bar false --overwrite true
t3=$(seconds)
python3 - "$t0" "$t1" "$t2" "$t3" "$steps" <<PY
import sys
t0, t1, t2, t3, steps = map(float, sys.argv[1:])
print(f"[gpu_check] synth {t1 - t0:.1f} s, fit one epoch (<= {steps:.0f} steps) + validation {t2 - t1:.1f} s, test {t3 - t2:.1f} s")
PY
grep -h "waiting for data" "$out/fit.log" | sed 's/^/[gpu_check] eager: /' || true
if [[ -z "${SKIP_COMPILE:-}" ]]; then
  for mode in default reduce-overhead; do
    opts=(--model.compile true)
    [[ $mode != default ]] && opts+=(--model.compile_mode "$mode")
    $aqcf fit "${common[@]}" --overwrite true --trainer.default_root_dir "$out/run_compile_$mode" \
      --trainer.max_epochs 1 --trainer.max_steps "$steps" --trainer.limit_train_batches "$steps" \
      --trainer.limit_val_batches 0 --trainer.enable_progress_bar false "${opts[@]}" \
      > "$out/fit_compile_$mode.log" 2>&1 || echo "[gpu_check] compile $mode failed: see $out/fit_compile_$mode.log"
    grep -h "waiting for data" "$out/fit_compile_$mode.log" | sed "s/^/[gpu_check] compile $mode: /" || true
  done
fi
if [[ -s "$out/gpu_memory.csv" ]]; then
  awk -F', ' '{v = $2 + 0; if (v > m) {m = v; n = $1; t = $3}} END {print "[gpu_check] peak GPU memory used: " m " MiB of " t " (" n ")"}' "$out/gpu_memory.csv"
fi
if [[ -z "${SKIP_BENCH:-}" ]]; then
  "${PYTHON:-python3}" benchmarks/run.py --only model,inference,quaternion --out "$out/bench"
fi
