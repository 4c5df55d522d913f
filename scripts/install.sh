#!/usr/bin/env bash
# Install TwinRT into ./.venv on a fresh Linux machine (Python >= 3.10 with venv).
# Order matters: torch==2.13.0 (CPU wheel) first, so that nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[slicer,test,ai]"
# dciodvfy (dicom3tools) validates the DICOM files we write.
if ! command -v dciodvfy >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq dicom3tools) >/dev/null 2>&1 || echo "warning: could not install dicom3tools"
    elif command -v sudo >/dev/null 2>&1; then
        (sudo apt-get update -qq && sudo apt-get install -y -qq dicom3tools) >/dev/null 2>&1 || echo "warning: could not install dicom3tools"
    else
        echo "warning: dciodvfy not found; install Debian/Ubuntu package dicom3tools to validate DICOM output"
    fi
fi
echo "TwinRT installed in $(pwd)/.venv"
