#!/usr/bin/env bash
# XPSR on a CUDA machine, random SD1.5-size weights, fp16: one short run of benchmarks/run.py per setting, each
# beside ComfyUI's stock SD1.5 + ControlNet (the step ratios). Results in benchmarks/results/gpu/<setting>/.
#
#   COMFYUI_PATH=/path/to/ComfyUI PYTHON=/path/to/venv/bin/python benchmarks/gpu.sh
#
# Settings: pytorch attention; the same with a passthrough attention override (what sage/flash patch nodes
# install); ComfyUI's --lowvram and --novram. Sections: one CFG step at 512 and 2048 px (time and FLOP ratios),
# a whole step's peak VRAM per pixel, tiled steps batched vs serial at 1024 and 2048 px, TorchCompileModel's
# first and steady step, the XPSR weights in fp8 vs fp16.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true

run() {
    local name=$1; shift
    echo "== $name"
    "$PYTHON" benchmarks/run.py --dtype fp16 --repeats 3 --sizes 64,256 --memory-outputs 512,2048 \
        --batching-outputs 1024,2048 --tile 64 --overlap 8 --compile-latent 64 --out "$OUT/$name" "$@"
}

run pytorch --sections step,step_memory,tile_batching,compile,weight_memory
run pytorch_override --override --sections step,step_memory
run lowvram --vram lowvram --sections step,step_memory
run novram --vram novram --sections step,step_memory
cat "$OUT"/*/results.md
