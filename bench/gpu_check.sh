#!/usr/bin/env bash
# One prepared run on a borrowed GPU machine (its python3 holds CUDA PyTorch; captum and mlxtend
# travel as wheels in .whl/): the CUDA path's tests, the engine benchmark, and a cold + warm build
# of the default case study on CUDA. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_influence.py \
    tests/test_experts.py 2>&1 | tail -4 | tee "$OUT/tests.log"
timeout 90 python3 bench/engine.py --device cuda --repeats 5 --chunk 6400 2>&1 | tee "$OUT/engine_cuda.log"
timeout 240 python3 bench/build.py --case decoy-mnist --device cuda \
    --stages data,models,experts,representations,corrections 2>&1 | tail -30 | tee "$OUT/build_cuda.log"
