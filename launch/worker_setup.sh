#!/usr/bin/env bash
# A pinned install of the shipped tree, on a TPU VM worker or in launch/Dockerfile: Python 3.11
# (uv fetches it where the image has an older one) and every package at constraints.txt's version.
#
#   bash launch/worker_setup.sh     # from anywhere; installs into <tree>/.venv
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --user uv
uv=$(python3 -m site --user-base)/bin/uv
"$uv" venv -q --python 3.11 .venv
"$uv" pip install -q --python .venv/bin/python -c constraints.txt '.[tpu]'
.venv/bin/codemix --help > /dev/null
