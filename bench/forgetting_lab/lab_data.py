"""Fixed, offline evaluation and training data for the forgetting lab.

The fine-tuning task is 2-digit addition (unlimited and exactly scored). Held-out capabilities come from
WordNet 3.0 as shipped by Debian's `wordnet-base` (plain text files, parsed here directly, no NLTK):
capital-city QA from instance glosses, example sentences for perplexity, and word-from-definition
multiple choice. Every sample is drawn with a fixed seed, independent of the fine-tuning seed, so all
models of a run see the same prompts. The smoke test passes its own tiny synthetic `Suite` instead.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
EVAL_SEED = 1234  # fixed: eval items never depend on the fine-tuning seed

QA_TEMPLATE = "Q: {q}\nA:"
# training never sees these many held-out pairs; an eval set is a prefix of them (random.sample with a fixed
# seed draws the same leading pairs for any k here)
HELD_OUT_ADDITIONS = 100


@dataclass(frozen=True)
class MCItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class Suite:
    """All evaluation items of one lab run; `task` is the on-task benchmark (held-out additions)."""

    task: list[tuple[str, str]]  # (prompt, exact answer)
    capitals: list[tuple[str, str]]  # (prompt, city)
    sentences: list[str]
    definitions: list[MCItem]
    meta: dict = field(default_factory=dict)


def addition_prompt(a: int, b: int) -> str:
    return QA_TEMPLATE.format(q=f"What is {a} + {b}?")


def capital_prompt(country: str) -> str:
    """The answer is primed ("The capital of X is") so the city is the first generated word."""
    return QA_TEMPLATE.format(q=f"What is the capital of {country}?") + f" The capital of {country} is"


def addition_split(n_eval: int) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    """Held-out (a, b) pairs for eval, and the set that training must never draw."""
    rng = random.Random(EVAL_SEED)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    held = rng.sample(pairs, n_eval)
    return held, set(held)


def addition_train_text(rng: random.Random, exclude: set[tuple[int, int]]) -> str:
    """One training example; pairs in `exclude` (the eval set) are never used."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) not in exclude:
            return f"{addition_prompt(a, b)} {a + b}"


def _data_lines(path: Path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            yield head.split(), gloss.strip()


_CAPITAL_RE = re.compile(
    r"^(?:the )?(?:national )?capital (?:and (?:the )?largest city |city )?of (?:the )?"
    r"([A-Z][A-Za-z]+(?: [A-Z][A-Za-z]+)*)"
)


def wordnet_capitals(wn: Path = WORDNET_DIR) -> list[tuple[str, str]]:
    """(country, city) pairs from noun.location glosses that start with 'capital of X' (deduplicated)."""
    seen: dict[str, str] = {}
    for head, gloss in _data_lines(wn / "data.noun"):
        if head[1] != "15":  # lexname 15 = noun.location
            continue
        city = head[4].replace("_", " ")
        m = _CAPITAL_RE.match(gloss)
        if m and city[:1].isupper() and m.group(1) not in seen and m.group(1) != city:
            seen[m.group(1)] = city
    return sorted(seen.items())


def wordnet_examples(wn: Path = WORDNET_DIR) -> list[str]:
    """Quoted example sentences from all glosses, 6–25 words, ending in a letter (no fragments)."""
    out: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        for _, gloss in _data_lines(wn / f"data.{pos}"):
            for s in re.findall(r'"([^"]+)"', gloss):
                if 6 <= len(s.split()) <= 25 and s[-1].isalpha():
                    out.append(s)
    return sorted(set(out))


def wordnet_definitions(wn: Path = WORDNET_DIR) -> list[tuple[str, str]]:
    """(word, definition) pairs for common single-word nouns (tag count > 0 in the sense index)."""
    out: list[tuple[str, str]] = []
    for head, gloss in _data_lines(wn / "data.noun"):
        word, lex_id = head[4], head[5]
        definition = gloss.split(";")[0].strip()
        if word.isalpha() and word.islower() and lex_id == "0" and 3 <= len(definition.split()) <= 14:
            out.append((word, definition))
    return out


def build_suite(n_task: int, n_cap: int, n_sent: int, n_def: int, wn: Path = WORDNET_DIR) -> Suite:
    """The lab's fixed evaluation suite (sizes capped by what WordNet yields)."""
    if not (wn / "data.noun").is_file():
        raise SystemExit(f"WordNet not found in {wn}: apt-get install wordnet-base wordnet-sense-index")
    rng = random.Random(EVAL_SEED)
    if n_task > HELD_OUT_ADDITIONS:
        raise SystemExit(f"--n-task {n_task} > {HELD_OUT_ADDITIONS}: training only excludes that many pairs")
    held = addition_split(HELD_OUT_ADDITIONS)[0][:n_task]
    task = [(addition_prompt(a, b), str(a + b)) for a, b in held]
    caps = wordnet_capitals(wn)
    caps = rng.sample(caps, min(n_cap, len(caps)))
    capitals = [(capital_prompt(country), city) for country, city in caps]
    sents = wordnet_examples(wn)
    sentences = rng.sample(sents, min(n_sent, len(sents)))
    defs = wordnet_definitions(wn)
    picked = rng.sample(defs, min(4 * n_def, len(defs)))
    definitions = []
    for i in range(0, len(picked) - 3, 4):
        group = picked[i : i + 4]
        word, definition = group[0]
        choices = [w for w, _ in group]
        rng.shuffle(choices)
        prompt = QA_TEMPLATE.format(q=f"Which word means: {definition}?")
        definitions.append(MCItem(prompt, tuple(" " + c for c in choices), choices.index(word)))
        if len(definitions) == n_def:
            break
    meta = {"capital_pairs_available": len(wordnet_capitals(wn)), "sentences_available": len(sents)}
    return Suite(task, capitals, sentences, definitions, meta)


def synthetic_suite(n_task: int = 4) -> Suite:
    """A tiny fixed suite without WordNet (smoke test and CI): a few additions, capitals, sentences, MC."""
    held, _ = addition_split(n_task)
    task = [(addition_prompt(a, b), str(a + b)) for a, b in held]
    capitals = [(capital_prompt(c), city) for c, city in (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"))]
    sentences = ["the cat sat on the mat and looked out of the window", "she bought bread and milk at the shop"]
    definitions = [
        MCItem(QA_TEMPLATE.format(q="Which word means: a young dog?"), (" puppy", " river", " spoon", " cloud"), 0),
        MCItem(QA_TEMPLATE.format(q="Which word means: frozen water?"), (" stone", " ice", " paper", " song"), 1),
    ]
    return Suite(task, capitals, sentences, definitions, {"synthetic": True})
