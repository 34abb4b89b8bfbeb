# aqcf — every target creates the virtual environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
AQCF := $(VENV)/bin/aqcf
CONFIG ?= configs/lits_atlas.yaml
FOLDS ?= 0 1 2 3 4
RUNS ?= runs
export WANDB_MODE ?= offline

.PHONY: help venv test test-full lint demo bench cv clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed  ## create .venv and install torch==2.13.0 (CPU) and aqcf[dev]

test: venv  ## run the test suite (no slow tests)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-full: venv  ## run every test, the slow ones too
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: venv  ## ruff
	$(VENV)/bin/ruff check aqcf tests benchmarks

demo: venv  ## phantoms -> train configs/demo.yaml -> held-out test -> demo_out/report.md (768 steps: 12-18 min on 2 CPU cores)
	$(AQCF) demo --out demo_out

cv: venv  ## cross-validation of CONFIG on FOLDS, then the mean +- SD table -> RUNS/<config>/report/
	@set -e; \
	$(call cv_run,$(STEM),); \
	$(AQCF) report $(STEM)=$(RUNS)/$(STEM) --pattern $(REPORT_PATTERNS) --out $(RUNS)/$(STEM)/report --overwrite

bench: venv  ## benchmarks -> benchmarks/results.json and benchmarks/results.md
	$(PY) benchmarks/run.py --out benchmarks/results

clean:  ## remove the venv and generated outputs
	rm -rf $(VENV) runs demo_out .pytest_cache

# ---------------------------------------------- ablations (Table 7) and baselines (section 4.1.3)
ABLATIONS ?= no_adaptive_gate no_cross_fusion no_quaternion no_shared_bottleneck no_attention_gates
BASELINES ?= unimodal_ct unimodal_mri nnunet_ct nnunet_mri nnunet_joint \
	attention_unet_ct attention_unet_mri attention_unet_joint unetr_ct unetr_mri unetr_joint \
	swin_unetr_ct swin_unetr_mri swin_unetr_joint
TEST_CKPT ?= best
STEM = $(basename $(notdir $(CONFIG)))
# the report reads the folds of FOLDS only (single-digit fold numbers), so every row averages the same folds
REPORT_FOLDS = fold[$(FOLDS)]
# Seeds: seed 0 runs in RUNS/<run>/fold<k>, seed s in RUNS/<run>/seed<s>/fold<k> (--seed_everything s)
SEEDS ?= 0
REPORT_PATTERNS = $(foreach s,$(SEEDS),'$(if $(filter 0,$(s)),,seed$(s)/)$(REPORT_FOLDS)/test/summary.json')
# Ablations and baselines compare at equal work: no wall-clock stop (the config's max_epochs / max_steps
# decide), or STEPS optimiser steps for every run when set (e.g. STEPS=768 on the demo config).
STEPS ?=
EQUAL_WORK = --trainer.max_time null $(if $(STEPS),--trainer.max_steps $(STEPS) --trainer.max_epochs -1,)

# Shell loop: fit and test run $(1) (configs $(2) layered on CONFIG) on each fold of FOLDS, in
# RUNS/$(1)/fold<k>. A fold whose test/summary.json is newer than its last.ckpt is done and skipped; a
# fold holding checkpoints/last.ckpt resumes from it. The test uses checkpoints/$(TEST_CKPT).ckpt and replaces
# the fold's older test results (--overwrite true); the reports are rebuilt from the fold summaries each time.
cv_run = for s in $(SEEDS); do for k in $(FOLDS); do \
	  sd=""; seedarg=""; if [ "$$s" != 0 ]; then sd="seed$$s/"; seedarg="--seed_everything $$s"; fi; \
	  root="$(RUNS)/$(1)/$${sd}fold$$k"; ckpts="$$root/checkpoints"; \
	  if [ -f "$$root/test/summary.json" ] && [ "$$root/test/summary.json" -nt "$$ckpts/last.ckpt" ]; then \
	    echo "== $(1) $${sd}fold $$k: done ($$root/test/summary.json)"; continue; fi; \
	  args="--config $(CONFIG) $(2) --run_name $(1) --data.fold $$k --trainer.default_root_dir $$root $$seedarg $(3)"; \
	  resume=""; if [ -f "$$ckpts/last.ckpt" ]; then resume="--ckpt_path last"; fi; \
	  echo "== $(1) $${sd}fold $$k: $(AQCF) fit $$args $$resume"; \
	  $(AQCF) fit $$args $$resume; \
	  ckpt="$$ckpts/$(TEST_CKPT).ckpt"; if [ ! -f "$$ckpt" ]; then ckpt="$$ckpts/last.ckpt"; fi; \
	  echo "== $(1) $${sd}fold $$k: $(AQCF) test $$args --ckpt_path $$ckpt --overwrite true"; \
	  $(AQCF) test $$args --ckpt_path "$$ckpt" --overwrite true; \
	done; done

.PHONY: ablations baselines

ablations: venv  ## Table 7: full model + ablations on FOLDS -> RUNS/ablations_report/<config>/
	@set -e; \
	$(call cv_run,$(STEM),,$(EQUAL_WORK)); \
	for a in $(ABLATIONS); do $(call cv_run,$(STEM)-$$a,--config configs/ablations/$$a.yaml,$(EQUAL_WORK)); done; \
	$(AQCF) report full_model=$(RUNS)/$(STEM) $(foreach a,$(ABLATIONS),$(a)=$(RUNS)/$(STEM)-$(a)) \
	  --baseline full_model --pattern $(REPORT_PATTERNS) --out $(RUNS)/ablations_report/$(STEM) \
	  --overwrite

# A baseline <family>_<ct|mri|joint> also gets BASELINE_SIZES/<family>.yaml where present: the sizes (patch,
# img_size, ...) of the networks that depend on the patch, for a base config other than the paper's.
BASELINE_SIZES ?= configs/baselines/$(STEM)

baselines: venv  ## full model + baselines on FOLDS -> RUNS/baselines_report/<config>/
	@set -e; \
	$(call cv_run,$(STEM),,$(EQUAL_WORK)); \
	for b in $(BASELINES); do \
	  sizes="$(BASELINE_SIZES)/$${b%_*}.yaml"; extra=""; if [ -f "$$sizes" ]; then extra="--config $$sizes"; fi; \
	  $(call cv_run,$(STEM)-$$b,--config configs/baselines/$$b.yaml $$extra,$(EQUAL_WORK)); \
	done; \
	$(AQCF) report full_model=$(RUNS)/$(STEM) $(foreach b,$(BASELINES),$(b)=$(RUNS)/$(STEM)-$(b)) \
	  --baseline full_model --pattern $(REPORT_PATTERNS) --out $(RUNS)/baselines_report/$(STEM) \
	  --overwrite
