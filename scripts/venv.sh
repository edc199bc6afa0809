# Sourced by demo.sh and test.sh: create ./.venv on first use and install adamw_lm (editable) with
# the extras given, e.g. `source scripts/venv.sh test,plot`; installs again only when pyproject.toml
# or the extras change. Leaves the venv first on PATH and the repository root as working folder.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.adamw_lm-installed-${extras//,/-}-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
