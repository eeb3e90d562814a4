#!/usr/bin/env bash
# Run here, before a session's first call to the device machine: puts into .gpu/ (ignored) the wheels that machine
# lacks and benchmarks/gpu_session.sh installs there. Its image has an older transformers and no bitsandbytes, and
# nothing can be fetched from it. bitsandbytes keeps only its CUDA 13 libraries: whole, it is over half of the
# 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .gpu && mkdir -p .gpu/tmp
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu/tmp "transformers==$(version transformers)" "bitsandbytes==$(version bitsandbytes)"
mv .gpu/tmp/transformers-*.whl .gpu/
wheel=$(basename .gpu/tmp/bitsandbytes-*.whl)
(cd .gpu/tmp && mkdir unpacked && cd unpacked && unzip -q "../$wheel" \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cpu.so' ! -name '*cuda13*.so' -delete \
  && zip -qr "../../$wheel" .)
rm -rf .gpu/tmp
ls -la .gpu
