#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole offline test suite on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports  # the layering contract in pyproject.toml: each wing imports only the layers below it
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
