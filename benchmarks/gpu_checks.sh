#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent GPU machine, or any CUDA box):
#   bash benchmarks/gpu_checks.sh OUT_DIR
# 1. `pytest -m gpu`: real NCCL (a world of one rank), the Triton kernels on CUDA equal to the eager
#    path, the optimizers on CUDA equal to the CPU simulator. 2. benchmarks/gpu.py (exchange compute
#    vs a device copy at 110M and 1B params; a GPT-2-small step per optimizer). 3. benchmarks/gpu_tune.py
#    (the Triton kernels' tile and warps). Logs and results in OUT_DIR.
# With a .whl/ folder (`make gpu-wheels`, carried to the machine), its wheels (DeepSpeed 0.19.6 and what the
# GPU image lacks) are installed first, so that benchmarks/gpu.py also times DeepSpeed's own OnebitAdam.
set -o pipefail
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/wheels.log" 2>&1
  pip_rc=$?
  [ "$pip_rc" = 0 ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  echo "wheels: $(ls .whl | tr '\n' ' ')(pip rc $pip_rc)" >> "$out/wheels.log"
fi
nvidia-smi -L > "$out/card.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >> "$out/card.txt" 2>&1
timeout "${GPU_TESTS_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/optim/test_nccl.py \
  tests/optim/test_gpu.py tests/optim/test_functional.py tests/kernels/test_triton_exchange.py \
  tests/kernels/test_device_decided_step.py 2>&1 | tee "$out/gpu_tests.log"
tests_rc=$?
timeout "${GPU_BENCH_TIMEOUT:-300}" python3 benchmarks/gpu.py --results "$out" "${@:2}" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=$?
# 3. the kernels' tile x warps sweep (gpu_tune.py: default vs best setting per scheme, against the targets)
timeout "${GPU_TUNE_TIMEOUT:-240}" python3 benchmarks/gpu_tune.py --results "$out" 2>&1 | tee "$out/gpu_tune.log"
tune_rc=$?
echo "tests rc=$tests_rc bench rc=$bench_rc tune rc=$tune_rc" | tee -a "$out/card.txt"
exit $((tests_rc || bench_rc || tune_rc))
