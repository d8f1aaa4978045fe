#!/usr/bin/env bash
# Refresh constraints/cpu.txt to the newest releases that pyproject.toml allows, then run the suite on
# exactly that set (bash .ci/run installs with it). Run from anywhere: bash constraints/refresh.sh
# Afterwards: update "Tested versions" in README.md (the date and the main versions), commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
venv="$(mktemp -d)/venv"
python -m venv "$venv"
# The CPU build of torch these machines get (the same line as .ci/run); everything else newest.
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e ".[dev]"
"$venv/bin/python" -m pip check
{
  echo "# The dependency set the suite passed on (bash .ci/run installs with it; README \"Tested versions\")."
  echo "# Made by: bash constraints/refresh.sh on $(date -u +%Y-%m-%d), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m)."
  # torch without its local label (+cpu): a CUDA build of the same version satisfies the pin.
  "$venv/bin/python" -m pip freeze --exclude-editable --all | grep -v -i -E '^(pip|setuptools|wheel)==' \
    | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'
} > constraints/cpu.txt.new
mv constraints/cpu.txt.new constraints/cpu.txt
echo "constraints/cpu.txt: $(grep -c '==' constraints/cpu.txt) pins; running the suite on them"
CI_VENV="$(mktemp -d)/venv" bash .ci/run "$@"
