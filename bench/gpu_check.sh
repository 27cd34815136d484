#!/usr/bin/env bash
# One prepared run on a borrowed GPU machine (its python3 holds CUDA PyTorch and torchvision; captum
# and mlxtend travel as wheels in .whl/): the CUDA path's tests and the engine's tests on the card,
# the engine benchmarks (DecoyMNIST, then the real-size experts job on ResNet-50 and VGG16 at 224²
# against Captum and the limit), VGG16 at 224² over 10,000 images on one card (no OOM; the card's
# name is printed first), and a cold + warm build of both built-in cases on CUDA with per-stage seconds. Logs go to
# $OUT. Each step has its own timeout so that one slow step cannot eat the others' time; together
# they allow at most 14.5 minutes (not yet measured on a card: this version has not been run).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(),
      round(torch.cuda.get_device_properties(0).total_memory / 2**30), 'GiB')" | tee "$OUT/gpu.txt"
# The CUDA tests, then the engine's own tests (the model on the card is the default device there).
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_influence.py \
    tests/test_experts.py tests/test_engine_conventions.py tests/test_engine_models.py \
    tests/test_zoo.py 2>&1 | tail -6 | tee "$OUT/tests.log"
timeout 60 python3 bench/engine.py --device cuda --repeats 5 --chunk 6400 2>&1 | tee "$OUT/engine_cuda.log"
# The real-size experts job: 3 layers x 3 classes, 32 images at 224², LinearDoI R = 8.
timeout 150 python3 bench/engine.py --workload real --device cuda --models resnet50,vgg16 \
    --images 32 --size 224 --resolution 8 --classes 3 --chunk 64 --repeats 3 2>&1 \
    | tee "$OUT/engine_real_cuda.log"
# Scale: VGG16 at 224² over 10,000 images (3 layers x 3 classes, R = 2, chunk from free memory).
timeout 120 python3 bench/engine.py --workload scale --device cuda --models vgg16 --images 10000 \
    --size 224 --resolution 2 --classes 3 2>&1 | tee "$OUT/engine_scale_cuda.log"
# Both built-in cases, every stage, cold then warm, on CUDA: per-stage seconds (issue 21).
timeout 240 python3 bench/build.py --case decoy-mnist --device cuda \
    --stages data,models,experts,discovery,representations,corrections,essence,detection 2>&1 | tail -30 \
    | tee "$OUT/build_cuda.log"
timeout 150 python3 bench/build.py --case faces --device cuda \
    --stages data,models,experts,discovery,representations,corrections,essence,detection 2>&1 | tail -30 \
    | tee "$OUT/build_faces_cuda.log"
