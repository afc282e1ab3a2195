# zipcache-vllm: every target does its own set-up (scripts/setup.sh is idempotent).
PY      := .venv/bin/python
SETUP   := scripts/setup.sh
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit lint accuracy clean

setup:
	@bash $(SETUP)

## The main job until the vLLM plugin lands: an accuracy comparison on the bundled model (table + plot).
demo: setup
	$(PY) -m zipcache_vllm.eval sweep --text-file data/prose.txt --max-windows 2 \
	    --ratios 0.2,0.6,1.0 --families zipcache,zipcache-paged --baselines bf16,int4,int2,kivi2 \
	    --plot out/demo_sweep.png --output out/demo_sweep.json

## Unit, kernel (Triton interpreter) and integration tests on the CPU.
test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider --timeout 900

test-unit: setup
	$(PY) -m pytest tests/method tests/engine -q -p no:cacheprovider

## ruff on the code, hadolint on every Dockerfile (docker/.hadolint.yaml: any finding fails).
DOCKERFILES := $(filter-out %.dockerignore,$(wildcard docker/Dockerfile*))
lint: setup
	$(PY) -m ruff check zipcache_vllm kernels configs tests benchmarks docker
	.venv/bin/hadolint --config docker/.hadolint.yaml $(DOCKERFILES)

## Regenerates every number of docs/accuracy.md (about an hour on 2 CPU cores).
accuracy: setup
	bash scripts/accuracy.sh

clean:
	rm -rf out .pytest_cache

## Serve the bundled SmolLM2-135M-Instruct with the ZipCache KV cache on 127.0.0.1:8000 (OpenAI-compatible).
## 32 concurrent sequences: each holds one bf16 staging slot (3 MB on SmolLM2), paid out of the 1 GiB KV budget.
SERVE_ARGS ?= --max-num-seqs 32
.PHONY: serve
serve: setup
	VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
	VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-0-$$(($$(nproc) - 1))} \
	.venv/bin/zipcache-vllm serve "$$($(PY) -m zipcache_vllm.models | tail -1)" --kv-cache-backend zipcache \
	    --host 127.0.0.1 --port 8000 --dtype bfloat16 --served-model-name smollm2 --enforce-eager \
	    --max-model-len 2048 $(SERVE_ARGS)
