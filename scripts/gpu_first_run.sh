#!/usr/bin/env bash
# The first run on a GPU machine, in one call (about 8 minutes, every part under its own timeout):
#   bash scripts/gpu_first_run.sh OUT          # on the GPU machine (after scripts/gpu_prepare.sh here)
#   bash scripts/gpu_first_run.sh --cpu OUT    # the same parts on CPU, short (checks this script)
# 1. scripts/gpu_smoke.py: the real module under bf16-true, bf16-mixed, FSDP2, the HF loop on CUDA
# 2. scripts/gpu_check.py: update-phase tokens/s, memory and MFU, FSDP2 through Lightning
# 3. the paper rehearsal on one CUDA device (HF rollouts: the GPU image has no vLLM)
# 4. the toy default with trainer=gpu
# OUT receives at most 8 files: gpu_smoke.jsonl, gpu_check.json, rehearsal.log,
# rehearsal_summary.json, toy.log, toy_summary.json, first_run.log.
set -uo pipefail
CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
OUT=${1:?usage: gpu_first_run.sh [--cpu] OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/first_run.log"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HYDRA_FULL_ERROR=1

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
part() {  # part NAME SECONDS OUTPUT command...: runs it under a timeout into OUTPUT, logs rc, time
  local name=$1 limit=$2 output=$3; shift 3
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$output" 2>&1
  say "$name: rc $? in $((SECONDS - start)) s"
}

# What the image lacks (prepared by scripts/gpu_prepare.sh), installed beside the project.
if [[ -d .gpu/wheels ]] && ! python3 -c "import hydra, math_verify, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$WORK/site" .gpu/wheels/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import datasets" >>"$LOG" 2>&1; then
    python3 -m pip install -q --no-index --no-deps --upgrade --target "$WORK/site" .gpu/wheels-fallback/*.whl >>"$LOG" 2>&1
    say "datasets 5 did not import; installed the 4.x fallback"
  fi
fi
[[ -d .gpu/data ]] && export RELIFT_DATA_DIR="$PWD/.gpu/data"
say "python $(python3 -c 'import sys; print(sys.version.split()[0])'), torch $(python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >>"$LOG" 2>&1

if (( CPU )); then
  SMOKE=(--cpu) CHECK=(--cpu-smoke) TRAINER=(trainer=cpu) TOY=(max_steps=4)
else
  SMOKE=() CHECK=() TRAINER=(trainer=gpu) TOY=()
fi

# 1. The product's paths on the device (each stage in its own process).
part gpu_smoke 170 "$LOG" python3 scripts/gpu_smoke.py --out "$OUT" "${SMOKE[@]}"
# 2. The update-phase benchmark (writes $OUT/gpu_check.json as it goes).
OUT="$OUT" part gpu_check 140 "$LOG" python3 scripts/gpu_check.py "${CHECK[@]}"
# 3. The paper rehearsal on one device with HF rollouts.
part rehearsal 120 "$WORK/rehearsal.log" python3 train.py experiment=paper_rehearsal \
  "${TRAINER[@]}" rollout=hf hydra.run.dir="$WORK/rehearsal"
tail -c 60000 "$WORK/rehearsal.log" >"$OUT/rehearsal.log"
cp "$WORK/rehearsal/summary.json" "$OUT/rehearsal_summary.json" 2>/dev/null
# 4. The toy default on the device.
part toy 120 "$WORK/toy.log" python3 train.py "${TRAINER[@]}" "${TOY[@]}" hydra.run.dir="$WORK/toy"
tail -c 60000 "$WORK/toy.log" >"$OUT/toy.log"
cp "$WORK/toy/summary.json" "$OUT/toy_summary.json" 2>/dev/null
say "done: $(ls "$OUT" | tr '\n' ' ')"
