#!/usr/bin/env bash
# The GPU checks of this project as one call on a lent GPU machine (docs/benchmarks.md, "GPU
# figures"): the kernels compiled for real and checked in bf16/fp16/fp32, their speed, and the
# compiled train step of the 12-layer GPT. Fits one device call (≤ 9 min; each step has its own
# time limit). Runs under the machine's own python3 (its torch and triton: nothing can be
# installed from a registry there), installs mhc_fx without dependencies, writes every log under
# $OUT and prints a short summary last.
#
#   bash benchmarks/gpu_session.sh                # kernels, tests, GPT train step
#   bash benchmarks/gpu_session.sh deepseek_v4    # Hugging Face DeepseekV4ForCausalLM (8 layers,
#                                                 # hidden 256, batch 4 × 256): plain Inductor vs
#                                                 # backend="mhc", first step and step (needs
#                                                 # transformers ≥ 5.25 in the machine's python3)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"

if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_session: no CUDA device visible to python3's torch; run this on a GPU machine" >&2
    exit 2
fi
# offline: the machine's setuptools builds the editable install, no dependency is fetched
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1; then
    tail -n 20 "$OUT/install.txt" >&2
    exit 2
fi
python3 -c 'import torch, triton; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)' \
    | tee "$OUT/summary.txt"

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in $OUT/NAME.txt
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

if [ "${1:-}" = deepseek_v4 ]; then
    names=(deepseek_v4)
    step deepseek_v4 540 python3 benchmarks/deepseek_v4_step.py --device cuda --steps 10
else
    names=(gpu_tests kernels train_step)
    step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/test_kernels_gpu.py
    step kernels 150 python3 benchmarks/kernel_speed.py --tokens 16384 --channels 1280 4096 --dtype bf16
    step train_step 200 python3 benchmarks/train_step.py --backend mhc --device cuda --no-plain-inductor
fi

for name in "${names[@]}"; do
    echo "== $name (last lines; whole log in $OUT/$name.txt)"
    tail -n 18 "$OUT/$name.txt"
done
cat "$OUT/summary.txt"
