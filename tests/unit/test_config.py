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


def test_literal_choices_match_the_registries() -> None:
    """The Literal types are the choices; they must name exactly what the engine implements."""
    import typing

    from dgrepair.engine import config
    from dgrepair.engine.plan.layouts import FUSED_LAYOUTS
    from dgrepair.engine.plan.scope import MASK_PRESETS
    from dgrepair.kernels.methods import METHODS
    from dgrepair.kernels.spectral import BACKENDS

    assert typing.get_args(config.MethodName) == tuple(METHODS)
    assert typing.get_args(config.Kernel) == tuple(BACKENDS)
    assert typing.get_args(config.MaskPreset) == tuple(MASK_PRESETS)
    assert typing.get_args(config.FusedLayout) == ("auto", *FUSED_LAYOUTS)


def test_sections_and_flat_keys_give_the_same_config() -> None:
    flat = RepairConfig.from_mapping({"method": "ties", "keep-ratio": 0.4, "mask": "mlp_only", "workers": 3,
                                      "out": "o"}, "flat")
    grouped = RepairConfig.from_mapping({"method": {"name": "ties", "keep_ratio": 0.4}, "scope": {"mask": "mlp_only"},
                                         "cluster": {"workers": 3}, "output": {"out": "o"}}, "grouped")
    assert flat == grouped
    assert flat.method.spec.keep_ratio == 0.4 and flat.scope.mask == "mlp_only" and flat.cluster.workers == 3


def test_a_key_in_the_wrong_section_names_its_section() -> None:
    with pytest.raises(InputError, match="scope.workers is not an option of section 'scope'; it belongs to 'cluster'"):
        RepairConfig.from_mapping({"scope": {"workers": 2}}, "c.yaml")


@pytest.mark.parametrize("options,needle", [({"kernel": "fast"}, "kernel must be one of auto, exact"),
                                            ({"threads": -1}, "threads must be >= 0"),
                                            ({"method": "ties", "keep_ratio": 2}, "keep_ratio must be in \\[0, 1\\]"),
                                            ({"scale": 0}, "scale must be > 0"),
                                            ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N")])
def test_each_field_has_one_clear_check(options, needle) -> None:
    with pytest.raises(InputError, match=needle):
        RepairConfig.from_mapping(options, "test")


def test_method_parameters_live_in_the_method() -> None:
    cfg = RepairConfig.of(method="dare", drop_prob=0.3, seed=5)
    assert cfg.method.spec.params() == {"drop_prob": 0.3, "dare_rescale": True, "seed": 5}
    assert "scale" not in cfg.to_dict()  # another method's parameter is not part of this run
