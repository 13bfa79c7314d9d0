# Two commands do all the set-up: `make demo` and `make test`.
# torch/torchvision are pinned here (pyproject declares ranges); plain pip finds these wheels on
# the build machines' local index, a user's machine gets them from PyPI.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIN    := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean embedded bench

# The pinned torch wheel brings its CUDA libraries: the venv takes about 6 GiB. A new venv checks the
# free space first, so a full disk stops here with a clear message instead of deep inside pip.
VENV_GB ?= 6

$(VENV)/.installed: pyproject.toml
	@test -d $(VENV) || $(PYTHON) -c "import os, shutil, sys; \
	d = os.path.dirname(os.path.abspath('$(VENV)')); free = shutil.disk_usage(d).free / 2**30; \
	sys.exit(0 if free >= $(VENV_GB) else \
	f'make: {free:.1f} GiB free on {d}, the venv needs about $(VENV_GB) GiB (torch with its CUDA libraries); ' \
	'free some space, or put the venv elsewhere: make VENV=/path/with/space ...')"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIN)
	$(PY) -m pip install -q -e ".[dev]" $(PIN)
	touch $@

install: $(VENV)/.installed

# Pretrain SimCLR on the embedded CIFAR-10 subset, then kNN vs random init.
demo: install
	$(VENV)/bin/selfsup pretrain --out runs/demo

test: install
	$(PY) -m pytest

# Rebuild the embedded dataset from ../shared/data/cifar10-jpg.tar.gz (already committed).
embedded: install
	$(PY) scripts/build_embedded.py

clean:
	rm -rf $(VENV) runs .pytest_cache
