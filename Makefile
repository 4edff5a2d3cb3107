# framecast: `make demo` (install + one tiny generation) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines: point TORCH_INDEX at the PyTorch wheel index of your CUDA version
# (README, "GPU machines"); empty means the default index (a CPU wheel here).
TORCH_INDEX ?=
PROMPT ?= a red fox running through fresh snow, cinematic lighting

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/framecast generate --model tiny --prompt "$(PROMPT)" --output outputs/demo.mp4

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db framecast-serve
