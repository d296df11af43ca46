# The README's two commands: `make demo` (`python -m mamlext demo`: info, then the main job, sinusoid MAML training
# and evaluation) and `make test` (the whole test suite).
# Each installs the requirements and builds the extension first, and is safe to re-run: the build is redone
# only when a source, the requirements or the build configuration changed.
#   make test TORCH=torch==2.14.1    pin torch (CI does)
#   FORCE_CUDA=1 / USE_CUDA=0 / TORCH_CUDA_ARCH_LIST=... / DEBUG=1 / MAMLEXT_STRICT_PTXAS=1 make ...   see setup.py
PYTHON ?= python3
TORCH ?=
PIP := $(PYTHON) -m pip install --disable-pip-version-check

BUILD_CONFIG := $(PYTHON) $(TORCH) $(FORCE_CUDA) $(USE_CUDA) $(TORCH_CUDA_ARCH_LIST) $(DEBUG) $(MAMLEXT_STRICT_PTXAS)
STAMP := build/.installed-$(shell echo '$(BUILD_CONFIG)' | md5sum | cut -c1-12)
ifeq ($(wildcard mamlext/_C*.so),)
STAMP_FORCE := FORCE
endif

.PHONY: demo test install clean FORCE

demo: install
	$(PYTHON) -m mamlext demo

test: install
	MAMLEXT_REQUIRE_EXT=1 $(PYTHON) -m pytest tests -q

install: $(STAMP)

$(STAMP): setup.py requirements.txt $(shell find csrc -type f) $(STAMP_FORCE)
	$(PIP) $(TORCH) -r requirements.txt
	$(PIP) --no-build-isolation --no-deps -e .
	@rm -f build/.installed-* && mkdir -p build && touch $@

clean:
	rm -rf build mamlext/_C*.so *.egg-info
