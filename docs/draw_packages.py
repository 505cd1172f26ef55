"""Draw search's packages and what imports what, from the code, as a Mermaid graph in
docs/architecture.md (between its ``packages:begin`` and ``packages:end`` markers).

The graph is grimp's (the import-linter library): every import of a module of ``search``,
function-local ones included, collapsed to the stage it lives in (``search/spec/``, ...) or to the
top-level module (``search.api``, ``search.keys``, ...), with ``flexunet`` as one box.

    python docs/draw_packages.py          # rewrite the picture
    python docs/draw_packages.py --check  # exit 1 if the checked-in picture is stale (CI)

>>> _unit("search.trial.cv"), _unit("search.keys"), _unit("flexunet.data.io"), _unit("search")
('search.trial', 'search.keys', 'flexunet', None)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- packages:begin (docs/draw_packages.py writes this) -->", "<!-- packages:end -->"
STAGES = ("spec", "store", "trial", "runtime", "results")


def _unit(module: str) -> str | None:
    """The box a module is drawn in: its stage, its top-level module, or flexunet (None: the
    ``search`` package itself, whose ``__init__`` only re-exports the API)."""
    parts = module.split(".")
    if parts[0] == "flexunet":
        return "flexunet"
    if len(parts) == 1:
        return None
    return ".".join(parts[:2])


def edges() -> set[tuple[str, str]]:
    """(importer, imported) between boxes, from grimp's graph of search and flexunet."""
    import grimp

    sys.path.insert(0, str(ROOT))  # the checkout's packages, whatever is installed
    graph = grimp.build_graph("search", "flexunet", cache_dir=None)
    found = set()
    for module in graph.modules:
        if not module.startswith("search"):
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = _unit(module), _unit(imported)
            if a and b and a != b:
                found.add((a, b))
    return found


def mermaid(found: set[tuple[str, str]]) -> str:
    """The graph as a Mermaid flowchart, top to bottom, in a stable order."""
    boxes = sorted({box for pair in found for box in pair})
    names = {box: box.replace(".", "_") for box in boxes}
    lines = ["```mermaid", "flowchart TD"]
    for box in boxes:
        label = box.removeprefix("search.")
        if box.split(".")[-1] in STAGES:
            label += "/"
        lines.append(f'    {names[box]}["{label}"]')
    for a, b in sorted(found):
        lines.append(f"    {names[a]} --> {names[b]}")
    lines.append("```")
    return "\n".join(lines)


def render(text: str, picture: str) -> str:
    """``text`` with the block between the markers replaced by ``picture``."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n{picture}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/architecture.md's picture is stale")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    wanted = render(text, mermaid(edges()))
    if args.check:
        if wanted != text:
            print(f"{DOC}: the package picture is stale; run python docs/draw_packages.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
