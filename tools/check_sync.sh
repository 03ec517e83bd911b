#!/usr/bin/env bash
# Fails if `nbdev_export` or `nbdev_clean` would change anything: run both in a scratch copy and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp -r settings.ini setup.py nbs heptapod_nb "$tmp"/
[ -d tutorials ] && cp -r tutorials "$tmp"/
[ -f README.md ] && cp README.md "$tmp"/
[ -f pyproject.toml ] && cp pyproject.toml "$tmp"/
(cd "$tmp" && "$OLDPWD/$BIN/nbdev_export" >/dev/null && "$OLDPWD/$BIN/nbdev_clean" >/dev/null \
   && { [ ! -d tutorials ] || "$OLDPWD/$BIN/nbdev_clean" --fname tutorials >/dev/null; })
fail=0
if ! diff -rq -x __pycache__ heptapod_nb "$tmp/heptapod_nb"; then
  echo "ERROR: heptapod_nb/ is out of sync with nbs/: run 'make export' (nbdev_export) and commit notebooks and modules together."
  fail=1
fi
for d in nbs tutorials; do
  [ -d "$d" ] || continue
  if ! diff -rq -x .ipynb_checkpoints "$d" "$tmp/$d"; then
    echo "ERROR: notebooks in $d/ are not clean: run 'make export' (nbdev_clean) before committing."
    fail=1
  fi
done
"$BIN/python" tools/make_readme.py --check || fail=1
[ $fail = 0 ] && echo "check-sync: notebooks clean, modules exported."
exit $fail
