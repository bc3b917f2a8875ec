#!/usr/bin/env bash
# Seconds per epoch of examples/cifar100_wrn.py (WRN-28-2, M = 2, "mixshare", batch 64 rows = 32 images x bar 2)
# on CIFAR-shaped synthetic data, with each speed switch, from benchmarks/train_throughput.py (the script's loop vs
# the bare step, interleaved). One CIFAR-100 epoch = 50000 images = 100000 rows. Run from the repository root on a
# CUDA machine: bash benchmarks/gpu_epoch.sh  (results in ${OUT:-benchmarks/results}/epoch_*.log)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
run() {  # run NAME LIMIT ARGS...
  local name=$1 limit=$2
  shift 2
  echo "=== epoch-time [$name]"
  timeout --kill-after=10 "$limit" "${PYTHON:-python3}" benchmarks/train_throughput.py --depth 28 --width 2 --classes 100 \
    --images "${NTRAIN:-8192}" --device "${DEVICE:-cuda}" --steps "${STEPS:-40}" "$@" >"$OUTDIR/epoch_$name.log" 2>&1
  echo "rc=$?"; python3 - "$OUTDIR/epoch_$name.log" "$name" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
m = re.search(r'\{\s*"script_images_per_s".*?\n\}', text, re.S)
if m is None:
    print("| %s | failed (see log) | | | |" % sys.argv[2])
else:
    r = json.loads(m.group(0))
    s, b = r["script_images_per_s"], r["bare_images_per_s"]
    print("| %s | %.0f | %.0f | %.3f | %.1f |" % (sys.argv[2], s, b, r["ratio"], 100000 / s))
PY
}
echo "| switches | script rows/s | bare step rows/s | ratio | s per CIFAR epoch (100k rows) |"
echo "|---|---|---|---|---|"
run fp32 60 --amp off
run bf16 60 --amp bf16
run bf16_cl 60 --amp bf16 --channels-last
run bf16_cl_compile 150 --amp bf16 --channels-last --compile
