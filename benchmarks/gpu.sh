#!/usr/bin/env bash
# XPSR on a CUDA machine, random SD1.5-size weights built in memory, fp16, within BUDGET_S seconds in all (default
# 480: an H200 session of 15 minutes, start-up included, with room to spare). One benchmarks/run.py process per
# setting, since ComfyUI reads its VRAM flags when it is imported; each gets the time left and writes its results
# after every section, so a run cut short keeps what it measured. Results in benchmarks/results/gpu/<setting>/,
# what ran and how long in runs.txt.
#
#   COMFYUI_PATH=/path/to/ComfyUI PYTHON=/path/to/venv/bin/python benchmarks/gpu.sh [setting ...]
#
# Named settings run alone (a rerun of one that failed); none named runs them all.
# In order (the most wanted first, the compile last as it may not fit):
#   pytorch   one CFG step at 512 and 2048 px (time and FLOP ratios over stock SD1.5 + ControlNet), a step's peak
#             VRAM, the whole XPSR Sampler graph beside a stock ControlNet KSampler graph at 512 and 2048 px
#             (peak VRAM, time per step), tiles batched vs serial at 1024 and 2048 px, fp8 vs fp16 weights
#   dynamic_vram   the same whole graphs and step VRAM with ComfyUI's dynamic VRAM on, as main.py starts it by
#             default on NVIDIA since 0.16 (every other run is as under --disable-dynamic-vram); results.md says
#             whether it did start
#   lowvram, novram   the same whole graphs and step VRAM under ComfyUI's --lowvram / --novram
#   pytorch_override   the step with a passthrough attention override (what sage/flash patch nodes install)
#   caption_tiles   captioning time per megapixel, whole image vs per latent tile, with the VLM folder in
#             XPSR_CAPTION_MODEL if set (a real-size one, fp16), else tiny LLaVA
#   compile   TorchCompileModel's first and steady step, XPSR over stock
set -uo pipefail
cd "$(dirname "$0")/.."
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${BUDGET_S:-480}
deadline=$((SECONDS + BUDGET_S))
mkdir -p "$OUT"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
: > "$OUT/runs.txt"

only=" $* "
run() {
    local name=$1; shift
    if [[ "$only" != "  " && "$only" != *" $name "* ]]; then
        return
    fi
    local left=$((deadline - SECONDS)) start=$SECONDS rc=0
    if ((left < 60)); then
        echo "$name: not run, ${left} s of the budget left" | tee -a "$OUT/runs.txt"
        return
    fi
    echo "== $name (at most $left s)"
    timeout -k 10 "$left" "$PYTHON" benchmarks/run.py --dtype fp16 --repeats 3 --sizes 64,256 \
        --memory-outputs 512,2048 --graph-outputs 512,2048 --graph-steps 4 --batching-outputs 1024,2048 --tile 64 \
        --overlap 8 --compile-latent 64 --out "$OUT/$name" "$@" || rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s$( ((rc == 124 || rc == 137)) && echo ' (cut at the budget)')" \
        | tee -a "$OUT/runs.txt"
}

run pytorch --sections step,step_memory,graph,tile_batching,weight_memory
run dynamic_vram --dynamic-vram --sections graph,step_memory
run lowvram --vram lowvram --sections graph,step_memory
run novram --vram novram --sections graph,step_memory
run pytorch_override --override --sections step
run caption_tiles --sections caption_tiles ${XPSR_CAPTION_MODEL:+--caption-model "$XPSR_CAPTION_MODEL"}
run compile --sections compile
cat "$OUT/runs.txt" "$OUT"/*/results.md 2>/dev/null
