"""`dgrepair repair --help`: grouped by concern, required options marked, whole help texts, Hub ids
named, and no pointless negations; the hidden opposite spellings still override a --config file."""

from __future__ import annotations

import re

import yaml

from dgrepair.cli import OPTION_GROUPS, build_parser, config_from_args
from dgrepair.engine.config import flag_specs


def repair_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["repair"].format_help()


def test_every_config_field_is_in_exactly_one_group():
    grouped = [n for names in OPTION_GROUPS.values() for n in names if n != "config"]
    assert sorted(grouped) == sorted(s.name for s in flag_specs())
    assert len(grouped) == len(set(grouped))


def test_help_is_grouped_in_order_and_marks_required_options():
    text = repair_help()
    heads = [m.group(1) for m in re.finditer(r"^(\w+):$", text, re.M)]
    assert heads == ["options", "inputs", "method", "scope", "formats", "execution", "cluster", "output"]
    flat = " ".join(text.split())
    for flag in ("--base DIR|ORG/NAME|URI", "--ft DIR|ORG/NAME|URI", "--out DIR|URI"):
        assert f"{flag} REQUIRED (here or in --config)" in flat
    assert "Hugging Face Hub repo id org/name[@revision]" in flat
    assert "out_in_interleaved [E,2I,H] gate = even rows (default: auto)" in flat  # the whole text
    assert "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in flat


def test_help_shows_no_pointless_negations():
    text = repair_help()
    for hidden in ("--no-in-process", "--no-force", "--progress ", "--dare-rescale ", "--no-emit"):
        assert hidden not in text
    for shown in ("--in-process", "--force", "--no-progress", "--no-dare-rescale"):
        assert shown in text


def test_hidden_opposites_override_a_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"base": "b", "ft": "f", "out": "o", "progress": False, "force": True}))
    args = build_parser().parse_args(["repair", "--config", str(config), "--progress", "--no-force"])
    cfg = config_from_args(args)
    assert cfg.execution.progress is True and cfg.output.force is False
    args = build_parser().parse_args(["repair", "--config", str(config)])
    cfg = config_from_args(args)
    assert cfg.execution.progress is False and cfg.output.force is True
