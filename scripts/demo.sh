#!/usr/bin/env bash
# Install TwinRT and run the All-in-One pipeline on the bundled sample patient.
# Output: twinrt-output/ (dicom/, scene.mrb, report.html, summary.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/twinrt demo --out "${1:-twinrt-output}"
