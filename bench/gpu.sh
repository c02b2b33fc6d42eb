#!/usr/bin/env bash
# The GPU numbers and tests, in one command on a CUDA machine where only this checkout is at hand: it
# runs from src/ with the machine's python3 and torch (nothing is installed), and needs neither the
# built-in models nor the server's packages.
#
#   bash bench/gpu.sh [OUTDIR] [STEP ...]     # OUTDIR: default bench/results
#
# Steps, most important first; the default is the first four (8 files back: a device call's limit). On
# an H200 engine-b1, tests, profile, engine, engine-b1-tuned and switch took 57-82, 68, 47, 180, 114 and
# 92 s (bench/results/*-h200.*). Each has its own time limit and writes its log and JSON into OUTDIR as
# it ends, so a short lease still brings back the first ones. All end within GPU_BUDGET seconds of the
# start (default 570, under one 600 s device call): a step's limit is cut to the time left, and a step
# with under a minute left is skipped.
#   engine-b1  bench/engine.py at batch 1 on a 7B-shaped random Llama in bf16, fused and unfused, with
#              the engine's 8 passes a step and with one (issue 2's targets: fused >= 70% of the HBM
#              roofline, fused >= 2x unfused; met, 71-73 %), and sampled, on the device and row by row
#   tests      tests/test_gpu.py
#   profile    bench/step_profile.py: a fused batch-1 token's wall time against its kernels' busy time and
#              the byte-read ceiling, kernels per token and the costliest ones, with 8 passes a step and 1
#   engine     bench/engine.py at batches 1, 4, 8, 16 (each batch size is compiled and captured anew);
#              its JSON is written after each batch size, so a step cut short keeps the sizes it measured
#   engine-b1-tuned  engine-b1 with inductor's coordinate-descent tuning of its generated kernels (the
#              setting gpt-fast uses; longer compiles): 66 % against engine-b1's 71 % in one lease
#   switch     bench/switch.py on the 7B shape without the two loaders' baselines (issue 3's (b),
#              measured and met on the H200)
#   switch-all bench/switch.py with transformers' and safetensors' loads too (a second 13.5 GB copy)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
shift || true
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(engine-b1 tests profile engine)
GPU_BUDGET=${GPU_BUDGET:-570}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false COE_CPU_KERNELS=0  # the CPU runs only test references here
# The switch benchmark's scratch files (two copies of a 13.5 GB expert) on the checkout's disk: on a
# tmpfs /tmp, "cold" reads would come from RAM.
export COE_BENCH_TMP=${COE_BENCH_TMP:-$PWD/.coe/bench-tmp}
mkdir -p "$COE_BENCH_TMP"

tag=$($py - <<'EOF'
import re, torch
assert torch.cuda.is_available(), "no CUDA device"
m = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", torch.cuda.get_device_name().replace("NVIDIA", ""))
print(m.group(1).lower() if m else "gpu")
EOF
) || { echo "gpu.sh: needs python3 with torch and a CUDA device"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  nproc; } > "$out/gpu-$tag.txt" 2>&1

step() {  # name, seconds, command...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    local left=$((GPU_BUDGET - SECONDS - 15))
    [ "$left" -ge 60 ] || { echo "== $name: skipped, ${left} s left of GPU_BUDGET"; return; }
    [ "$left" -ge "$limit" ] || limit=$left
    echo "== $name (at most ${limit} s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/$name-$tag.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name-$tag.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

for s in "${steps[@]}"; do
    case $s in
        engine-b1) step engine-b1 150 $py bench/engine.py --synthetic 7b --fused --batches 1 --out "$out/engine-$tag-b1.json" ;;
        tests) step tests 150 $py -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
        profile) step profile 150 $py bench/step_profile.py --synthetic 7b --fused --out "$out/profile-$tag.json" ;;
        switch) step switch 150 $py bench/switch.py --synthetic-shape 7b --reps 2 --skip-loaders --out "$out/switch-$tag.json" ;;
        engine) step engine 300 $py bench/engine.py --synthetic 7b --fused --batches 1,4,8,16 --out "$out/engine-$tag.json" ;;
        switch-all) step switch-all 400 $py bench/switch.py --synthetic-shape 7b --reps 1 --out "$out/switch-all-$tag.json" ;;
        engine-b1-tuned) TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 step engine-b1-tuned 300 $py bench/engine.py \
            --synthetic 7b --fused --batches 1 --out "$out/engine-$tag-b1-tuned.json" ;;
        *) echo "gpu.sh: unknown step $s (engine-b1, tests, profile, engine-b1-tuned, engine, switch, switch-all)"; exit 2 ;;
    esac
done
