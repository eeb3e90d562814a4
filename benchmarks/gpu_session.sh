#!/usr/bin/env bash
# The GPU checks of issues 15 and 16 on the device machine, one stage per call (each fits in a call's 10 minutes).
# Prepare here with benchmarks/gpu_wheels.sh, then call the device tool with carry [".gpu"] and the command
#   bash benchmarks/gpu_session.sh STAGE
# Stages, in the order a session with 30 minutes of device time should run them:
#   tests   the CUDA step's bitwise tests, then the reuse, batch, stream and host-RAM tests in the exact mode,
#           bf16 and NF4 (their logs and junit files go to $OUT)
#   host    a session evicted to host RAM coming back, against reading it again (270M and 8B shapes)
#   decode  benchmarks/gpu.py on the 270M, 0.6B and 4B shapes -> $OUT/small/decode.{json,md}
#   decode8b  the 8B shape with a 16k-token prompt -> $OUT/8b/decode.{json,md}
# Then here: python benchmarks/gpu.py --combine <the decode.json files> (docs/benchmarks/gpu/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, \
torch.cuda.get_device_name())" || exit 1

# The pages' tests need gradio, which the device image lacks; CI runs them.
NO_APP="not the_page and not the_server_takes"
EXACT_TESTS="tests/test_cache_reuse.py tests/test_batched_decode.py tests/test_streaming.py tests/test_host_tier.py"

case "${1:-}" in
  tests)
    status=0
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_step.py --junitxml="$OUT/cuda_step.xml" 2>&1 \
      | tee "$OUT/cuda_step.log" | tail -3 || status=1
    for quantization in none nf4; do
      LLM_TEST_DEVICE=cuda LLM_TEST_DTYPE=bfloat16 LLM_TEST_QUANTIZATION=$quantization LLM_TEST_EXACT=1 \
        timeout 200 python3 -m pytest -q -p no:cacheprovider $EXACT_TESTS -k "$NO_APP" \
        --junitxml="$OUT/exact_$quantization.xml" 2>&1 | tee "$OUT/exact_$quantization.log" | tail -3 || status=1
    done
    exit $status
    ;;
  host)
    for shape in gemma3-270m qwen3-8b; do
      python3 benchmarks/host_tier.py --shape "$shape" --device cuda 2>&1 | grep -v Warning | tee "$OUT/host_$shape.md"
    done
    ;;
  decode)
    python3 benchmarks/gpu.py --models gemma3-270m,qwen3-0.6b,gemma3-4b --out "$OUT/small" 2>&1 | tail -20
    ;;
  decode8b)
    python3 benchmarks/gpu.py --models qwen3-8b --long 16384 --out "$OUT/8b" 2>&1 | tail -20
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh tests|host|decode|decode8b" >&2
    exit 2
    ;;
esac
