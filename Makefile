# labelgate — the two commands: `make demo` (run the main job) and `make test` (run the tests).
# Two virtualenvs: Label Studio pins packages below what Prefect needs, so it gets its own.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STUDIO_VENV := .venv-studio
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test studio-down clean

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

studio-down:
	$(VENV)/bin/labelgate studio down

clean:
	rm -rf $(VENV) $(STUDIO_VENV) .labelgate
