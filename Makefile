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
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

lint: setup
	$(PY) -m ruff check zipcache_vllm kernels configs tests benchmarks

## Regenerates every number of docs/accuracy.md (about an hour on 2 CPU cores).
accuracy: setup
	bash scripts/accuracy.sh

clean:
	rm -rf out .pytest_cache
