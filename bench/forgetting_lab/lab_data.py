"""Fixed, offline evaluation and training data for the forgetting lab.

Two fine-tuning tasks of different kinds, both unlimited, generated deterministically and exactly scored:
`add` (2-digit addition, arithmetic) and `date` (rewrite "5 March 1997" as "1997-03-05", a formatting task).
Held-out capabilities come from WordNet 3.0 as shipped by Debian's `wordnet-base` (plain text files, parsed
here directly, no NLTK): geography QA from location glosses (every "capital of X" instance plus "a city in
X" instances), example sentences for next-token accuracy, and word-from-definition multiple choice. Every
sample is drawn with a fixed seed, independent of the fine-tuning seed, so all models of a run see the same
prompts. The smoke test passes its own tiny synthetic `Suite` instead.
"""

from __future__ import annotations

import datetime
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
EVAL_SEED = 1234  # fixed: eval items never depend on the fine-tuning seed

QA_TEMPLATE = "Q: {q}\nA:"
# training never sees these many held-out items of a task; an eval set is a prefix of them (random.sample
# with a fixed seed draws the same leading items for any k here)
HELD_OUT = 300
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
_DATE0 = datetime.date(1900, 1, 1)
_DATE_SPAN = (datetime.date(2099, 12, 31) - _DATE0).days + 1


@dataclass(frozen=True)
class MCItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class Suite:
    """All evaluation items of one lab run; `task` is the on-task benchmark (held-out items of the fine-tune's
    task), the others are held-out skills. `geography_kinds` names each geography item's source."""

    task: list[tuple[str, str]]  # (prompt, exact answer)
    geography: list[tuple[str, str]]  # (prompt, place name)
    sentences: list[str]
    definitions: list[MCItem]
    task_name: str = "add"
    task_new_tokens: int = 4
    geography_kinds: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: `example(key)` is (prompt, answer) of one item, `draw(rng)` a random training key,
    `keys()` all eval candidates (held-out ones are sampled from them with EVAL_SEED)."""

    name: str
    new_tokens: int  # greedy tokens an answer needs

    def example(self, key) -> tuple[str, str]:
        if self.name == "add":
            a, b = key
            return addition_prompt(a, b), str(a + b)
        d = _DATE0 + datetime.timedelta(days=key)
        return date_prompt(d), d.isoformat()

    def draw(self, rng: random.Random):
        if self.name == "add":
            return rng.randint(10, 99), rng.randint(10, 99)
        return rng.randrange(_DATE_SPAN)

    def keys(self) -> list:
        if self.name == "add":
            return [(a, b) for a in range(10, 100) for b in range(10, 100)]
        return list(range(_DATE_SPAN))

    def split(self, n_eval: int = HELD_OUT) -> tuple[list, set]:
        """Held-out keys for eval (a prefix of the HELD_OUT sample), and the set training must never draw."""
        held = random.Random(EVAL_SEED).sample(self.keys(), HELD_OUT)
        return held[:n_eval], set(held)

    def train_text(self, rng: random.Random, exclude: set) -> str:
        """One training example "prompt answer"; keys in `exclude` (the eval set) are never used."""
        while True:
            key = self.draw(rng)
            if key not in exclude:
                prompt, answer = self.example(key)
                return f"{prompt} {answer}"


TASKS = {"add": Task("add", 4), "date": Task("date", 12)}


def addition_prompt(a: int, b: int) -> str:
    return QA_TEMPLATE.format(q=f"What is {a} + {b}?")


def date_prompt(d: datetime.date) -> str:
    return QA_TEMPLATE.format(q=f"Write {d.day} {MONTHS[d.month - 1]} {d.year} as YYYY-MM-DD.")


def capital_prompt(country: str) -> str:
    """The answer is primed ("The capital of X is") so the city is the first generated word."""
    return QA_TEMPLATE.format(q=f"What is the capital of {country}?") + f" The capital of {country} is"


def city_prompt(city: str) -> str:
    """Primed like capitals: the region (country or state) is the first generated word."""
    return QA_TEMPLATE.format(q=f"Where is {city}?") + f" {city} is in"


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


_CITY_RE = re.compile(
    r"^(?:an? )?(?:(?:port|industrial|resort|large|ancient|historic|small|commercial|manufacturing) )*"
    r"(?:city|town|port) (?:in|of) (?:the )?(?:[a-z]+ )*?([A-Z][A-Za-z]+(?: [A-Z][A-Za-z]+)*)"
)


def wordnet_cities(wn: Path = WORDNET_DIR) -> list[tuple[str, str]]:
    """(city, region) pairs from noun.location glosses "a city in [southern] X", where X (a country or state)
    is itself a noun.location lemma (drops adjectives such as "European"); first sense of each city only."""
    places: set[str] = set()
    found: dict[str, str] = {}
    for head, gloss in _data_lines(wn / "data.noun"):
        if head[1] != "15":
            continue
        words = [head[4 + 2 * i].replace("_", " ") for i in range(int(head[3], 16))]
        places.update(words)
        m = _CITY_RE.match(gloss)
        if m and words[0][:1].isupper() and words[0] not in found and m.group(1) != words[0]:
            found[words[0]] = m.group(1)
    return sorted((c, r) for c, r in found.items() if r in places and r.lower() not in c.lower())


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


def build_suite(task: str, n_task: int, n_geo: int, n_sent: int, n_def: int, wn: Path = WORDNET_DIR) -> Suite:
    """The lab's fixed evaluation suite (sizes capped by what WordNet yields). Geography holds every capital
    pair first, then city-in-region pairs up to `n_geo` items in all."""
    if not (wn / "data.noun").is_file():
        raise SystemExit(f"WordNet not found in {wn}: apt-get install wordnet-base wordnet-sense-index")
    if task not in TASKS:
        raise SystemExit(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if n_task > HELD_OUT:
        raise SystemExit(f"--n-task {n_task} > {HELD_OUT}: training only excludes that many items")
    rng = random.Random(EVAL_SEED)
    spec = TASKS[task]
    items = [spec.example(k) for k in spec.split(n_task)[0]]
    caps = wordnet_capitals(wn)
    caps = rng.sample(caps, min(n_geo, len(caps)))
    geo = [(capital_prompt(country), city) for country, city in caps]
    cities = wordnet_cities(wn)
    cities = rng.sample(cities, min(max(0, n_geo - len(geo)), len(cities)))
    kinds = ["capital"] * len(geo) + ["city"] * len(cities)
    geo += [(city_prompt(city), region) for city, region in cities]
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
    meta = {"capital_pairs_available": len(wordnet_capitals(wn)), "city_pairs_available": len(wordnet_cities(wn)),
            "sentences_available": len(sents)}
    return Suite(items, geo, sentences, definitions, task, spec.new_tokens, kinds, meta)


def synthetic_suite(task: str = "add", n_task: int = 4) -> Suite:
    """A tiny fixed suite without WordNet (smoke test and CI): a few task items, places, sentences, MC."""
    spec = TASKS[task]
    items = [spec.example(k) for k in spec.split(n_task)[0]]
    geo = [(capital_prompt(c), city) for c, city in (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"))]
    geo.append((city_prompt("Lyon"), "France"))
    sentences = ["the cat sat on the mat and looked out of the window", "she bought bread and milk at the shop"]
    definitions = [
        MCItem(QA_TEMPLATE.format(q="Which word means: a young dog?"), (" puppy", " river", " spoon", " cloud"), 0),
        MCItem(QA_TEMPLATE.format(q="Which word means: frozen water?"), (" stone", " ice", " paper", " song"), 1),
    ]
    return Suite(items, geo, sentences, definitions, task, spec.new_tokens, ["capital"] * 3 + ["city"],
                 {"synthetic": True})
