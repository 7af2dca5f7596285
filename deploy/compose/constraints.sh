#!/usr/bin/env bash
# Write constraints.txt from the CI virtualenv: the versions CI tests are the versions the image installs.
#   deploy/compose/constraints.sh [VENV]     (default .venv, made by `make install`)
# Left out: kvwire itself (editable), and local version labels (torch 2.13.0+cpu pins as torch==2.13.0,
# which the CPU wheel and the PyTorch CPU index both satisfy).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv}
{
    echo "# The versions CI tests (pip freeze of the CI venv, by deploy/compose/constraints.sh); make install and"
    echo "# deploy/Dockerfile install with -c constraints.txt. Regenerate after changing a dependency."
    "$venv/bin/pip" freeze --exclude-editable --exclude docker-compose | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[A-Za-z0-9.]+$/\1/' | grep -E '^[A-Za-z0-9_.-]+==' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
