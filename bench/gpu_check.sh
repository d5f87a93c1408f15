#!/usr/bin/env bash
# One-shot GPU check: on a machine with one NVIDIA GPU and dgrepair installed with a CUDA torch
# (`pip install -e '.[test]'` from this repository), run from the repository root:
#
#     bash bench/gpu_check.sh            # about 5-8 minutes; writes bench/_work/gpu_check-<date>.md
#
# It runs (1) the GPU-marked tests, (2) the kernel table on CUDA for every backend (7168x2048,
# 2048x7168 with batches of 1/8/32 experts, 18432x7168, 163840x7168), (3) the CPU cost rows'
# GPU counterpart for `plan --estimate`, and (4) an end-to-end repair of a 1.1B TinyLlama-shaped
# BF16 pair with one GPU actor (Ray), default precision policy and forced float64, with the kept
# ranks compared. Every section is time-boxed; the results file says which ones ran out of time.
# Paste the file into docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${GPU_CHECK_WORK:-bench/_work/gpu_check}
LAYERS=${GPU_CHECK_LAYERS:-22}
OUT=bench/_work/gpu_check-$(date -u +%Y%m%d-%H%M).md
mkdir -p "$WORK"
if ! $PY -c "import torch, dgrepair, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs dgrepair importable and torch with a CUDA device (pip install -e '.[test]')" >&2
  exit 2
fi
section() { echo; echo "## $1"; echo; }
boxed() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "(ran out of its ${limit}s box)"; return 0; }
{
  echo "# bench/gpu_check.sh $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  $PY -c "from dgrepair.kernels.spectral import device_fp64_fast; print('fp64 fast (policy):', device_fp64_fast('cuda'))"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); cores $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo '```'

  section "GPU-marked tests"
  echo '```'
  boxed 150 $PY -m pytest -q -m gpu tests 2>&1 | tail -15
  echo '```'

  section "Kernels on CUDA (bench/kernels.py)"
  boxed 150 $PY bench/kernels.py --device cuda --backends gram64 gram32 exact --exact-budget 20 --baseline-budget 20 \
    --shapes 7168x2048 2048x7168 18432x7168 163840x7168

  section "End to end: ${LAYERS}-layer TinyLlama-shaped BF16 pair, one GPU actor"
  echo '```'
  if [ ! -f "$WORK/ft/config.json" ]; then
    boxed 150 $PY -c "
import time; from pathlib import Path
from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair
t0 = time.perf_counter(); write_pair(Path('$WORK'), tinyllama_spec($LAYERS)); print(f'pair written in {time.perf_counter() - t0:.1f} s')"
  fi
  for kernel in auto gram64; do
    rm -rf "$WORK/out-$kernel"
    t0=$(date +%s.%N)
    boxed 120 $PY -m dgrepair repair --base "$WORK/base" --ft "$WORK/ft" --out "$WORK/out-$kernel" \
      --device cuda --workers 1 --kernel "$kernel" --no-progress 2>&1 | tail -4
    echo "kernel $kernel: wall $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}") s"
  done
  $PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
import pyarrow.parquet as pq
work = Path(sys.argv[1])
try:
    a, b = ({(r["tensor"], r["expert"], r["part"]): r for r in pq.read_table(work / f"out-{k}" / "dgrepair" / "manifest.parquet").to_pylist()} for k in ("auto", "gram64"))
except Exception as exc:  # a boxed run that did not finish
    sys.exit(f"rank comparison skipped: {exc}")
keys = [k for k in a if a[k]["rank_kept"] is not None and k in b]
print(f"kept ranks: {len(keys)} matrices, {sum(a[k]['rank_kept'] != b[k]['rank_kept'] for k in keys)} differ; "
      f"precision column: {sorted({a[k]['precision'] for k in keys})}")
print("seconds per matrix (manifest, auto):", round(sum(a[k]["seconds"] for k in keys) / max(len(keys), 1), 4))
PYEOF
  echo '```'
} 2>&1 | tee "$OUT"
echo "results: $OUT"
