"""``loco config [SECTION]``: every config key with its type, default and one-line help.

Generated from the dataclasses in :mod:`loco.config` (each field's ``metadata["help"]``),
so the list cannot drift from what ``load_config`` accepts. ``--yaml`` prints the defaults
as a commented YAML file to start a config from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing

import yaml

from loco.config import Config
from loco.errors import LocoError


def _type_name(tp: object) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return text.replace("typing.", "").replace("builtins.", "")


def config_rows(section: str | None = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every key, or of one section's keys."""
    cfg = Config()
    sections = [f.name for f in dataclasses.fields(cfg)]
    if section is not None and section not in sections:
        close = difflib.get_close_matches(section, sections, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LocoError(f"no config section '{section}'{hint} (sections: {', '.join(sections)})")
    rows: list[tuple[str, str, str, str]] = []
    for name in sections if section is None else [section]:
        _add_rows(rows, name, getattr(cfg, name))
    return rows


def _add_rows(rows: list[tuple[str, str, str, str]], prefix: str, sub: object) -> None:
    """Rows of the dataclass ``sub`` under ``prefix``, into nested sections (objective.byol)."""
    hints = typing.get_type_hints(type(sub))
    for f in dataclasses.fields(sub):  # type: ignore[arg-type]
        value = getattr(sub, f.name)
        if dataclasses.is_dataclass(value):
            _add_rows(rows, f"{prefix}.{f.name}", value)
            continue
        default = yaml.safe_dump(value, default_flow_style=True).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        rows.append(
            (f"{prefix}.{f.name}", _type_name(hints[f.name]), default, f.metadata.get("help", ""))
        )


def as_yaml(section: str | None = None) -> str:
    """The defaults as YAML, each key preceded by its help as a comment."""
    lines: list[str] = []
    current: list[str] = []
    for key, _tp, default, help_text in config_rows(section):
        *path, name = key.split(".")
        same = 0  # sections shared with the previous key
        while same < min(len(path), len(current)) and path[same] == current[same]:
            same += 1
        for depth in range(same, len(path)):
            blank = "\n" if depth == 0 and lines else ""
            lines.append(f"{blank}{'  ' * depth}{path[depth]}:")
        current = path
        indent = "  " * len(path)
        if help_text:
            lines.append(f"{indent}# {help_text}")
        lines.append(f"{indent}{name}: {default}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "section",
        nargs="?",
        help="one section: data, model, decoder, method, objective, optim, train, monitor",
    )
    parser.add_argument(
        "--yaml", action="store_true", help="print the defaults as a commented YAML config"
    )


def run(args: argparse.Namespace) -> int:
    if args.yaml:
        print(as_yaml(args.section), end="")
        return 0
    rows = config_rows(args.section)
    width = max(len(k) for k, *_ in rows)
    type_width = max(len(t) for _, t, *_ in rows)
    for key, tp, default, help_text in rows:
        print(f"{key:<{width}}  {tp:<{type_width}}  = {default}")
        if help_text:
            print(f"{'':<{width}}  {help_text}")
    print("\nset any key in a YAML file (loco pretrain -c FILE) or as KEY=VALUE after the command")
    return 0
