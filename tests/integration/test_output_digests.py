"""Every fixture pair's output bytes equal the digests recorded in tests/data/output_digests.json.

This is the proof that a restructuring changes no output byte. When a change of output is intended,
re-record with `python tests/tools/output_digests.py` and say which cases changed and why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import output_digests  # noqa: E402

RECORDED = json.loads(output_digests.RECORD.read_text())


def test_every_case_is_recorded() -> None:
    assert sorted(RECORDED) == sorted(output_digests.CASES)


@pytest.mark.parametrize("case", sorted(output_digests.CASES))
def test_output_bytes_unchanged(tmp_path: Path, case: str) -> None:
    got = output_digests.run_case(case, tmp_path)
    want = RECORDED[case]
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not changed, f"{case}: output differs from the recorded digests in {changed}"
