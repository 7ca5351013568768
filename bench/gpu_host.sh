#!/usr/bin/env bash
# The GPU part of the benchmarks, on a CUDA host with no network (issues 3, 5, 10, 11):
#   bench/gpu_host.sh LOGDIR
# needs the checkout with `.gpu_stage/` (`make gpu-stage`) and, for gpu_checks, the slices in bench/out/gpu_slices
# (`make gpu-slices`). The host's python3 must hold torch (CUDA), transformers, safetensors, numpy, triton.
# Builds run in the background while the GPU times the quantizers: Marlin fp16 and bf16 (torch JIT, cached in
# .gpu_build/ext) and ggml-python with GGML_CUDA (into .gpu_build/ggml). Then: real-kernel checks of our files,
# kernel speed, and the CUDA tests. Every step logs to LOGDIR; results land in bench/results/ and LOGDIR/results.tgz.
set -u
LOG=${1:?usage: bench/gpu_host.sh LOGDIR}
mkdir -p "$LOG" .gpu_build/site .gpu_build/ggml .gpu_build/ext
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu_build/site .gpu_stage/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.gpu_build/site:$PWD/.gpu_build/ggml PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=$PWD/.gpu_build/ext NVIDIA_TF32_OVERRIDE=0
nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

for dt in fp16 bf16; do
  ( MAX_JOBS=6 $PY -c "from kernels_check import gpu_marlin as m; m._ops('$dt'); print('marlin $dt built')" \
      > "$LOG/build_marlin_$dt.log" 2>&1; echo "rc=$?" >> "$LOG/build_marlin_$dt.log" ) &
done
if ! ls .gpu_build/ggml/ggml/lib/libggml-cuda.so >/dev/null 2>&1; then
  ( CMAKE_BUILD_PARALLEL_LEVEL=8 CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF \
      -DGGML_CUDA_FORCE_CUBLAS=ON -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF" \
      $PY -m pip install --no-index --no-deps --no-build-isolation --target .gpu_build/ggml \
      .gpu_stage/ggml_python-*.tar.gz > "$LOG/build_ggml.log" 2>&1; echo "rc=$?" >> "$LOG/build_ggml.log" ) &
fi

left() { local l=$(( ${BUDGET_S:-575} - $(date +%s) + T0 - ${1:-0} )); echo $(( l < 20 ? 20 : l )); }
if [ -z "${ONLY_CHECKS:-}" ]; then  # ONLY_CHECKS=1: the kernel checks, speed and tests alone
  stamp "cost: GPTQ vs ADMM-Q on LLM-sized layers"
  timeout "${COST_TIMEOUT:-270}" $PY -m bench --suite cost > "$LOG/cost.log" 2>&1; stamp "cost rc=$?"
  timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_quantizers.py -k cuda > "$LOG/pytest_cuda_quantizers.log" 2>&1
  stamp "pytest quantizers rc=$?"; tail -n 2 "$LOG/pytest_cuda_quantizers.log"
fi
stamp "waiting for the builds"
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt "${BUILD_DEADLINE:-400}" ]; do sleep 5; done
stamp "builds: $(jobs -rp | wc -l) still running"; tail -n 2 "$LOG"/build_*.log
timeout "$(left 45)" $PY -m bench --suite gpu_checks,gpu_kernels > "$LOG/checks.log" 2>&1; stamp "checks rc=$?"
timeout "$(left)" $PY -m pytest -q -p no:cacheprovider tests/test_gpu_check.py -k cuda > "$LOG/pytest_cuda_kernels.log" 2>&1
stamp "pytest kernels rc=$?"; tail -n 3 "$LOG/pytest_cuda_kernels.log"
tar czf "$LOG/results.tgz" bench/results/cost_gpu.* bench/results/gpu_checks* bench/results/gpu_kernels.* 2>/dev/null
stamp "done"
