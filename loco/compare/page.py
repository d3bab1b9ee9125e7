"""docs/results.md as a page of sections: a fixed header, then each section's block
between ``<!-- section: NAME -->`` markers, in the order of :data:`ORDER`.

Writing one section replaces its block only, so the other sections' text stays byte for
byte; a section never run shows one line naming the command that produces it. The page is
rewritten atomically under a file lock (two sections may finish at the same time).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loco.compare.sections import ORDER, SECTIONS
from loco.filelock import locked

HEADER = Path(__file__).with_name("header.md")
_BLOCK = re.compile(r"<!-- section: (\w+) -->\n(.*?)<!-- /section: \1 -->\n", re.S)


def placeholder(name: str) -> str:
    s = SECTIONS[name]
    return f"## {s.title}\n\nNot run yet: `{s.command}` produces this section.\n"


def blocks(text: str) -> dict[str, str]:
    """The sections' blocks of a page (a page without markers has none)."""
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(text)}


def assemble(found: dict[str, str]) -> str:
    parts = [HEADER.read_text()]
    for name in ORDER:
        body = found.get(name) or placeholder(name)
        parts.append(f"<!-- section: {name} -->\n{body.rstrip()}\n<!-- /section: {name} -->\n")
    return "\n".join(parts)


def write_section(path: Path, name: str, block: str) -> None:
    """Put ``block`` in place of section ``name``'s in the page at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(f".{path.name}.lock")):
        found = blocks(path.read_text()) if path.is_file() else {}
        found[name] = block
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(assemble(found))
        os.replace(tmp, path)
