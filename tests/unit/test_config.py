"""The configuration: flat keys (CLI flags, YAML) keep working, and the options that make the plan id
hash to the same dict as before the configuration was split into sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgrepair.engine.config import RepairConfig
from dgrepair.engine.errors import InputError

RECORDED = json.loads((Path(__file__).parents[1] / "data" / "output_affecting.json").read_text())
CASES = RECORDED.pop("_cases")


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_id_inputs_are_unchanged(case: str) -> None:
    """Recorded from the flat RepairConfig: a changed dict would change every plan id (and refuse resumes)."""
    cfg = RepairConfig.from_mapping(CASES[case], "test")
    assert json.dumps(cfg.output_affecting(), sort_keys=True) == json.dumps(RECORDED[case], sort_keys=True)


def test_unknown_key_is_refused_with_the_known_ones() -> None:
    with pytest.raises(InputError, match="unknown option 'no_such_option'"):
        RepairConfig.from_mapping({"no_such_option": 1}, "test.yaml")
