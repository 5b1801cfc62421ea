#!/usr/bin/env bash
# Prepares what the GPU machine lacks (run here, on a machine with PyPI): the pure-Python wheels
# of hydra-core, omegaconf, antlr4, math-verify, latex2sympy2_extended, datasets, dill,
# multiprocess and xxhash for Python 3.12, and the data the rehearsal reads (benchmarks, MATH
# train), into .gpu/ (git-ignored). The device tool then carries .gpu and the built bases (not
# all of .cache: the toy study's runs there are GBs, over the carry limit):
#   carry: [".gpu", ".cache/toy_base", ".cache/tiny_qwen", ".cache/openr1_sample"]
#   command: bash scripts/gpu_first_run.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu/wheels
mkdir -p "$WHEELS" .gpu/data/benchmarks .gpu/data/train
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
  -d "$WHEELS" hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
  datasets==5.2.0 dill==0.4.1 "multiprocess==0.70.19"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "xxhash>=3.4"
# A datasets 4.x fallback, in case 5.x does not import beside the image's pyarrow / hub client.
mkdir -p .gpu/wheels-fallback
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
  -d .gpu/wheels-fallback "datasets>=4,<5"
# antlr4-python3-runtime 4.9.3 (hydra's pin) exists only as an sdist: build its wheel.
python -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
DATA=${RELIFT_DATA_DIR:-../shared/data}
cp "$DATA"/benchmarks/* .gpu/data/benchmarks/
cp "$DATA"/train/math_train.jsonl .gpu/data/train/
du -sh .gpu "$WHEELS"
ls "$WHEELS"
