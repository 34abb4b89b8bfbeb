#!/usr/bin/env bash
# The checks that need a GPU, in one go (docs: README "Scale"):
#   1. configs/lits_atlas.yaml as shipped (paper widths, patch 256x256x16, bf16-mixed, DDP over every
#      GPU of the node) trains one epoch (at most STEPS steps) on phantom cohorts, validates on whole
#      held-out volumes with overlap 0.8, and tests best.ckpt; Lightning's SimpleProfiler writes where
#      the time went (OUT/fit-fit_profile.txt: run_training_batch counts the steps);
#   2. GPU memory, sampled by nvidia-smi every 0.5 s during 1;
#   3. the model and inference benchmarks (benchmarks/run.py --only model,inference) on the GPU.
# Usage: benchmarks/gpu_check.sh OUT [STEPS]; AQCF (default "aqcf") names the program, EXTRA adds
# arguments to fit and test (the tests use it to run this on a CPU with a tiny network).
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
  --trainer.profiler.dirpath "$out" --trainer.profiler.filename fit_profile
t2=$(seconds)
$aqcf test "${common[@]}" --ckpt_path "$out/run/checkpoints/best.ckpt" --trainer.enable_progress_bar false
t3=$(seconds)
python3 - "$t0" "$t1" "$t2" "$t3" "$steps" <<PY
import sys
t0, t1, t2, t3, steps = map(float, sys.argv[1:])
print(f"[gpu_check] synth {t1 - t0:.1f} s, fit one epoch (<= {steps:.0f} steps) + validation {t2 - t1:.1f} s, test {t3 - t2:.1f} s")
PY
if [[ -s "$out/gpu_memory.csv" ]]; then
  awk -F', ' '{v = $2 + 0; if (v > m) {m = v; n = $1; t = $3}} END {print "[gpu_check] peak GPU memory used: " m " MiB of " t " (" n ")"}' "$out/gpu_memory.csv"
fi
