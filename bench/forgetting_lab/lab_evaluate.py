"""Offline evaluation of one checkpoint on a `Suite`: greedy decoding and log-likelihoods, fixed prompts.

Scores are in [0, 1] (the metric of docs/scoring.md needs that):
- task, geography: exact-match accuracy of greedy completions (task: the first word of the completion,
  trailing punctuation stripped, equals the answer, e.g. "68" or "1997-03-05"; geography: the first line
  contains the place name, case-insensitive); Wilson 95 % interval.
- definitions: 4-way multiple choice, the choice with the highest mean token log-probability wins; Wilson.
- sentences: next-token top-1 accuracy over all tokens of held-out WordNet example sentences (each
  sentence scored after `<|endoftext|>`): a likelihood-based accuracy on the same forward pass that gives
  the perplexity (reported alongside). Perplexity itself is not in [0, 1], and 1/perplexity (~0.002 here)
  would make the metric's ±0.03 damage threshold meaningless. Percentile-bootstrap 95 % interval over
  sentences.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from lab_data import Suite

BENCHMARKS = ("task", "geography", "definitions", "sentences")
DOC_START = "<|endoftext|>"  # SmolLM2's document separator: sentences are scored as document starts


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def answer_correct(benchmark: str, completion: str, answer: str) -> bool:
    """Exact-match rule of the generation benchmarks (unit-tested on hand-written strings)."""
    line = completion.strip().split("\n")[0]
    if benchmark == "task":
        words = line.split()
        return bool(words) and words[0].rstrip(".,;") == answer
    return answer.lower() in line.lower()


def greedy(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy completions with left padding (deterministic)."""
    import torch

    out: list[str] = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def token_logprobs(
    model, tok, contexts: list[str], conts: list[str], batch: int = 32, top1: list | None = None
) -> list[list[float]]:
    """Log-probabilities of each continuation token given its context (right padding).

    When `top1` is a list, it receives per continuation the list of 0/1 "token was the argmax" flags.
    """
    import torch

    res: list[list[float]] = []
    for i in range(0, len(contexts), batch):
        rows, spans = [], []
        for ctx, cont in zip(contexts[i : i + batch], conts[i : i + batch], strict=True):
            c = tok(ctx, add_special_tokens=False)["input_ids"]
            t = tok(cont, add_special_tokens=False)["input_ids"]
            rows.append(c + t)
            spans.append((len(c), len(t)))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for j, (start, n) in enumerate(spans):
            pos = torch.arange(start, start + n)
            res.append(logp[j, pos - 1, ids[j, pos]].tolist())
            if top1 is not None:
                top1.append((logp[j, pos - 1].argmax(-1) == ids[j, pos]).int().tolist())
    return res


def load(model_dir: Path, tok_dir: Path):
    """Model in float32 (bf16 weights upcast exactly) and the base's tokenizer, left padding."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tok


def items_of(suite: Suite, benchmark: str) -> list:
    """The items one benchmark scores (what its cache key hashes)."""
    return {"task": suite.task, "geography": suite.geography, "definitions": suite.definitions,
            "sentences": suite.sentences}[benchmark]


def evaluate(model_dir: Path, tok_dir: Path, suite: Suite, benchmarks=BENCHMARKS) -> dict[str, dict]:
    """Per benchmark in `benchmarks`: score, n, lo, hi (95 % interval), per-item outcomes, seconds."""
    import time

    model, tok = load(model_dir, tok_dir)
    results: dict[str, dict] = {}
    for name in benchmarks:
        t0 = time.time()
        results[name] = _run_benchmark(model, tok, suite, name)
        results[name]["seconds"] = time.time() - t0
    return results


def _run_benchmark(model, tok, suite: Suite, name: str) -> dict:
    if name in ("task", "geography"):
        items = items_of(suite, name)
        comps = greedy(model, tok, [p for p, _ in items], suite.task_new_tokens if name == "task" else 5)
        ok = [answer_correct(name, c, a) for c, (_, a) in zip(comps, items, strict=True)]
        res = _acc(ok) | {"completions": comps}
        if name == "geography" and suite.geography_kinds:
            for kind in sorted(set(suite.geography_kinds)):
                sub = [o for o, k in zip(ok, suite.geography_kinds, strict=True) if k == kind]
                res[f"kind_{kind}"] = {key: v for key, v in _acc(sub).items() if key != "items"}
        return res
    if name == "definitions":
        ctx = [it.prompt for it in suite.definitions for _ in it.choices]
        cont = [c for it in suite.definitions for c in it.choices]
        lps = token_logprobs(model, tok, ctx, cont)
        ok, k = [], 0
        for it in suite.definitions:
            means = [sum(lp) / len(lp) for lp in lps[k : k + len(it.choices)]]
            k += len(it.choices)
            ok.append(max(range(len(means)), key=means.__getitem__) == it.answer)
        return _acc(ok)
    if name == "sentences":
        flags: list[list[int]] = []
        sent_lps = token_logprobs(model, tok, [DOC_START] * len(suite.sentences), suite.sentences, top1=flags)
        return _token_accuracy(flags, sent_lps)
    raise ValueError(f"unknown benchmark {name!r}")


def _acc(ok: list[bool]) -> dict:
    lo, hi = wilson(sum(ok), len(ok))
    return {"score": sum(ok) / len(ok), "n": len(ok), "lo": lo, "hi": hi, "items": [int(x) for x in ok]}


def _token_accuracy(flags: list[list[int]], lps: list[list[float]], n_boot: int = 1000) -> dict:
    """Top-1 next-token accuracy over all tokens; bootstrap over sentences (fixed RNG); perplexity too."""
    hits = [sum(f) for f in flags]
    lens = [len(f) for f in flags]
    rng = random.Random(0)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(len(flags)) for _ in flags]
        boots.append(sum(hits[i] for i in idx) / sum(lens[i] for i in idx))
    boots.sort()
    nll = -sum(sum(lp) for lp in lps) / sum(lens)
    return {
        "score": sum(hits) / sum(lens),
        "n": len(flags),
        "tokens": sum(lens),
        "lo": boots[int(0.025 * n_boot)],
        "hi": boots[int(0.975 * n_boot) - 1],
        "perplexity": math.exp(nll),
        "items": [h / n for h, n in zip(hits, lens, strict=True)],
    }
