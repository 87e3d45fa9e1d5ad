#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: Debian's
# Fashion-MNIST (the default data), the pinned Python packages, and this
# package (editable, with its console scripts). Safe to run again.
#
#   bash setup.sh                 current stack: TensorFlow 2.21 + Keras 3 on python3 (3.10+)
#   bash setup.sh --stack tf265   Ascend stack: TensorFlow 2.6.5 + Keras 2.6 in .venv-tf265
#                                 (Python 3.9: python3.9, else pyenv's 3.9.18)
#   bash setup.sh --stack all     both
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

STACK=current
while [ $# -gt 0 ]; do
  case "$1" in
    --stack) STACK="${2:-}"; shift 2 ;;
    --stack=*) STACK="${1#--stack=}"; shift ;;
    *) echo "setup.sh: unknown argument '$1'; expected --stack current|tf265|all" >&2; exit 2 ;;
  esac
done
case "$STACK" in
  current|tf265|all) ;;
  *) echo "setup.sh: --stack '$STACK'; expected current, tf265 or all" >&2; exit 2 ;;
esac

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ "$STACK" != tf265 ]; then
  python3 -m pip install -q -r requirements.txt
  python3 -m pip install -q --no-deps --no-build-isolation -e .
fi

if [ "$STACK" != current ]; then
  PY39=""
  if command -v python3.9 >/dev/null 2>&1 && python3.9 -c 'import sys; assert sys.version_info[:2] == (3, 9)' 2>/dev/null; then
    PY39="python3.9"
  elif command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.9.18 pyenv exec python3.9 -V >/dev/null 2>&1; then
    PY39="env PYENV_VERSION=3.9.18 pyenv exec python3.9"
  else
    echo "setup.sh: --stack $STACK needs Python 3.9 (python3.9 on PATH, or pyenv's 3.9.18)" >&2
    exit 1
  fi
  # A venv left half-made (no pip, another Python) is made again.
  if ! .venv-tf265/bin/python -c 'import sys, pip; assert sys.version_info[:2] == (3, 9)' 2>/dev/null; then
    rm -rf .venv-tf265
    $PY39 -m venv .venv-tf265
  fi
  .venv-tf265/bin/python -m pip install -q --upgrade "pip<24" "setuptools<70" wheel
  .venv-tf265/bin/python -m pip install -q -r requirements-tf265.txt
  .venv-tf265/bin/python -m pip install -q --no-deps --no-build-isolation -e .
fi
