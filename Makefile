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

# The tests in three pytest processes at once, one per part (tests/conftest.py, RAY_PARTS): those
# that start a Ray of their own, those that use the test Ray, and those that use none. A part
# alone leaves cores idle while Ray or an actor starts or a subprocess runs; the others fill
# them. Ray gives a node 30 s to start, and a Ray that starts beside busy processes of the same
# priority took 42 s here (8 busy loops; 10 s alone). So the test Ray starts first; then the
# tests that start Rays of their own run at the first priority (nice 0), those of the test Ray
# at the second (10), and the others take what is left (19). The reports of the background
# parts follow the first's. Ctrl-C stops all three (a shell starts the background ones with
# SIGINT ignored). `pytest` alone runs them all, in turn.
test: install lint
	@own=$$(mktemp); none=$$(mktemp); up=$$(mktemp -u); \
	( for i in $$(seq 300); do test -e $$up && break; sleep 1; done; \
	  exec $(PY) -m pytest -q --ray own ) > $$own 2>&1 & own_pid=$$!; \
	nice -n 19 $(PY) -m pytest -q --ray none > $$none 2>&1 & none_pid=$$!; \
	trap 'kill $$own_pid $$none_pid 2>/dev/null; rm -f $$own $$none $$up; exit 130' INT TERM; \
	FRAMECAST_TEST_RAY_UP=$$up nice -n 10 $(PY) -m pytest -q --ray session; session=$$?; \
	wait $$own_pid; own_rc=$$?; wait $$none_pid; none_rc=$$?; \
	echo "--- the tests that start a Ray of their own:"; cat $$own; \
	echo "--- the tests that use no Ray cluster:"; cat $$none; rm -f $$own $$none $$up; \
	test $$session -eq 0 && test $$own_rc -eq 0 && test $$none_rc -eq 0

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db framecast-serve
