"""Full-parameter AdamW fine-tuning on 2-digit addition (CPU), saving bf16 checkpoints at given steps.

One trajectory per seed; checkpoints at several step counts come from the same run, so "60 steps" is
"30 steps" continued (the lengths differ only in training time, not in data order or init).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lab_data import HELD_OUT_ADDITIONS, addition_split, addition_train_text


def training_batch(tok, rng: random.Random, exclude: set, batch: int, seq_len: int):
    """`batch` rows of packed examples (eos-separated), truncated to `seq_len` tokens; loss on all tokens."""
    import torch

    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tok(addition_train_text(rng, exclude) + "\n\n", add_special_tokens=False)["input_ids"]
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def finetune(
    base_dir: Path,
    out_root: Path,
    seed: int,
    steps: list[int],
    lr: float = 1e-4,
    batch: int = 8,
    seq_len: int = 64,
) -> dict[int, Path]:
    """Fine-tune from `base_dir`; writes `out_root/steps{N}` for each N in `steps` (cached if complete)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    targets = {n: Path(out_root) / f"steps{n}" for n in sorted(steps)}
    if all((p / "lab_ft.json").is_file() for p in targets.values()):
        return targets
    torch.manual_seed(seed)
    rng = random.Random(seed)
    _, exclude = addition_split(HELD_OUT_ADDITIONS)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(1, max(steps) + 1):
        ids = training_batch(tok, rng, exclude, batch, seq_len)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        print(f"seed {seed} step {step} loss {losses[-1]:.4f}", flush=True)
        if step in targets:
            out = targets[step]
            # a bf16 copy of the weights: casting the model itself would round the fp32 master weights
            half = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                half.pop("lm_head.weight", None)  # tied: the file holds only the embedding, like the base
            model.config.dtype = torch.bfloat16
            model.save_pretrained(out, state_dict=half, safe_serialization=True)
            tok.save_pretrained(out)
            meta = {"seed": seed, "steps": step, "lr": lr, "batch": batch, "seq_len": seq_len, "losses": losses}
            (out / "lab_ft.json").write_text(json.dumps(meta))
    return targets
