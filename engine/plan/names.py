"""Canonical tensor names, used for pairing only: the fine-tune's own names are always written.

Transformers ≥ 4.52 stores VLM weights under `model.language_model.*` / `model.visual.*`; older files
use `model.*` / `visual.*`; Llama-4 and older Gemma-3 files use `language_model.model.*`
(docs/formats.md). A head missing from the base is the base's embedding when the base ties
them (decided from the files, not the config).
"""

from __future__ import annotations

PREFIX_ALIASES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.visual.", "visual."),
)
HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def canonical(name: str) -> str:
    for prefix, replacement in PREFIX_ALIASES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def base_partner(ft_name: str, base_exact: set[str] | dict[str, object],
                 base_names: dict[str, str]) -> tuple[str | None, str | None]:
    """(base tensor name, note) for a fine-tune tensor. `base_exact` holds the base's names,
    `base_names` maps canonical -> base name.

    Exact names win; then canonical names; then a fine-tune head whose base has none is paired with
    the base's embedding (a tied base)."""
    if ft_name in base_exact:
        return ft_name, None
    canon = canonical(ft_name)
    if canon in base_names:
        return base_names[canon], f"paired with base {base_names[canon]}"
    if canon == HEAD and EMBEDDING in base_names:
        return base_names[EMBEDDING], f"base ties the head: paired with base {base_names[EMBEDDING]}"
    return None, None
