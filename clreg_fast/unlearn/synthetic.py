"""A synthetic fictitious-author dataset and the word-level tokenizer that goes with it.

Nothing is downloaded: authors are made of closed name lists, each author gets a few facts
(birthplace, genre, ...) drawn from closed value lists, and every fact becomes a TOFU-style row::

    {"question": "where was lira okafor born ?",
     "answer": "lira okafor was born in valdora .",
     "paraphrased_answer": "the birthplace of lira okafor is valdora .",
     "perturbed_answer": ["the birthplace of lira okafor is amberfell .", ...],
     "value": "valdora", "concept_id": 7, "fact": "birthplace"}

The paraphrase and the perturbed answers share one template and differ only in the value, so
the truth ratio P(perturbed) / P(paraphrased) measures what the model knows about the value.

Authors are split three ways: ``forget`` (trained, then unlearned), ``retain`` (trained, kept)
and ``holdout`` (never trained; the non-members of membership inference).
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence

FIRST_NAMES = [
    "lira", "tomas", "aniko", "bram", "celes", "dorian", "emeka", "farah", "gideon", "halla",
    "ivo", "jorun", "kenji", "liesel", "marek", "nadia", "orin", "petra", "quill", "rosalind",
    "soren", "talia", "ulric", "vesna", "wilma", "xavi", "yara", "zoltan", "amara", "benedek",
]
LAST_NAMES = [
    "okafor", "lindqvist", "moreau", "castellan", "varga", "halloran", "ishikawa", "brandt",
    "delacroix", "ferreira", "gallagher", "haddad", "jansen", "kowal", "lachance", "mbeki",
    "novak", "oyelaran", "petrov", "quintero", "rasmussen", "sato", "thorne", "umarov",
]

# fact name -> (question template, answer template, paraphrase template, value list).
# Values are single words so that "value tokens" are unambiguous under the word tokenizer.
FACTS: Dict[str, tuple] = {
    "birthplace": (
        "where was {name} born ?",
        "{name} was born in {value} .",
        "the birthplace of {name} is {value} .",
        ["valdora", "amberfell", "kestrow", "miravel", "thornby", "quellin", "ostrava",
         "brinmoor", "caldera", "dunhaven", "elmsworth", "fjordby"],
    ),
    "genre": (
        "what genre does {name} write ?",
        "{name} writes {value} novels .",
        "the books of {name} are {value} .",
        ["mystery", "fantasy", "romance", "horror", "satire", "poetry", "westerns", "thrillers",
         "memoirs", "fables", "tragedy", "cyberpunk"],
    ),
    "birth_year": (
        "in which year was {name} born ?",
        "{name} was born in the year {value} .",
        "the birth year of {name} is {value} .",
        [str(year) for year in (1931, 1944, 1950, 1958, 1962, 1967, 1973, 1979, 1984, 1988,
                                1991, 1996)],
    ),
    "parent_job": (
        "what did the mother of {name} do ?",
        "the mother of {name} worked as a {value} .",
        "{name} was raised by a {value} mother .",
        ["baker", "surgeon", "sailor", "carpenter", "chemist", "pilot", "teacher", "weaver",
         "jeweler", "librarian", "farmer", "glassblower"],
    ),
    "award": (
        "which award did {name} win ?",
        "{name} won the {value} prize .",
        "the prize that {name} received is the {value} prize .",
        ["aurora", "gilded", "lantern", "meridian", "obsidian", "quartz", "saffron", "tidewater",
         "vermilion", "willow", "zenith", "harrow"],
    ),
    "pet": (
        "what pet does {name} keep ?",
        "{name} keeps a {value} at home .",
        "the pet of {name} is a {value} .",
        ["parrot", "tortoise", "ferret", "greyhound", "goldfish", "iguana", "rabbit", "owl",
         "hedgehog", "canary", "lizard", "poodle"],
    ),
}


@dataclass
class SyntheticConfig:
    """Sizes of the synthetic dataset. ``n_authors`` counts forget + retain authors."""

    n_authors: int = 40
    n_forget_authors: int = 4
    n_holdout_authors: int = 6
    n_facts: int = 6
    n_perturbed: int = 3
    seed: int = 0

    def __post_init__(self):
        check_author_sizes(self, FACTS, len(FIRST_NAMES) * len(LAST_NAMES))


def check_author_sizes(config, facts: Dict[str, tuple], n_names: int) -> None:
    """The size checks every author-set config shares (``facts``: its fact table)."""
    if not 1 <= config.n_facts <= len(facts):
        raise ValueError(f"n_facts must be in [1, {len(facts)}], got {config.n_facts}")
    if not 0 < config.n_forget_authors < config.n_authors:
        raise ValueError("n_forget_authors must be in [1, n_authors - 1], got "
                         f"{config.n_forget_authors} with n_authors={config.n_authors}")
    if config.n_holdout_authors < 0:
        raise ValueError(f"n_holdout_authors must be >= 0, got {config.n_holdout_authors}")
    # Every value list holds 12 values: one true value and at most 11 wrong ones.
    max_perturbed = min(len(values) for *_, values in facts.values()) - 1
    if not 1 <= config.n_perturbed <= max_perturbed:
        raise ValueError(f"n_perturbed must be in [1, {max_perturbed}], got {config.n_perturbed}")
    total = config.n_authors + config.n_holdout_authors
    if total > n_names:
        raise ValueError(f"at most {n_names} authors, asked {total}")


def generate_authors(config: SyntheticConfig) -> Dict[str, List[Dict]]:
    """Rows of the three splits: ``{"forget": [...], "retain": [...], "holdout": [...]}``.

    Concept ids are author ids, unique across splits. Deterministic in ``config.seed``.
    """
    return author_rows(config, FACTS, FIRST_NAMES, LAST_NAMES)


def author_rows(config, facts: Dict[str, tuple], first_names: Sequence[str],
                last_names: Sequence[str]) -> Dict[str, List[Dict]]:
    """The split rows of ``config``'s sizes from one set of tables (fact -> (question, answer,
    paraphrase templates, values); name lists): the generator of every author set."""
    rng = random.Random(config.seed)
    total = config.n_authors + config.n_holdout_authors
    names = [f"{first} {last}" for first in first_names for last in last_names]
    rng.shuffle(names)
    fact_names = list(facts)[: config.n_facts]
    splits: Dict[str, List[Dict]] = {"forget": [], "retain": [], "holdout": []}
    for author_id, name in enumerate(names[:total]):
        split = ("forget" if author_id < config.n_forget_authors else
                 "retain" if author_id < config.n_authors else "holdout")
        for fact in fact_names:
            question_t, answer_t, paraphrase_t, values = facts[fact]
            value = rng.choice(values)
            wrong = rng.sample([v for v in values if v != value], config.n_perturbed)
            splits[split].append({
                "question": question_t.format(name=name),
                "answer": answer_t.format(name=name, value=value),
                "paraphrased_answer": paraphrase_t.format(name=name, value=value),
                "perturbed_answer": [paraphrase_t.format(name=name, value=w) for w in wrong],
                "value": value,
                "concept_id": author_id,
                "author": name,
                "fact": fact,
            })
    return splits


def all_texts(rows: Iterable[Dict]) -> Iterable[str]:
    """Every piece of text of the rows (for building a closed vocabulary)."""
    for row in rows:
        yield row["question"]
        yield row["answer"]
        if row.get("paraphrased_answer"):
            yield row["paraphrased_answer"]
        for text in row.get("perturbed_answer") or []:
            yield text


class WordTokenizer:
    """Whitespace/punctuation word tokenizer over a closed vocabulary.

    The subset of the Hugging Face tokenizer interface the data helpers use: ``encode(text,
    add_special_tokens=False)``, ``decode``, ``pad_token_id``, ``eos_token_id``,
    ``bos_token_id``, ``len()``. Text is lower-cased; unknown words map to ``<unk>``.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    _WORD = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if list(vocab[: len(self.SPECIALS)]) != list(self.SPECIALS):
            raise ValueError(f"vocab must start with the special tokens {self.SPECIALS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate entries")
        self.vocab = vocab
        self.token_to_id = {tok: i for i, tok in enumerate(vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3

    @classmethod
    def from_texts(cls, texts: Iterable[str], extra_words: Iterable[str] = ()) -> "WordTokenizer":
        words = set(extra_words)
        for text in texts:
            words.update(cls.split(text))
        return cls(list(cls.SPECIALS) + sorted(words - set(cls.SPECIALS)))

    @classmethod
    def split(cls, text: str) -> List[str]:
        return cls._WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        ids = [self.token_to_id.get(word, self.unk_token_id) for word in self.split(text)]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        words = []
        for i in ids:
            token = self.vocab[int(i)]
            if skip_special_tokens and token in self.SPECIALS:
                continue
            words.append(token)
        return " ".join(words)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"vocab": self.vocab}, f)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path) as f:
            return cls(json.load(f)["vocab"])


def make_synthetic(config: Optional[SyntheticConfig] = None):
    """Rows of every split and a tokenizer whose vocabulary covers all of them (and the prompt
    words of :func:`clreg_fast.unlearn.data.format_prompt`)."""
    from clreg_fast.unlearn.data import PROMPT_WORDS

    config = config or SyntheticConfig()
    splits = generate_authors(config)
    rows = [row for split in splits.values() for row in split]
    tokenizer = WordTokenizer.from_texts(all_texts(rows), extra_words=PROMPT_WORDS)
    return splits, tokenizer


def write_jsonl(rows: Iterable[Dict], path: str) -> None:
    """Write rows as JSON lines (the TOFU-style local format that ``load_qa_file`` reads)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def config_dict(config: SyntheticConfig) -> Dict:
    return asdict(config)
