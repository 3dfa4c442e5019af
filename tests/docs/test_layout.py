"""docs/architecture.md's map of the packages names every module there is, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "operator/dpojob_api": "operator/dpojob_api/",
    "operator/dpo_operator": "operator/dpo_operator/",
    "trainer_image/dpo_trainer": "trainer_image/dpo_trainer/",
    "operator/dpo_dev": "operator/dpo_dev/",
}


def package_map() -> dict[str, str]:
    """Each package's part of the map: from its heading line to the next package's."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index("## The packages") : text.index("Dependencies point one way")]
    heads = {package: block.index(head) for package, head in PACKAGES.items()}
    ends = sorted([*heads.values(), block.index("charts/dpo-operator/")])
    return {package: block[start : ends[ends.index(start) + 1]] for package, start in heads.items()}


def modules(package: str) -> set[str]:
    """Its modules (`x.py`) and subpackages (`x/`), __init__ and __main__ aside."""
    directory = ROOT / package
    found = {p.name for p in directory.glob("*.py") if p.stem not in ("__init__", "__main__")}
    return found | {f"{p.name}/" for p in directory.iterdir() if (p / "__init__.py").exists()}


def test_the_map_names_every_module_of_every_package() -> None:
    sections = package_map()
    missing = {
        package: sorted(name for name in modules(package) if not re.search(rf"(?<![\w/]){re.escape(name)}", text))
        for package, text in sections.items()
    }
    assert not any(missing.values()), f"docs/architecture.md, ## The packages: add {missing}"


def test_the_map_names_no_module_that_is_gone() -> None:
    for package, text in package_map().items():
        named = set(re.findall(r"(?<![\w/.])(\w+\.py|\w+/)(?=[\s,;)])", text)) - {f"{package.split('/')[-1]}/"}
        gone = sorted(name for name in named if name.endswith(".py") and name not in modules(package))
        assert not gone, f"{package}: {gone}"
