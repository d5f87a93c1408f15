"""Regenerate the `--help` section of docs/cli.md from the CLI itself.

The section between the `cli-help` markers is exactly what `dgrepair COMMAND --help` prints at a
fixed width, so the reference cannot drift from the code: tests/test_cli_doc.py fails when it does,
and running this script (`python tests/tools/update_cli_doc.py`) rewrites the section.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
BEGIN, END = "<!-- cli-help:begin -->", "<!-- cli-help:end -->"
COMMANDS = ("repair", "plan", "demo", "score", "report")
WIDTH = "100"


def help_text(command: str) -> str:
    """What `dgrepair COMMAND --help` prints at WIDTH columns."""
    from dgrepair.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            build_parser().parse_args([command, "--help"])
        return buf.getvalue()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def section() -> str:
    parts = [BEGIN]
    for command in COMMANDS:
        parts += ["", f"### `dgrepair {command} --help`", "", "```text", help_text(command).rstrip("\n"), "```"]
    return "\n".join(parts + ["", END])


def rendered(doc: str) -> str:
    """docs/cli.md with its help section replaced by the current one."""
    head, sep, rest = doc.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"{DOC}: the {BEGIN} / {END} markers are missing")
    return head + section() + rest.partition(END)[2]


def main() -> int:
    DOC.write_text(rendered(DOC.read_text()))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
