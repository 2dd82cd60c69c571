#!/usr/bin/env bash
# Every benchmark of benchmarks/, then one table of all their figures (Markdown, for the README).
#   bash benchmarks/run_all.sh            # full sizes (CPU: about 15 minutes on 2 cores)
#   QUICK=1 bash benchmarks/run_all.sh    # smaller inputs, a couple of minutes, for a smoke run
# Uses the GPU when there is one (precision, stage-2 paths); the other benchmarks are CPU-bound.
# PYTHON overrides the interpreter (default: the project's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export BANA_BENCH_OUT=$(mktemp /tmp/bana_bench.XXXXXX.jsonl)
if [ "${QUICK:-0}" = 1 ]; then
  precision="--size 161 --rounds 1 --backbones vgg16"
  paths="--images 8 --size 160 --rounds 1"
  throughput="--images 8 --size 160 --rounds 1"
  head="--repeats 3"
else
  precision="--size 321 --rounds 3"
  paths="--images 24 --size 320 --rounds 3"
  throughput="--images 24 --size 320 --rounds 3"
  head="--repeats 7"
fi
$PYTHON -m benchmarks.precision $precision
$PYTHON -m benchmarks.stage2_paths $paths
$PYTHON -m benchmarks.stage2_throughput $throughput
$PYTHON -m benchmarks.stage1_head $head
echo
$PYTHON -m benchmarks.table "$BANA_BENCH_OUT"
rm -f "$BANA_BENCH_OUT"
