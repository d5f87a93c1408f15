"""Every fixture pair's output bytes equal the digests recorded in tests/data/output_digests.json.

This is the proof that a restructuring changes no output byte. When a change of output is intended,
re-record with `python tests/tools/output_digests.py` and say which cases changed and why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import output_digests  # noqa: E402

VARIANTS = output_digests.variants()  # one per BLAS kernel family (see the tool's docstring)


def test_every_case_is_recorded() -> None:
    for family, record in VARIANTS.items():
        assert sorted(record) == sorted(output_digests.CASES), family


@pytest.mark.parametrize("case", sorted(output_digests.CASES))
def test_output_bytes_unchanged(tmp_path: Path, case: str) -> None:
    got = output_digests.run_case(case, tmp_path)
    if any(record[case] == got for record in VARIANTS.values()):
        return
    family = output_digests.kernel_family()
    nearest = VARIANTS.get(family) or next(iter(VARIANTS.values()))
    want = nearest[case]
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise AssertionError(f"{case}: output differs from every recorded variant ({sorted(VARIANTS)}); against "
                         f"{family if family in VARIANTS else 'the first'} in {changed}. This machine's BLAS "
                         f"kernels: {family}")
