# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine holds; pinned and installed first so pip never
# fetches a CUDA build of several GB. Override with `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo

.PHONY: demo test lint browser bench bench-sd1 fuzz clean

$(BIN)/.installed: pyproject.toml setup.py weightmix/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m weightmix.examples $(DEMO_DIR)
	$(BIN)/weightmix merge examples/demo.yaml --dry-run
	$(BIN)/weightmix merge examples/demo.yaml -o $(DEMO_DIR)/merged.safetensors --overwrite
	$(BIN)/weightmix inspect $(DEMO_DIR)/merged.safetensors

test: $(BIN)/.installed lint browser
	$(BIN)/python -m pytest

# The web UI's test drives a real headless Chromium: Debian's chromium and its driver,
# installed with apt-get where this runs as root; otherwise that one test says why it skips.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >/dev/null || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	  echo "apt-get could not install chromium: the browser test will be skipped"; \
	else echo "no chromium and not root: the browser test will be skipped"; fi

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-sd1: $(BIN)/.installed
	$(BIN)/python bench/bench_merge.py --arch sd1

# The merge benchmarks against the I/O floor: SD1.5, SDXL (fp16) and a Flux transformer (fp8),
# warm then cold page cache (the cold runs need root). Inputs are generated into
# $$WEIGHTMIX_BENCH_DIR (default /tmp/weightmix-bench); SDXL's and Flux's are deleted after
# their runs: at most ~60 GB of disk at a time (Flux: 3 x 11.9 GB inputs and an output).
bench: $(BIN)/.installed
	$(BIN)/python bench/bench_merge.py --arch sd1 --repeat 3
	$(BIN)/python bench/bench_merge.py --arch sd1 --repeat 3 --cold
	$(BIN)/python bench/bench_merge.py --arch sdxl --repeat 3
	$(BIN)/python bench/bench_merge.py --arch sdxl --repeat 3 --cold --drop-inputs
	$(BIN)/python bench/bench_merge.py --arch flux --repeat 1 --cold --drop-inputs

# Every parser a stranger's file reaches, 100,000 mutated inputs each (hours on 2 cores;
# e.g. `make fuzz FUZZ_ARGS="--examples 2000 --parsers safetensors,pickle"`). Failing
# inputs are saved under fuzz-failures/ (replay: bench/fuzz.py --replay PARSER FILE).
FUZZ_ARGS ?= --examples 100000
fuzz: $(BIN)/.installed
	$(BIN)/python bench/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache fuzz-failures test-artifacts
