#!/usr/bin/env bash
# GPU measurements of CAUSE in one run (at most 8 minutes on one GPU): every stage of ViT-B/8 TR
# run as users run it (run(cfg) with trainer=gpu, the callbacks group, data=folder over a synthetic
# COCO-sized crop set on disk), timed inside its loop; the projected wall time of the published-row
# preset's and the default's full COCO-Stuff-27 schedule, evaluation included; bf16 feature
# extraction with and without torch.compile; and `stage=all` on the demo with trainer=gpu. Random
# weights, no downloads, no installs. docs/performance.md §7 says how to read the output.
#
#   benchmarks/gpu.sh            # on a GPU machine; paste the output into docs/performance.md
#   benchmarks/gpu.sh --tiny     # toy sizes on any device (the test suite runs this on the CPU)
#
# Environment: PYTHON (default python3) must import the package's dependencies (its [crf] extra
# for the CRF figure). The repository's src/ is put first on PYTHONPATH.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HYDRA_FULL_ERROR=1
cd "$ROOT"

TINY=0
for arg in "$@"; do
  if [ "$arg" = "--tiny" ]; then TINY=1; fi
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cause-gpu-bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
status=0
start=$(date +%s)

echo "[setup] $("$PYTHON" --version 2>&1), repository $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$TINY" = 1 ]; then
  "$PYTHON" benchmarks/bench_gpu.py "$@" || status=$?
else
  timeout 360 "$PYTHON" benchmarks/bench_gpu.py "$@" || status=$?
fi
echo "[setup] measurements: $(( $(date +%s) - start )) s, exit status $status"

# The demo: stage=all on the built-in data (mosaic, filterbank backbone), on the GPU.
PATHS=("paths.root_dir=$WORK" "paths.data_dir=$WORK/data" "paths.output_dir=$WORK/out")
if [ "$TINY" = 1 ]; then
  DEMO=(trainer=cpu backbone=tiny_vit data.module.num_train=8 data.module.num_val=4
        data.module.image_size=64 "data.recipe.resolution={train:64,test:64}"
        method.head.projection_dim=32 method.num_concepts=32 method.mediator.batch_size=4
        method.head.batch_size=4 method.probe.batch_size=4 method.eval.batch_size=4
        method.eval.save_images=2 callbacks=none +trainer.limit_train_batches=2
        +trainer.limit_val_batches=1)
  LIMIT=600
else
  DEMO=(trainer=gpu)
  LIMIT=120
fi
demo_start=$(date +%s)
timeout "$LIMIT" "$PYTHON" -m cause_lightning stage=all trainer.enable_progress_bar=false \
  "${PATHS[@]}" "${DEMO[@]}" > "$WORK/demo.log" 2>&1
demo_status=$?
demo_wall=$(( $(date +%s) - demo_start ))
grep -E "[│┃]" "$WORK/demo.log" | tail -n 12 | sed 's/^/[demo] /'
if [ "$demo_status" -ne 0 ]; then
  echo "[demo] FAILED (exit $demo_status); last lines:"
  tail -n 15 "$WORK/demo.log" | sed 's/^/[demo] /'
  status=1
fi
echo "[demo] stage=all ${DEMO[0]}: ${demo_wall} s wall, exit status $demo_status"
echo "[setup] total: $(( $(date +%s) - start )) s"
exit "$status"
