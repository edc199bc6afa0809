# Sourced by demo.sh and test.sh: create ./.venv on first use and install adamw_lm (editable) with
# the extras given, e.g. `source scripts/venv.sh test,plot`; installs again only when pyproject.toml
# or the extras change. Leaves the venv first on PATH and the repository root as working folder.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-}"
case "$extras" in
    *[!a-z,]*) echo "venv.sh: extras are names such as test,plot; got '$extras'" >&2; return 2 2>/dev/null || exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.adamw_lm-installed-${extras//,/-}-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    # The stamp only once both installs succeeded, whether or not the sourcing script stops on
    # errors (set -e); a failed install stops it either way.
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
            && .venv/bin/python -m pip install --quiet -e ".[$extras]"; }; then
        echo "venv.sh: installing adamw_lm[$extras] into ./.venv failed" >&2
        return 1 2>/dev/null || exit 1
    fi
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
