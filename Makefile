# Two entry points: `make demo` (the main job on an embedded default, offline) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# transformers' GPTQ loading on CPU: GPTQModel's torch kernel, built without CUDA; --no-deps keeps the CPU torch
# (its declared pins would pull a CUDA torch and an older numpy)
GPTQ_CPU := gptqmodel==7.6.0 optimum==2.3.0 device-smi logbar pypcre tokenicer defuser torchao threadpoolctl
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test test-all bench formats clean gpu-stage gpu-slices

# llama-cpp-python is compiled for this CPU (GGML_NATIVE): --no-cache-dir, since a wheel cached on another machine
# can die with "Illegal instruction"; without AMX, which some VMs report in CPUID but do not enable (tilezero -> SIGILL)
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/python -m pip install -q --no-cache-dir $$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
	$(BIN)/python -m pip install -q -e ".[test,runtimes]"
	BUILD_CUDA_EXT=0 $(BIN)/python -m pip install -q --no-deps $(GPTQ_CPU)
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench,peers]"
	$(BIN)/python -m bench

# what a CUDA host without network needs for `admmq-export check OUT --gpu` (kernels_check/gpu_stage.py; --dry-run: plan only)
gpu-stage: $(STAMP)
	$(BIN)/python -m kernels_check.gpu_stage

# slices of the benchmark outputs for the GPU host's real-kernel checks (bench/gpu_slices.py); then on the CUDA host,
# with the checkout, .gpu_stage/ and bench/out/gpu_slices/: bench/gpu_host.sh LOGDIR
gpu-slices: $(STAMP)
	$(BIN)/python -m bench.gpu_slices

formats: $(STAMP)
	$(BIN)/admmq-export formats

clean:
	rm -rf $(VENV) build *.egg-info
