#!/usr/bin/env bash
# GPU check of mixshare_layers: CUDA tests (Triton vs torch reference, forward/backward, opcheck, torch.compile,
# folding/export), then the benchmarks on CUDA (incl. measured copy bandwidth and the fused kernels' bandwidth).
# Run from the repository root on a machine with one CUDA GPU and python3 holding torch + triton (+ pytest):
#
#     bash benchmarks/gpu_check.sh            # results in ${OUT:-benchmarks/results}/ (results_gpu.json/.md, logs)
#
# Needs no network and no install: the package is used from the checkout through PYTHONPATH. Every stage has its own
# time limit and runs even if an earlier one failed; the limits add up to under 12 minutes (30 + 150 + 150 + 240 + 45 + 60 s); a run takes about 5.
# The table is printed last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MIXSHARE_BACKEND=auto
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"        # DEVICE=cpu and BENCH_ARGS="--quick" only to dry-run this script without a GPU
BENCH_ARGS="${BENCH_ARGS:-}"
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
declare -A STATUS

STAGES="${STAGES:-env tests bench compiled profile interpreter}"  # a subset, e.g. STAGES="tests bench"
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUTDIR/NAME.log, remember the exit status
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) STATUS[$name]="skipped"; return 0 ;; esac
  echo "=== [$name] (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  STATUS[$name]="rc=$rc ($((SECONDS - t0))s)"
  [ "$rc" = 124 ] && STATUS[$name]="TIMEOUT after ${limit}s"
  echo "=== [$name] ${STATUS[$name]}"
}

stage env 30 "$PY" -c "
import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')
import mixshare_layers; print('mixshare_layers', mixshare_layers.__version__, 'from', mixshare_layers.__file__)
"
# CUDA tests: every test of test_fused_triton.py runs on the GPU here; test_fused.py minus its interpreter subprocess;
# the mixer/unmixer CUDA cases; the training step under sync-debug mode and recorded in a CUDA graph
stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
  tests/test_fused_triton.py tests/test_fused.py tests/test_fold.py tests/test_mixer.py tests/test_unmixer.py \
  tests/test_wrapper.py::test_cuda_training_step_never_syncs_and_replays_as_a_cuda_graph -k "not interpreter"
# benchmarks a-d and the bandwidth stage on CUDA
# shellcheck disable=SC2086
stage bench 150 "$PY" benchmarks/run.py --device "$DEVICE" --threads 8 --tag gpu --out "$OUTDIR" $BENCH_ARGS
# stage c again with both models compiled by inductor and captured in CUDA graphs (compilation takes a minute or two)
stage compiled 240 "$PY" benchmarks/run.py --device "$DEVICE" --threads 8 --tag gpu_compiled --out "$OUTDIR" \
  --only c --compile-step
# where the eager training step's time goes (kernel launches, top host-time ops), for the record
stage profile 45 "$PY" benchmarks/profile_step.py --device "$DEVICE" --steps 5 --top 12
# the same kernel tests under this machine's Triton interpreter (a diagnostic: CI runs them with Triton 3.8)
stage interpreter 60 env TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -p no:cacheprovider -x \
  tests/test_fused_triton.py

echo
echo "================ summary ================"
for name in env tests bench compiled profile interpreter; do echo "$name: ${STATUS[$name]:-not run}"; done
grep -E "passed|failed|error" "$OUTDIR/tests.log" | tail -n 1
if [ -f "$OUTDIR/results_gpu.md" ]; then
  cat "$OUTDIR/results_gpu.md"
  [ -f "$OUTDIR/results_gpu_compiled.md" ] && grep "compiled" "$OUTDIR/results_gpu_compiled.md"
else
  echo "no benchmark table (see $OUTDIR/bench.log)"
fi
