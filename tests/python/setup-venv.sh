#!/usr/bin/env bash
# Creates (once) the virtualenv the Python tests run in: the published syft-accounting-sdk 0.1.1
# (SDK compatibility) and standardwebhooks 1.1.0 (an independent check of webhook signatures),
# both from PyPI, unchanged. Usage: setup-venv.sh DIR
set -euo pipefail
dir="${1:?usage: setup-venv.sh DIR}"
if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import syft_accounting_sdk, standardwebhooks' 2>/dev/null; then
  exit 0
fi
[ -x "$dir/bin/python" ] || python3 -m venv "$dir"
"$dir/bin/pip" install --quiet --disable-pip-version-check 'syft-accounting-sdk==0.1.1' 'standardwebhooks==1.1.0'
