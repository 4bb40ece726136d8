# Two commands a user needs: `make demo` and `make test`. Both create the virtual
# environment on first use from the pinned files in requirements/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQS := pyproject.toml requirements/base.txt requirements/torchrec-cpu.txt requirements/data.txt requirements/test.txt
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): $(REQS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/base.txt -r requirements/test.txt
	$(BIN)/pip install --quiet --no-deps -r requirements/torchrec-cpu.txt -r requirements/data.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "import torchrec, fbgemm_gpu, torchx, pyarrow, prometheus_client"
	touch $@

data/census/schema.json: $(STAMP)
	$(BIN)/recbalance data census --output data/census

demo: $(STAMP) data/census/schema.json
	rm -rf runs/demo  # a fresh run each time (a kept directory would resume from its checkpoint)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/recbalance train --config configs/demo.toml \
		--output-dir runs/demo --nproc-per-node 2

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs data
