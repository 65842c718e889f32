# `make demo` and `make test` set up .venv/ on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A second environment with torchvision, for the tests of the stock Qwen-VL processors, sentence-transformers'
# own multimodal loading and the fast image processors (torchvision imports beside this torch pair only).
TV_VENV := .venv-tv
TV_PY := $(TV_VENV)/bin/python
OUT ?= out/nano

.PHONY: setup setup-torchvision demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

$(TV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TV_VENV)
	$(TV_PY) -m pip install --quiet --upgrade pip
	$(TV_PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(TV_PY) -m pip install --quiet -e ".[test]"
	touch $@

setup-torchvision: $(TV_VENV)/.installed

demo: setup
	$(PY) examples/nano/run_pipeline.py --output_dir $(OUT)

# The main suite without torchvision, then the torchvision tests in their own environment.
test: setup setup-torchvision
	$(PY) -m pytest -q -n 2 --durations=15 -m "not torchvision"
	$(TV_PY) -m pytest -q -n 2 -m torchvision

clean:
	rm -rf $(VENV) $(TV_VENV) out
