#!/usr/bin/env bash
# Round-trip a notebook through a jupytext percent script for editing.
#   tools/nb.sh edit nbs/03_x.ipynb   -> writes nbsrc/03_x.py (from the notebook)
#   tools/nb.sh build nbsrc/03_x.py   -> writes nbs/03_x.ipynb (or tutorials/ if the script says so), cleaned
# nbsrc/ is a scratch folder (git-ignored); the notebooks are the source of truth.
set -euo pipefail
cd "$(dirname "$0")/.."
J=.venv/bin/jupytext
case "$1" in
  edit)  mkdir -p nbsrc; $J --quiet --to py:percent "$2" -o "nbsrc/$(basename "${2%.ipynb}").py" ;;
  build) dest="${3:-nbs}"; out="$dest/$(basename "${2%.py}").ipynb"
         $J --quiet --update --to ipynb "$2" -o "$out" 2>/dev/null || $J --quiet --to ipynb "$2" -o "$out"
         .venv/bin/nbdev_clean --fname "$out" ;;
  *) echo "usage: tools/nb.sh edit NB.ipynb | build SCRIPT.py [DEST_DIR]"; exit 2 ;;
esac
