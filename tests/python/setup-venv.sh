#!/usr/bin/env bash
# Creates (once) the virtualenv the Python SDK compatibility test runs in: the published
# syft-accounting-sdk 0.1.1 from PyPI, unchanged. Usage: setup-venv.sh DIR
set -euo pipefail
dir="${1:?usage: setup-venv.sh DIR}"
if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import syft_accounting_sdk' 2>/dev/null; then
  exit 0
fi
python3 -m venv "$dir"
"$dir/bin/pip" install --quiet --disable-pip-version-check 'syft-accounting-sdk==0.1.1'
