"""Full-parameter AdamW fine-tuning on one lab task (CPU), saving bf16 checkpoints at given steps, resumably.

One trajectory per (task, seed, lr); checkpoints at several step counts come from the same run, so "300
steps" is "120 steps" continued (the lengths differ only in training time, not in data order or init).
The trajectory's exact state (fp32 weights, AdamW moments, data RNG) is saved as safetensors + JSON (never
pickle) at every checkpoint and every `state_every` steps, so a run killed mid-way, or asked later for a
longer length, continues the same trajectory instead of starting over. `curve.csv` records loss and
wall seconds per step.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path

from lab_data import TASKS

STATE_DIR = "state"


def training_batch(tok, rng: random.Random, task: str, exclude: set, batch: int, seq_len: int):
    """`batch` rows of packed examples (blank-line separated), truncated to `seq_len` tokens; loss on all."""
    import torch

    spec = TASKS[task]
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tok(spec.train_text(rng, exclude) + "\n\n", add_special_tokens=False)["input_ids"]
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data) -> tuple:
    return (data[0], tuple(data[1]), data[2])


def _save_state(root: Path, model, opt, rng: random.Random, step: int, curve: list) -> None:
    """Weights + AdamW moments (safetensors) and step/RNG/curve (JSON); the JSON is written last, so a state
    directory whose JSON names step N holds step N's tensors (written to a temporary dir, then renamed)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    tmp = root / (STATE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = dict(model.named_parameters())
    tensors = {f"w/{k}": p.detach().contiguous() for k, p in params.items()}
    for k, p in params.items():
        st = opt.state.get(p)
        if st:
            tensors[f"m/{k}"] = st["exp_avg"].contiguous()
            tensors[f"v/{k}"] = st["exp_avg_sq"].contiguous()
    save_file(tensors, tmp / "state.safetensors")
    meta = {"step": step, "rng": _rng_to_json(rng.getstate()), "curve": curve,
            "torch_rng": torch.get_rng_state().tolist()}
    (tmp / "state.json").write_text(json.dumps(meta))
    final = root / STATE_DIR
    old = root / (STATE_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(root: Path, model, opt, rng: random.Random) -> tuple[int, list]:
    """Restore a saved trajectory; returns (step, curve). (0, []) when there is none."""
    import torch
    from safetensors.torch import load_file

    meta_path = root / STATE_DIR / "state.json"
    if not meta_path.is_file():
        return 0, []
    meta = json.loads(meta_path.read_text())
    tensors = load_file(root / STATE_DIR / "state.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"w/{k}"])
    for k, p in params.items():
        if f"m/{k}" in tensors:
            opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": tensors[f"m/{k}"].clone(),
                            "exp_avg_sq": tensors[f"v/{k}"].clone()}
    rng.setstate(_rng_from_json(meta["rng"]))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return int(meta["step"]), meta["curve"]


def _save_checkpoint(out: Path, model, tok, meta: dict) -> None:
    import torch

    # a bf16 copy of the weights: casting the model itself would round the fp32 master weights
    half = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        half.pop("lm_head.weight", None)  # tied: the file holds only the embedding, like the base
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, state_dict=half, safe_serialization=True)
    model.config.dtype = torch.float32
    tok.save_pretrained(out)
    (out / "lab_ft.json").write_text(json.dumps(meta))


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint with its weights; `lab_ft.json` alone (restored from the ledger, lab_ledger.py) is the
    record of a checkpoint whose weights must be rebuilt before they are used."""
    return (path / "lab_ft.json").is_file() and (path / "model.safetensors").is_file()


def cpu_model() -> str:
    """The CPU's model name: a trajectory repeats bit for bit only on the same kind of CPU (the BLAS kernels
    differ between instruction sets), so the record says which one it was trained on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _check_recorded(path: Path, meta: dict) -> None:
    """A rebuilt checkpoint must be the one the ledger's results were measured on: same losses, step by step."""
    rec = path / "lab_ft.json"
    if not rec.is_file():
        return
    old = json.loads(rec.read_text())
    if old["losses"] != meta["losses"] or old.get("torch_threads") != meta["torch_threads"]:
        diff = next((i for i, (a, b) in enumerate(zip(old["losses"], meta["losses"], strict=False)) if a != b), None)
        raise SystemExit(f"{path}: the retrained trajectory differs from the recorded one (threads "
                         f"{old.get('torch_threads')} recorded, {meta['torch_threads']} now; CPU "
                         f"{old.get('cpu', 'not recorded')!r} recorded, {meta['cpu']!r} now; first different loss "
                         f"at step {None if diff is None else diff + 1}); the ledger's results for it were measured "
                         "on another model: run with the recorded thread count on the same kind of CPU, or delete "
                         "this trajectory's and its cells' entries from the ledger and the workdir to measure it "
                         "anew")


def finetune(
    base_dir: Path,
    out_root: Path,
    seed: int,
    steps: list[int],
    lr: float = 1e-4,
    batch: int = 8,
    seq_len: int = 64,
    task: str = "add",
    state_every: int = 50,
    log=print,
) -> dict[int, Path]:
    """Fine-tune from `base_dir`; writes `out_root/steps{N}` for each N in `steps` (cached if complete;
    continues the saved trajectory in `out_root/state` when longer lengths are asked for)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_root = Path(out_root)
    targets = {n: out_root / f"steps{n}" for n in sorted(steps)}
    if all(checkpoint_complete(p) for p in targets.values()):
        return targets
    torch.manual_seed(seed)
    rng = random.Random(seed)
    _, exclude = TASKS[task].split()
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, curve = _load_state(out_root, model, opt, rng)
    missing = [n for n, p in targets.items() if not checkpoint_complete(p)]
    if start > min(missing):
        raise SystemExit(f"{out_root}: saved trajectory is at step {start}, past the missing checkpoint "
                         f"steps{min(missing)}; delete {out_root / STATE_DIR} to retrain from step 0")
    if start:
        log(f"{task} seed {seed} lr {lr:g}: resuming at step {start}")
    for step in range(start + 1, max(missing) + 1):
        t0 = time.time()
        ids = training_batch(tok, rng, task, exclude, batch, seq_len)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append([step, float(loss.detach()), time.time() - t0])
        if step % 10 == 0 or step == 1:
            log(f"{task} seed {seed} lr {lr:g} step {step} loss {curve[-1][1]:.4f} ({curve[-1][2]:.2f} s/step)")
        if step in targets:
            meta = {"task": task, "seed": seed, "steps": step, "lr": lr, "batch": batch, "seq_len": seq_len,
                    "torch_threads": torch.get_num_threads(), "cpu": cpu_model(), "losses": [c[1] for c in curve],
                    "step_seconds": [c[2] for c in curve]}
            _check_recorded(targets[step], meta)
            _save_checkpoint(targets[step], model, tok, meta)
        if step in targets or step % state_every == 0:
            _save_state(out_root, model, opt, rng, step, curve)
            _write_curve(out_root / "curve.csv", curve)
    return targets


def _write_curve(path: Path, curve: list) -> None:
    """Loss and seconds per step. A trajectory rebuilt to a shorter length than the file records (weights
    retrained for a ledger cell) keeps the recorded tail, as long as the steps both have agree on the loss."""
    rows = [f"{s},{loss:.6f},{sec:.4f}\n" for s, loss, sec in curve]
    if path.is_file():
        old = path.read_text().splitlines(keepends=True)[1:]
        same = all(a.split(",")[:2] == b.split(",")[:2] for a, b in zip(old, rows, strict=False))
        if same and len(old) > len(rows):
            rows += old[len(rows):]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("step,loss,seconds\n" + "".join(rows))
    os.replace(tmp, path)
