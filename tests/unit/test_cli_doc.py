"""docs/cli.md reproduces every command's `--help` exactly (regenerate with tests/tools/update_cli_doc.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import update_cli_doc  # noqa: E402


def test_cli_doc_matches_help() -> None:
    doc = update_cli_doc.DOC.read_text()
    assert update_cli_doc.rendered(doc) == doc, (
        "docs/cli.md is out of date with the CLI's --help: run python tests/tools/update_cli_doc.py")


def test_every_command_documented() -> None:
    doc = update_cli_doc.DOC.read_text()
    for command in update_cli_doc.COMMANDS:
        assert f"`dgrepair {command} --help`" in doc
        assert "usage: dgrepair " + command in update_cli_doc.help_text(command)
