#!/usr/bin/env bash
# The GPU checks of fxquant in one go (what a lent H100/H200 runs): kernel tests on CUDA (the same
# tests CI runs in the Triton interpreter) and any `gpu`-marked tests, the lowered models vs fake
# quantization, then the benchmarks: GEMM kernels (tools/bench_kernels.py), BitLog2 attention
# (tools/bench_bitlog2.py) and end to end (tools/bench_e2e_gpu.py).
#   bash tools/gpu_checks.sh
# Everything goes under ${OUT:-gpu_out}, six files at most (the device tool brings back eight):
#   gpu_checks.log (all output), tests.log (pytest), lowered.json, bench_kernels.json,
#   bench_bitlog2.json, bench_e2e.json — each JSON is rewritten as its tool goes, so a step stopped
#   by its timeout keeps what it measured.
# Time: the whole script stays under GPU_CHECKS_BUDGET_S (default 540 s = 9 min, install included):
# every step runs under `timeout` with its cap or what is left, whichever is less, and the end-to-end
# benchmark gets the rest (it skips, and records, what would not fit). Python wheels found in
# ${FXQUANT_WHEELS:-.whl} (e.g. torchao, which the GPU image lacks; nothing can be downloaded there)
# are installed to a temporary folder first.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-gpu_out}; mkdir -p "$out"
budget=${GPU_CHECKS_BUDGET_S:-540}
start=$SECONDS

left() { echo $(( budget - (SECONDS - start) )); }

# step [--log FILE] NAME CAP CMD...: CMD under `timeout min(CAP, time left)` (its output appended to
# FILE if given); skipped when under 15 s are left
step() {
  local log="" name cap t rc
  if [[ $1 == --log ]]; then log=$2; shift 2; fi
  name=$1; cap=$2; shift 2
  t=$(left); (( cap < t )) && t=$cap
  if (( t < 15 )); then echo "== $name: skipped (time budget: $(left) s left)"; return 0; fi
  echo "== $name (timeout ${t} s, $(( SECONDS - start )) s elapsed)"
  if [[ -n $log ]]; then
    timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1; rc=$?
  else
    timeout --kill-after=10 "$t" "$@"; rc=$?
  fi
  (( rc == 124 || rc == 137 )) && echo "== $name: TIMED OUT after ${t} s (partial results kept)"
  (( rc != 0 && rc != 124 && rc != 137 )) && echo "== $name: exit status $rc$( [[ $* == *pytest* ]] && (( rc == 5 )) && echo ' (no tests collected)')"
  return 0
}

main() {
  echo "== install"
  wheels=${FXQUANT_WHEELS:-.whl}
  if compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fxquant-site "$wheels"/*.whl \
      && export PYTHONPATH=/tmp/fxquant-site${PYTHONPATH:+:$PYTHONPATH} && echo "installed wheels: $(ls "$wheels")"
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/fxquant-install.log 2>&1 \
    || { tail -20 /tmp/fxquant-install.log; echo "== install failed"; return 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 - <<'EOF'
import torch, triton
gpu = f"{torch.cuda.get_device_name()} {torch.cuda.get_device_capability()}" if torch.cuda.is_available() else "NO CUDA DEVICE"
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda, "|", gpu)
for name in ("timm", "torchao"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "not importable:", type(e).__name__, e)
EOF

  # correctness first: kernel tests with one known-good config per shape class (no autotuning), then
  # every `gpu`-marked test outside tests/kernels (pyproject's addopts deselect only `slow`)
  : >"$out/tests.log"
  step --log "$out/tests.log" "kernel tests" 150 \
    env FXQUANT_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/kernels
  tail -25 "$out/tests.log"
  step --log "$out/tests.log" "gpu-marked tests" 60 \
    env FXQUANT_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests --ignore=tests/kernels
  tail -4 "$out/tests.log"   # "no tests ran" (exit status 5) when nothing outside tests/kernels is marked gpu
  step "lowered vs fake quant" 90 env FXQUANT_AUTOTUNE=0 python3 tools/check_lowered.py --device cuda --json "$out/lowered.json"

  # benchmarks (autotuned kernels, as the library runs them by default)
  step "bench_kernels" 150 python3 tools/bench_kernels.py --warmup 10 --rep 50 --json "$out/bench_kernels.json"
  step "bench_bitlog2" 50 python3 tools/bench_bitlog2.py --rep 50 --json "$out/bench_bitlog2.json"
  local t=$(( $(left) - 10 ))
  if (( t >= 60 )); then  # the e2e tool stops starting new work at --budget-s; the timeout is the hard stop
    step "bench_e2e_gpu" "$t" python3 tools/bench_e2e_gpu.py --unfused --budget-s $(( t - 60 )) --json "$out/bench_e2e.json"
  else
    echo "== bench_e2e_gpu: skipped (time budget: $(left) s left)"
  fi

  echo "== summary ($(( SECONDS - start )) s)"
  python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
        return None
k = load("bench_kernels.json")
if k:
    for r in k.get("linear", []):
        if r.get("batch") in (1, 64):
            t = r.get("tops", {})
            print(f"GEMM {r.get('set')} M={r['M']} N={r['N']} K={r['K']}: " + " ".join(f"{v}={t[v]:.0f}" for v in t)
                  + f" TOPS; w8a8/fp16 {r.get('speedup_w8a8_vs_fp16', float('nan')):.2f}x check {r['check'].get('ok')}")
e = load("bench_e2e.json")
if e:
    for r in e.get("rows", []):
        print(f"e2e {r['model']} b{r['batch']} {r['variant']}: {r['ms']:.3f} ms {r['images_per_s']:.0f} img/s "
              f"x{r.get('speedup_vs_fp16_eager', float('nan')):.2f} eager x{r.get('speedup_vs_fp16_compile', float('nan')):.2f} "
              f"compile cos {r.get('cos_vs_fp16_eager', float('nan')):.4f}")
    print(f"e2e: {len(e.get('errors', []))} errors, {len(e.get('skipped', []))} skipped")
EOF
}

main 2>&1 | tee "$out/gpu_checks.log"
