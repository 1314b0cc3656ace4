# Two commands on a fresh machine:
#   make train   -- installs into .venv, then runs a short default training run with rollback (CartPole-v1)
#   make test    -- installs into .venv (with test extras), then runs the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install train test clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# CPU build of torch: the default PyPI wheel is a ~5 GB CUDA build these small networks do not need.
	$(VENV)/bin/pip install -q torch==2.13.0 || $(VENV)/bin/pip install -q "torch>=2.3"
	# ray: the compare command's Ray backend is tested against a real local Ray instance.
	$(VENV)/bin/pip install -q -e ".[test,ray,box2d]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/rollback-rl train

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
