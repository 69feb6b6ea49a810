"""The docs name the tests that show each guarantee (docs/reliability.md and others): every name must exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"\b(test_\w+\.py)::(\w+)")


def test_every_test_the_docs_name_exists():
    files: dict[str, list[Path]] = {}
    for path in (REPO / "tests").rglob("test_*.py"):
        files.setdefault(path.name, []).append(path)
    docs = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
    named, missing = 0, []
    for doc in docs:
        for file, name in sorted(set(REFERENCE.findall(doc.read_text(encoding="utf-8")))):
            named += 1
            defined = re.compile(rf"^\s*(?:async\s+)?def {re.escape(name)}\(", re.M)
            if not any(defined.search(p.read_text(encoding="utf-8")) for p in files.get(file, [])):
                missing.append(f"{doc.relative_to(REPO)}: {file}::{name}")
    assert named > 20, "the docs name their tests as file::name; none found"
    assert not missing, "the docs name tests that do not exist:\n" + "\n".join(missing)
