"""The documentation's relative links resolve inside the repository, and nothing cites files outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(#[^)]*)?\)")
# Files a user who clones the repository does not have: the project's private notes and the paper.
OUTSIDE = re.compile(r"\.\./shared|\bSPEC\.md\b|\bDESIGN\.md\b|\bresearch/[a-z]+\.md\b|\bSPEC §")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split() if (ROOT / p).is_file()]


def _docs() -> list[Path]:
    return _tracked("*.md")


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target, _anchor in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path = (doc.parent / target).resolve()
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links that do not resolve inside the repository: {broken}"


def test_nothing_cites_files_outside_the_repository() -> None:
    here = Path(__file__).resolve()
    hits = []
    for path in _tracked("*.py", "*.md", "*.toml", "*.yaml", "*.sh", "*.txt"):
        if path == here:
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
