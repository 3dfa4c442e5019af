"""Generate the values table of docs/install.md from the chart's values.schema.json (descriptions, types) and
values.yaml (defaults): one row per leaf value, in schema order.

`python -m dpo_dev.values_table` prints the table; `python -m dpo_dev.values_table --write` replaces it in
docs/install.md between the markers. A test fails when the committed table differs from the generated one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dpo-operator"
INSTALL_DOC = ROOT / "docs" / "install.md"
START, END = "<!-- values-table:start -->\n", "<!-- values-table:end -->"
HEADER = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]


def rows(node: dict[str, Any], defaults: Any, prefix: str = "") -> list[str]:
    """One Markdown row per leaf value (objects with declared properties are walked, not listed)."""
    found = []
    for name, sub in node["properties"].items():
        path = f"{prefix}{name}"
        default = defaults.get(name, ...) if isinstance(defaults, dict) else ...
        if "properties" in sub and sub.get("type") == "object":
            found += rows(sub, default, f"{path}.")
            continue
        kind = sub.get("type", "any")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        shown = "—" if default is ... else f"`{json.dumps(default, ensure_ascii=False)}`"
        description = " ".join(sub["description"].split()).replace("|", r"\|")
        found.append(f"| `{path}` | {kind} | {shown} | {description} |")
    return found


def values_table(chart: Path = CHART) -> str:
    """The Markdown table, ending in a newline."""
    schema = json.loads((chart / "values.schema.json").read_text())
    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    return "\n".join(HEADER + rows(schema, defaults)) + "\n"


def documented_table(doc: Path = INSTALL_DOC) -> str:
    """The table as committed in docs/install.md, between the markers."""
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc}: no {START.strip()} … {END} markers")
    return text.split(START, 1)[1].split(END, 1)[0]


def write(doc: Path = INSTALL_DOC, chart: Path = CHART) -> bool:
    """Replace the table in the doc; True when it changed."""
    text = doc.read_text()
    current = documented_table(doc)
    table = values_table(chart)
    if current == table:
        return False
    head, rest = text.split(START, 1)
    doc.write_text(head + START + table + rest[rest.index(END) :])
    return True


def main(arguments: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if arguments is None else arguments
    if "--write" in arguments:
        changed = write()
        print(f"{INSTALL_DOC.relative_to(ROOT)}: {'updated' if changed else 'already current'}")
    else:
        sys.stdout.write(values_table())


if __name__ == "__main__":
    main()
