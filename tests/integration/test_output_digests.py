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
PORTABLE = output_digests.portable_cases(VARIANTS)  # the cases whose bytes no kernel family changes


def test_every_case_is_recorded() -> None:
    assert all(set(record) <= set(output_digests.CASES) for record in VARIANTS.values())
    assert any(sorted(record) == sorted(output_digests.CASES) for record in VARIANTS.values())


@pytest.mark.parametrize("case", sorted(output_digests.CASES))
def test_output_bytes_unchanged(tmp_path: Path, case: str) -> None:
    """This machine's kernel family's digests when recorded; else those every recorded family agrees on
    (the float64 and integer paths); a float32 case of a family never recorded is skipped, saying how to
    record it."""
    family = output_digests.kernel_family()
    want = VARIANTS.get(family, {}).get(case) or PORTABLE.get(case)
    if want is None:
        pytest.skip(f"{case}: no digests recorded for this machine's BLAS kernels ({family}; recorded: "
                    f"{sorted(VARIANTS)}); its float32 bytes depend on them. Record them with "
                    f"`python tests/tools/output_digests.py --add` on this machine")
    got = output_digests.run_case(case, tmp_path)
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    source = family if case in VARIANTS.get(family, {}) else "every recorded family"
    assert not changed, f"{case}: output differs from {source}'s digests in {changed} (this machine: {family})"
