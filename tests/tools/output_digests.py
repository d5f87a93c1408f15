"""Digests of the output bytes of every fixture pair, to prove a refactoring changes no output byte.

`python tests/tools/output_digests.py` repairs each case below in-process and writes
tests/data/output_digests.json; tests/test_output_digests.py repairs them again and compares. Record
only when an output change is intended, and say so in the commit.

The bytes also depend on the BLAS kernels the machine gets: OpenBLAS picks them by CPU (Haswell kernels
on an AVX2 machine, SkylakeX ones with AVX-512), and their float32 sums round differently (the thread
count does not change them: kernels/threads.py). So the record holds one variant per kernel family,
named by OpenBLAS's architecture, and the test compares with this machine's family. `--add` records
this machine's variant beside the others (do it only when the other variants still pass where they were
recorded, i.e. nothing but the kernels differs). Without it (an intended output change) this machine's
variant is recorded in full and every other family keeps only the cases whose recorded digests this
machine reproduces unchanged (the change did not touch them here, and the families agreed on them); the
cases the change touched must be recorded again on each family's machine with `--add`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RECORD = HERE.parent / "data" / "output_digests.json"
sys.path.insert(0, str(HERE.parent / "fixtures"))


def _fixture(name: str) -> Callable[[Path], tuple[Path, Path]]:
    def write(root: Path) -> tuple[Path, Path]:
        from frontier import write_pair

        return write_pair(name, root)
    return write


def _test_pair(dtype: str) -> Callable[[Path], tuple[Path, Path]]:
    def write(root: Path) -> tuple[Path, Path]:
        import torch
        from pairs import make_pair

        p = make_pair(root, dtype=getattr(torch, dtype))
        return p.base, p.ft
    return write


def _synthetic(root: Path) -> tuple[Path, Path]:
    from dgrepair.engine.demo.synthetic import SyntheticSpec, write_pair

    spec = SyntheticSpec(layers=1, hidden=128, intermediate=256, vocab=512, dtype="BF16", shard_bytes=200_000)
    return write_pair(root, spec)


# name -> (writer, extra repair options)
CASES: dict[str, tuple[Callable[[Path], tuple[Path, Path]], tuple[str, ...]]] = {
    "pair_f32": (_test_pair("float32"), ()),
    "pair_bf16": (_test_pair("bfloat16"), ()),
    "pair_bf16_gram32": (_test_pair("bfloat16"), ("--kernel", "gram32")),
    "pair_bf16_gram64": (_test_pair("bfloat16"), ("--kernel", "gram64")),
    "pair_bf16_exact": (_test_pair("bfloat16"), ("--kernel", "exact")),
    "pair_bf16_ties": (_test_pair("bfloat16"), ("--method", "ties")),
    "pair_bf16_dare": (_test_pair("bfloat16"), ("--method", "dare", "--seed", "3")),
    "pair_bf16_fixed_rank": (_test_pair("bfloat16"), ("--method", "fixed_rank", "--rank", "2")),
    "pair_bf16_optimal_shrink": (_test_pair("bfloat16"), ("--method", "optimal_shrink")),
    "pair_bf16_mlp_only": (_test_pair("bfloat16"), ("--mask", "mlp_only", "--scale", "0.5")),
    "synthetic_bf16": (_synthetic, ()),
    "deepseek_v3": (_fixture("deepseek_v3"), ()),
    "deepseek_v3_bf16": (_fixture("deepseek_v3"), ("--out-dtype", "bf16")),
    "gpt_oss": (_fixture("gpt_oss"), ()),
    "gpt_oss_bf16": (_fixture("gpt_oss"), ("--out-dtype", "bf16")),
    "qwen3_5_moe": (_fixture("qwen3_5_moe"), ()),
    "mixtral": (_fixture("mixtral"), ()),
    "vlm": (_fixture("vlm"), ()),
    "kimi_int4": (_fixture("kimi_int4"), ()),
    "kimi_k2_thinking": (_fixture("kimi_k2_thinking"), ()),
    "kimi_k2_thinking_bf16": (_fixture("kimi_k2_thinking"), ("--out-dtype", "bf16")),
    "kimi_k2_thinking_bf16_ft": (_fixture("kimi_k2_thinking_bf16_ft"), ()),
    "kimi_k2_thinking_bf16_base": (_fixture("kimi_k2_thinking_bf16_base"), ()),
}


def digest_output(out: Path) -> dict[str, str]:
    """sha256 of every file the output holds outside dgrepair/, plus the manifest's decisions.

    dgrepair/ itself holds timings, hosts and dates; of it only what decides the bytes counts: per
    row the tensor, expert, part, status, kept rank and output sha256."""
    digests = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).parts[0] != "dgrepair"}
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    cols = ["tensor", "expert", "part", "status", "rank_kept", "sha256"]
    rows = m[cols].astype(str).sort_values(cols).to_csv(index=False)
    digests["dgrepair/manifest:decisions"] = hashlib.sha256(rows.encode()).hexdigest()
    return digests


def run_case(name: str, root: Path) -> dict[str, str]:
    from dgrepair.cli import main

    write, extra = CASES[name]
    base, ft = write(root / "in")
    out = root / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--in-process",
                     "--no-progress", *extra])
    if code != 0:
        raise RuntimeError(f"case {name}: dgrepair repair exited {code}")
    return digest_output(out)


def kernel_family() -> str:
    """The BLAS kernels this process computes with: OpenBLAS's architecture (numpy's and scipy's copies)."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, which the CPU path uses)
    from threadpoolctl import threadpool_info

    archs = sorted({i.get("architecture") or "unknown" for i in threadpool_info()
                    if i.get("internal_api") == "openblas"})
    return "openblas-" + "+".join(archs or ["none"])


def variants() -> dict[str, dict[str, dict[str, str]]]:
    """The recorded digests: {kernel family: {case: {file: sha256}}}; a family may hold some cases only."""
    return json.loads(RECORD.read_text())


def portable_cases(record: dict[str, dict[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    """The cases that two or more families record, all with the same digests: their bytes do not
    depend on the kernels (the float64 and integer paths), so a machine of any family must give them."""
    seen: dict[str, list[dict[str, str]]] = {}
    for cases in record.values():
        for case, digests in cases.items():
            seen.setdefault(case, []).append(digests)
    return {case: ds[0] for case, ds in seen.items() if len(ds) >= 2 and all(d == ds[0] for d in ds)}


def main(argv: list[str] | None = None) -> int:
    add = "--add" in (sys.argv[1:] if argv is None else argv)
    record = {}
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            record[name] = run_case(name, Path(tmp))
        print(f"{name}: {len(record[name])} files")
    family = kernel_family()
    before = variants() if RECORD.is_file() else {}
    others = {k: v for k, v in before.items() if k != family}
    if not add:  # an intended change: other families keep the cases it left alone here, as they agreed
        here = before.get(family, record)
        others = {k: {case: d for case, d in v.items() if record.get(case) == d == here.get(case)}
                  for k, v in others.items()}
        others = {k: v for k, v in others.items() if v}
    RECORD.write_text(json.dumps({**others, family: record}, indent=1, sort_keys=True) + "\n")
    for k, v in sorted(others.items()):
        print(f"kept {k}: {len(v)} of {len(CASES)} cases" + ("" if len(v) == len(CASES) else
              f" (record the rest there with --add: {sorted(set(CASES) - set(v))})"))
    print(f"wrote {RECORD}: variant {family}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
