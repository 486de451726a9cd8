# Two entry points a fresh clone needs: `make demo` and `make test`.
# torch is installed first and pinned to the CPU wheel this project is tested with,
# so that pip never resolves a multi-GB CUDA build as a dependency of diffusers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/compinv demo --out demo-output

test: install
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-output build dist src/*.egg-info
