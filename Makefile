# `make run` and `make test` work on a fresh machine from a clean clone: they create .venv and install
# what they need (torch 2.14.1 + torchvision 0.29.1, vlmfast with its test, eval, grounding, reweight, search, demo and lint extras, and lmms-eval
# without its ~50 pinned dependencies: see docs/lmms_eval.md).
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.vlmfast-installed
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,eval,grounding,reweight,search,demo,lint]"
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/vlmfast generate --model tiny-llava-shapes --image examples/shapes.png \
	  --prompt "what colour is the cross ?" --max-new-tokens 12

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (style, imports, likely bugs) everywhere; mypy (types) on the library. .ci/run runs it before the tests.
lint: install
	$(VENV)/bin/ruff check vlmfast tests training
	$(VENV)/bin/mypy

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	mkdir -p out
	$(VENV)/bin/vlmfast bench prefill --json out/bench_prefill.json --markdown

clean:
	rm -rf $(VENV) .pytest_cache out
