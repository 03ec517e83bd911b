"""README.md is made from nbs/index.ipynb (nbdev's readme_nb) without Quarto: markdown cells as they are, code
cells as fenced Python. `python tools/make_readme.py --check` fails if README.md is stale."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
nb = json.loads((root / "nbs" / "index.ipynb").read_text())
parts = []
for c in nb["cells"]:
    src = "".join(c["source"]).strip()
    if not src or src.startswith("#| hide"): continue
    parts.append(src if c["cell_type"] == "markdown" else f"```python\n{src}\n```")
text = "<!-- made from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n" + "\n\n".join(parts) + "\n"
readme = root / "README.md"
if "--check" in sys.argv:
    if not readme.exists() or readme.read_text() != text:
        print("ERROR: README.md is stale: edit nbs/index.ipynb and run 'python tools/make_readme.py'"); sys.exit(1)
else:
    readme.write_text(text)
