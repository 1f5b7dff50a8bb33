# The README's two commands: `make demo` (the main job) and `make test`.
# Both install what they need first (uv, an optimised BLAS on Linux, the locked deps).
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: setup demo test lint protos check bench buf-lint

setup:
	@bash scripts/setup.sh

demo: setup
	uv run mlxu demo

test: setup
	uv run pytest

lint:
	uv run ruff check . && uv run ruff format --check .

protos:
	uv run python scripts/gen_protos.py

check: lint
	uv run python scripts/gen_protos.py --check

buf-lint:  # the contracts against buf's STANDARD rules (npm package @bufbuild/buf)
	cd protos && npx --yes @bufbuild/buf lint
