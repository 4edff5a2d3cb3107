# framecast: `make demo` (install + one video from the trained demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines: point TORCH_INDEX at the PyTorch wheel index of your CUDA version
# (README, "GPU machines"); empty means the default index (a CPU wheel here).
TORCH_INDEX ?=
# framecast-shapes, the default model, knows one grammar (stages/shapes.py):
#   a {red,green,blue,yellow,white} {circle,square,triangle} moving {left,right,up,down} on a {black,gray} background
PROMPT ?= a green triangle moving down on a black background
DEMO_OUTPUT ?= outputs/demo.mp4

.PHONY: install demo train-demo test lint clean

install: $(VENV)/.installed

# Bytecode is written on a module's first import instead of compiled for every module at install
# (pip's default, uv's --compile-bytecode): the venv holds about 26,000 modules and framecast's
# processes import some 5,000 of them. On this 2-core machine, packages already downloaded, the
# install took 20 s instead of 115 s; compiling what a stage build, the CLI and Serve import
# costs about 30 s of CPU, in the first processes to import it. For that the make
# targets let Python write bytecode even where PYTHONDONTWRITEBYTECODE is set: without it every
# process would compile what it imports again (torch, Ray, MLflow and diffusers: 24 s, not 13 s).
# It lands in the usual __pycache__ folders, where a later `.venv/bin/framecast` finds it too.
unexport PYTHONDONTWRITEBYTECODE

# torch with pip (it finds the local CPU wheel, or TORCH_INDEX's build); the rest with uv, which
# resolves and fetches in parallel and keeps that torch.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --no-compile -c constraints.txt uv
	$(PY) -m uv pip install -q --python $(PY) -c constraints.txt -e ".[test]"
	touch $@

# The committed weights in models/framecast-shapes: nothing is trained or downloaded.
demo: install
	$(VENV)/bin/framecast generate --model framecast-shapes --prompt "$(PROMPT)" --output $(DEMO_OUTPUT)

# Retrain framecast-shapes from its seed into models/framecast-shapes (about 75 minutes on 2 cores).
train-demo: install
	$(PY) -m tools.train_shapes

lint: install
	$(PY) -m ruff check .

# The tests in two pytest processes at once: those that use a Ray cluster (the test Ray, or one
# they start) or watch the clock (marked on_time), and beside them, at the lowest CPU priority,
# the others, which run in the test process alone and take the cycles the first leave idle (while
# actors start, Ray starts, or a subprocess runs). The second's report follows the first's. Ctrl-C
# stops both (a shell starts the second in the background with SIGINT ignored). `pytest` alone
# runs them all, in turn.
test: install lint
	@others=$$(mktemp); nice -n 19 $(PY) -m pytest -q --ray none > $$others 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; rm -f $$others; exit 130' INT TERM; \
	$(PY) -m pytest -q --ray only; cluster=$$?; \
	wait $$pid; local=$$?; echo "--- the tests that use no Ray cluster:"; cat $$others; rm -f $$others; \
	test $$cluster -eq 0 && test $$local -eq 0

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db framecast-serve
