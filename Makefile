# labelgate — the two commands: `make demo` (run the main job) and `make test` (run the tests).
# Two virtualenvs: Label Studio pins packages below what Prefect needs, so it gets its own.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STUDIO_VENV := .venv-studio
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast studio-down prefect-down clean

setup: $(VENV)/.installed $(STUDIO_VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

$(STUDIO_VENV)/.installed: constraints-studio.txt
	$(PY) -m venv $(STUDIO_VENV)
	$(STUDIO_VENV)/bin/pip install -q -c constraints-studio.txt label-studio==1.23.2
	touch $@

demo: setup
	$(VENV)/bin/labelgate demo

test: setup
	$(VENV)/bin/pytest

# the inner loop: everything but the tests marked slow (trainings, server starts, a browser)
test-fast: setup
	$(VENV)/bin/pytest -m "not slow"

studio-down:
	$(VENV)/bin/labelgate studio down

prefect-down:
	$(VENV)/bin/labelgate prefect down

clean:  # stop the servers whose state is about to go, then remove it
	-[ -x $(VENV)/bin/labelgate ] && $(VENV)/bin/labelgate prefect down
	-[ -x $(VENV)/bin/labelgate ] && $(VENV)/bin/labelgate studio down
	rm -rf $(VENV) $(STUDIO_VENV) .labelgate
