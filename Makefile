# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help deps venv kernel lint typecheck unit postgres test demo demo-clean clean

help:
	@echo "make demo   install what is missing, deploy fleet-example with reconciler apply, show it"
	@echo "make demo-clean   stop the demo's VMs"
	@echo "make test   lint, type-check and run the whole test suite (what CI runs)"

deps:
	@missing=$$(for p in $$(grep -v '^#' deploy/apt-packages.txt); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/reconciler: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,build]'
	@touch $@

venv: $(BIN)/reconciler

# Debian's cloud kernel (the fallback, and what `deploy.kernel` may still name) and the
# specialised kernels built from linux-source-6.1, one per profile; a build is cached per machine
# ($$RECONCILER_KERNEL_CACHE, default /var/cache/reconciler/kernels), so a second run is instant.
kernel: deps venv
	@if ! $(BIN)/reconciler kernel ls 2>/dev/null | grep -q debian-; then \
		$(BIN)/reconciler kernel import "$$(bash deploy/fetch-debian-kernel.sh .demo/kernels)"; fi
	$(BIN)/reconciler kernel build
	@$(BIN)/reconciler kernel ls

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: lint

unit: venv
	$(BIN)/pytest -n 2 -m "not qemu and not root and not postgres and not slow"

# A local PostgreSQL cluster for the postgres-marked tests (idempotent; no systemd needed).
postgres:
	bash deploy/start-postgres.sh

test: venv lint postgres
	$(BIN)/pytest

demo: deps venv
	bash deploy/demo.sh

demo-clean: venv
	bash deploy/demo-clean.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .demo guest/build
