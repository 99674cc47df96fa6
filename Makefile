# Everything installs into a local .venv; nothing is needed beforehand but python3 (>= 3.11).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean browser

# pip byte-compiles what it installs on one core: with torch, tensorflow, ray and mlflow that
# took 2.5 min of a fresh clone's 12-min CI budget (48 s without). Python compiles the few
# modules a run imports when it first imports them, and keeps them -- unless
# PYTHONDONTWRITEBYTECODE is set, when every process would compile all it imports again:
# the commands below run with it unset ($(RUN)).
RUN := env -u PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[test,backends,mlflow,datasets,ray]'
	$(RUN) $(BIN)/python -c 'from ablab.engine.small_products import main; main()'
	touch $(STAMP)

demo: $(STAMP)
	$(RUN) $(BIN)/ablab run examples/bn_yes_or_no.toml --report

# The report's browser test drives Debian's Chromium (headless). Installed with apt-get when
# missing and this is root (as on CI); elsewhere that one test is skipped (it fails under CI=true).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the report's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: no Chromium and no root apt-get: the report's browser test will be skipped"; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(RUN) $(BIN)/python -m pytest -n 2 --dist loadfile --durations=25

bench: $(STAMP)
	$(RUN) $(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs test-artifacts .pytest_cache .ruff_cache
