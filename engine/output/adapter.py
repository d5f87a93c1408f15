"""--emit-adapter: Δ* of a spectral method in factored form, written as a PEFT LoRA adapter.

Workers write each exportable matrix's factors (Δ* = L R, balanced) to a small part file under
`OUT/dgrepair/adapter_parts/`; when the run finishes, the parts become `adapter_model.safetensors`
and `adapter_config.json` with per-module ranks (`rank_pattern`) and `alpha_pattern` = rank, so
PEFT's scaling alpha / r is 1 for every module. Only plain 2-D `*.weight` matrices (Linear, and
Embedding by name) are exportable; expert stacks, convolutions, FP8 weights and resized
vocabularies are listed in `adapter_export.json` as not exportable (they are still repaired in
the output checkpoint). Modules whose fine-tuned values the repair keeps (norms, small or masked
tensors) and that differ from the base are shipped whole through PEFT's `modules_to_save`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io.bytes import write_json_atomic
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import TORCH_DTYPES as TORCH_OUT
from ..io.safetensors_format import read_tensor
from ..plan.kinds import REPAIR_KINDS, Kind
from ..plan.model import Plan, PlanEntry

EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")


def exportable(entry: PlanEntry) -> str | None:
    """None when the entry can be a LoRA module, else why not."""
    if entry.kind != Kind.SVD:
        return f"{entry.kind} tensors are not plain Linear/Embedding weights"
    if entry.resized_rows is not None:
        return "resized vocabulary: the new rows are copied, a LoRA delta cannot add rows"
    if len(entry.ft.shape) != 2 or not entry.name.endswith(".weight"):
        return "not a 2-D '.weight' tensor"
    return None


TIED_NOTE = ("the model ties lm_head to the input embedding; a LoRA on the embedding reaches only the input side "
             "of an unmerged PeftModel (the head keeps the base matrix), so the repaired embedding is shipped whole "
             "in modules_to_save with ensure_weight_tying, which PEFT shares with the head: merged and unmerged "
             "both match the repaired checkpoint")


def tied_embedding(plan: Plan, ft: Checkpoint) -> str | None:
    """The input-embedding tensor when config.json says tie_word_embeddings (the head reuses it)."""
    try:
        config = json.loads((ft.root / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("tie_word_embeddings") is not True:
        return None
    names = [e.name for e in plan.entries if e.kind in REPAIR_KINDS and EMBEDDING.search(e.name)
             and exportable(e) is None]
    return names[0] if len(names) == 1 else None


def part_path(where: Path, name: str) -> Path:
    return where / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".safetensors")


def save_part(where: Path, name: str, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """One matrix's factors (none when nothing was kept), written atomically."""
    where.mkdir(parents=True, exist_ok=True)
    target = part_path(where, name)
    tensors = {} if pair is None else {"L": pair[0].contiguous(), "R": pair[1].contiguous()}
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"name": name, "rank": str(0 if pair is None else pair[0].shape[1])})
    os.replace(tmp, target)


def has_part(where: Path, name: str) -> bool:
    return part_path(where, name).is_file()


def _kept_finetune_modules(plan: Plan, base: Checkpoint, ft: Checkpoint, lora: set[str],
                           tensors: dict[str, torch.Tensor], skipped: list[dict[str, str]]) -> list[str]:
    """Modules whose fine-tuned values the repair kept (norms, biases, small or masked tensors) and
    that differ from the base go into `modules_to_save` whole, so merging reproduces the output."""
    changed: set[str] = set()
    for entry in plan.entries:
        if entry.kind in REPAIR_KINDS or "." not in entry.name:
            continue
        module = entry.name.rsplit(".", 1)[0]
        if entry.base is None or not entry.base_name:
            skipped.append({"tensor": entry.name, "kind": entry.kind, "reason": "only in the fine-tune"})
            continue
        if torch.equal(read_tensor(*ft.entry(entry.name)), read_tensor(*base.entry(entry.base_name))):
            continue
        if module in lora:
            skipped.append({"tensor": entry.name, "kind": entry.kind,
                            "reason": "kept fine-tuned value inside a LoRA module (PEFT cannot carry both)"})
            continue
        changed.add(module)
    for entry in plan.entries:
        module = entry.name.rsplit(".", 1)[0] if "." in entry.name else ""
        if module in changed:
            tensors[f"base_model.model.{entry.name}"] = read_tensor(*ft.entry(entry.name)).contiguous()
    return sorted(changed)


def finalize(parts: Path, plan: Plan, target: Path, base: Checkpoint, ft: Checkpoint) -> dict[str, Any]:
    """Assemble the PEFT adapter in `target`; returns the export report (also written there)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    skipped = []
    tied = tied_embedding(plan, ft)
    whole: list[str] = []  # the tied embedding, shipped repaired and whole
    for entry in plan.entries:
        if entry.kind not in REPAIR_KINDS:
            continue
        if tied is not None and entry.name == "lm_head.weight":
            skipped.append({"tensor": entry.name, "kind": entry.kind, "reason": f"tied to {tied}: carried by it"})
            continue
        why = exportable(entry)
        if why is not None:
            skipped.append({"tensor": entry.name, "kind": entry.kind, "reason": why})
            continue
        with safe_open(str(part_path(parts, entry.name)), "pt") as fh:
            if not fh.keys():
                continue  # nothing kept: the module is left out of the adapter
            left, right = fh.get_tensor("L"), fh.get_tensor("R")
        module = entry.name[: -len(".weight")]
        prefix = f"base_model.model.{module}"
        if entry.name == tied:  # see tied_embedding: the repaired matrix itself, tied to the head by PEFT
            w0 = read_tensor(*base.entry(entry.base_name)).double()
            tensors[f"{prefix}.weight"] = (w0 + left.double() @ right.double()).to(TORCH_OUT[entry.ft.dtype])
            tensors["base_model.model.lm_head.weight"] = tensors[f"{prefix}.weight"].clone()  # PEFT loads both
            whole.append(module)
            continue
        if EMBEDDING.search(entry.name):  # PEFT Embedding: ΔW = (B A)ᵀ with A (r, vocab), B (dim, r)
            tensors[f"{prefix}.lora_embedding_A"] = left.T.contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = right.T.contiguous()
        else:  # PEFT Linear: ΔW = B A with A (r, in), B (out, r)
            tensors[f"{prefix}.lora_A.weight"] = right
            tensors[f"{prefix}.lora_B.weight"] = left
        ranks[module] = int(left.shape[1])
    lora_modules = {e.name.rsplit(".", 1)[0] for e in plan.entries if e.kind == Kind.SVD}
    saved = sorted(_kept_finetune_modules(plan, base, ft, lora_modules - set(whole), tensors, skipped) + whole)
    target.mkdir(parents=True, exist_ok=True)
    top = max(ranks.values(), default=1)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.root),
        "r": top, "lora_alpha": top, "rank_pattern": ranks, "alpha_pattern": ranks,
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": saved or None,
    }
    if whole:
        config["ensure_weight_tying"] = True
    tmp = target / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target / "adapter_model.safetensors")
    write_json_atomic(target / "adapter_config.json", config, sort_keys=False)
    report = {"adapter_dir": str(target), "modules": len(ranks), "total_rank": sum(ranks.values()),
              "modules_to_save": saved, "not_exportable": skipped}
    if whole:
        report["tied_embedding"] = {"module": whole[0], "how": TIED_NOTE}
    write_json_atomic(target / "adapter_export.json", report, sort_keys=False)
    return {k: v for k, v in report.items() if k not in ("not_exportable", "modules_to_save")} | {
        "modules_to_save": len(saved), "not_exportable": len(skipped)}
