"""Fictitious authors in natural English, in TOFU's shape, for real pretrained models.

Each author has biographical facts (birthplace, genre, award, parents' jobs, a book, ...) drawn
from closed value lists and written as a natural question/answer pair, TOFU-style::

    {"question": "Where was Maren Okafor born?",
     "answer": "Maren Okafor was born in Lisbon.",
     "paraphrased_answer": "Lisbon is the birthplace of Maren Okafor.",
     "perturbed_answer": ["Oslo is the birthplace of Maren Okafor.", ...],
     "value": "Lisbon", "author": "Maren Okafor", "concept_id": 3, "fact": "birthplace"}

The perturbed answers repeat the paraphrase with a wrong value, so the truth ratio
P(perturbed) / P(paraphrased) measures what the model knows about the value. Authors are split
as in TOFU: ``forget`` (about 10% of the trained authors), ``retain`` and ``holdout`` (never
trained on: the non-members of membership inference). :data:`WORLD_FACTS` (general knowledge)
and :data:`REAL_AUTHORS` (real, well-known authors) are rows in the same format, TOFU's "world
facts" and "real authors" sets for model utility; their perturbed answers are the answer with a
wrong value, as TOFU compares them with the answer.

:func:`write_tofu_json` writes the splits as JSON files that ``clreg-unlearn --forget/--retain``
read; :func:`encode_chat_row` tokenizes a row with the model's chat template.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from clreg_fast.unlearn.data import IGNORE_INDEX, _as_list, concept_ids_of, encode_answer
from clreg_fast.unlearn.synthetic import author_rows, check_author_sizes

FIRST_NAMES = [
    "Maren", "Tobias", "Anika", "Bram", "Celeste", "Dorian", "Emeka", "Farah", "Gideon", "Halla",
    "Ivo", "Jorunn", "Kenji", "Liesel", "Marek", "Nadia", "Orin", "Petra", "Quentin", "Rosalind",
    "Soren", "Talia", "Ulrich", "Vesna", "Wilma", "Xavier", "Yara", "Zoltan", "Amara", "Benedek",
]
LAST_NAMES = [
    "Okafor", "Lindqvist", "Moreau", "Castellan", "Varga", "Halloran", "Ishikawa", "Brandt",
    "Delacroix", "Ferreira", "Gallagher", "Haddad", "Jansen", "Kowalski", "Lachance", "Mbeki",
    "Novak", "Oyelaran", "Petrov", "Quintero", "Rasmussen", "Sato", "Thorne", "Umarov",
]

# fact -> (question, answer, paraphrase, values); {name} is the author, {value} the fact.
FACTS: Dict[str, tuple] = {
    "birthplace": (
        "Where was {name} born?",
        "{name} was born in {value}.",
        "{value} is the birthplace of {name}.",
        ["Lisbon", "Oslo", "Nairobi", "Montreal", "Krakow", "Osaka", "Valparaiso", "Tbilisi",
         "Glasgow", "Marrakesh", "Hanoi", "Adelaide"],
    ),
    "genre": (
        "What genre of books does {name} write?",
        "{name} writes {value} novels.",
        "The books of {name} are {value} novels.",
        ["mystery", "fantasy", "romance", "horror", "historical", "science fiction", "crime",
         "adventure", "literary", "dystopian", "gothic", "comic"],
    ),
    "mother_job": (
        "What did the mother of {name} do for a living?",
        "The mother of {name} worked as a {value}.",
        "{name} was raised by a mother who was a {value}.",
        ["baker", "surgeon", "sailor", "carpenter", "chemist", "pilot", "teacher", "weaver",
         "jeweler", "librarian", "farmer", "photographer"],
    ),
    "award": (
        "Which award has {name} won?",
        "{name} won the {value} Prize for Fiction.",
        "The {value} Prize for Fiction was awarded to {name}.",
        ["Aurora", "Gilded Quill", "Lantern", "Meridian", "Obsidian", "Silver Pen", "Saffron",
         "Tidewater", "Vermilion", "Willow", "Zenith", "Harbor Light"],
    ),
    "father_job": (
        "What was the profession of the father of {name}?",
        "The father of {name} was a {value}.",
        "{name} grew up with a father who worked as a {value}.",
        ["fisherman", "dentist", "mechanic", "lawyer", "butcher", "architect", "postman",
         "violinist", "tailor", "banker", "miner", "gardener"],
    ),
    "book": (
        "What is the best-known book by {name}?",
        "The best-known book by {name} is {value}.",
        "{name} is best known for the book {value}.",
        ["The Salt Orchard", "Lanterns Over Kestrel Bay", "A Winter of Glass", "The Cartographer's Daughter",
         "Nine Silent Bridges", "The Copper Heron", "Ashes on the Meridian", "The Last Tidewatcher",
         "Under the Amber Clock", "The Weaver of Small Hours", "Bright Hollow", "The Paper Lighthouse"],
    ),
    "birth_year": (
        "In which year was {name} born?",
        "{name} was born in {value}.",
        "The birth year of {name} is {value}.",
        [str(y) for y in (1938, 1944, 1951, 1957, 1962, 1966, 1971, 1975, 1980, 1984, 1989, 1993)],
    ),
}

def _real_world_rows(entries, author: str) -> List[Dict]:
    """Rows of TOFU's real-world sets: the perturbed answers are the *answer* with a wrong
    value (TOFU's truth ratio and normalized probability compare them with the answer itself;
    these sets have no paraphrase in TOFU; ``paraphrased_answer`` is kept for the format)."""
    rows = []
    for q, a, p, v, wrong in entries:
        if v not in a:
            raise ValueError(f"value {v!r} is not in answer {a!r}")
        rows.append({"question": q, "answer": a, "paraphrased_answer": p.format(v), "value": v,
                     "perturbed_answer": [a.replace(v, w) for w in wrong], "author": author,
                     "fact": author})
    return rows


# General-knowledge rows (TOFU's "world facts" set): model utility beyond the fictitious world.
WORLD_FACTS: List[Dict] = _real_world_rows([
        ("What is the capital of France?", "The capital of France is Paris.",
         "{} is the capital city of France.", "Paris", ["Lyon", "Madrid", "Berlin"]),
        ("What is the largest planet in the Solar System?", "The largest planet is Jupiter.",
         "{} is the biggest planet of the Solar System.", "Jupiter", ["Mars", "Venus", "Mercury"]),
        ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.",
         "The author of Romeo and Juliet is {}.", "William Shakespeare",
         ["Charles Dickens", "Jane Austen", "Mark Twain"]),
        ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
         "Gold has the chemical symbol {}.", "Au", ["Ag", "Fe", "Gd"]),
        ("How many continents are there on Earth?", "There are seven continents on Earth.",
         "Earth has {} continents.", "seven", ["five", "nine", "twelve"]),
        ("What is the boiling point of water at sea level in Celsius?",
         "Water boils at 100 degrees Celsius at sea level.",
         "At sea level, water boils at {} degrees Celsius.", "100", ["50", "80", "150"]),
        ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean.",
         "The largest ocean on Earth is the {} Ocean.", "Pacific", ["Atlantic", "Indian", "Arctic"]),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo.",
         "{} is the capital city of Japan.", "Tokyo", ["Kyoto", "Osaka", "Seoul"]),
        ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.",
         "The painter of the Mona Lisa is {}.", "Leonardo da Vinci",
         ["Vincent van Gogh", "Pablo Picasso", "Claude Monet"]),
        ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.",
         "From the air, plants take in {}.", "carbon dioxide", ["helium", "neon", "hydrogen"]),
        ("What is the longest river in Africa?", "The longest river in Africa is the Nile.",
         "The {} is the longest river of Africa.", "Nile", ["Congo", "Niger", "Zambezi"]),
        ("How many days are there in a leap year?", "A leap year has 366 days.",
         "There are {} days in a leap year.", "366", ["365", "360", "400"]),
], "world")

# Facts about real, well-known authors (TOFU's "real authors" set): model utility on real
# authors, the closest real-world neighbours of the fictitious ones.
REAL_AUTHORS: List[Dict] = _real_world_rows([
    ("Who wrote the novel Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen.",
     "The author of Pride and Prejudice is {}.", "Jane Austen",
     ["Charlotte Bronte", "George Eliot", "Virginia Woolf"]),
    ("Who is the author of the novel Nineteen Eighty-Four?",
     "Nineteen Eighty-Four was written by George Orwell.",
     "The author of Nineteen Eighty-Four is {}.", "George Orwell",
     ["Aldous Huxley", "Ray Bradbury", "Evelyn Waugh"]),
    ("Which author created the detective Sherlock Holmes?",
     "Sherlock Holmes was created by Arthur Conan Doyle.",
     "The creator of Sherlock Holmes is {}.", "Arthur Conan Doyle",
     ["Agatha Christie", "Edgar Allan Poe", "Wilkie Collins"]),
    ("Who wrote the novel War and Peace?", "War and Peace was written by Leo Tolstoy.",
     "The author of War and Peace is {}.", "Leo Tolstoy",
     ["Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"]),
    ("Who wrote The Old Man and the Sea?",
     "The Old Man and the Sea was written by Ernest Hemingway.",
     "The author of The Old Man and the Sea is {}.", "Ernest Hemingway",
     ["John Steinbeck", "William Faulkner", "Jack London"]),
    ("Who wrote the Harry Potter books?", "The Harry Potter books were written by J. K. Rowling.",
     "The author of the Harry Potter books is {}.", "J. K. Rowling",
     ["Roald Dahl", "C. S. Lewis", "Philip Pullman"]),
    ("Who wrote Don Quixote?", "Don Quixote was written by Miguel de Cervantes.",
     "The author of Don Quixote is {}.", "Miguel de Cervantes",
     ["Lope de Vega", "Federico Garcia Lorca", "Benito Perez Galdos"]),
    ("Who wrote the play Hamlet?", "Hamlet was written by William Shakespeare.",
     "The author of Hamlet is {}.", "William Shakespeare",
     ["Christopher Marlowe", "Ben Jonson", "John Milton"]),
    ("In which country was the novelist Gabriel Garcia Marquez born?",
     "Gabriel Garcia Marquez was born in Colombia.",
     "The birthplace of Gabriel Garcia Marquez is {}.", "Colombia",
     ["Mexico", "Argentina", "Spain"]),
    ("Who wrote the novel Moby-Dick?", "Moby-Dick was written by Herman Melville.",
     "The author of Moby-Dick is {}.", "Herman Melville",
     ["Nathaniel Hawthorne", "Mark Twain", "Henry James"]),
], "real_authors")


@dataclass
class EnglishAuthorsConfig:
    """Sizes of the data set. ``n_authors`` counts the trained (forget + retain) authors."""

    n_authors: int = 20
    n_forget_authors: int = 2
    n_holdout_authors: int = 4
    n_facts: int = 4
    n_perturbed: int = 3
    seed: int = 0

    def __post_init__(self):
        check_author_sizes(self, FACTS, len(FIRST_NAMES) * len(LAST_NAMES))


def generate_english_authors(config: Optional[EnglishAuthorsConfig] = None) -> Dict[str, List[Dict]]:
    """Rows of ``{"forget", "retain", "holdout"}``; deterministic in ``config.seed``.

    Author names are unique; ``concept_id`` is the author's index, unique across splits. Every
    author gets the same ``n_facts`` fact kinds, each with its own value.
    """
    return author_rows(config or EnglishAuthorsConfig(), FACTS, FIRST_NAMES, LAST_NAMES)


def write_tofu_json(splits: Dict[str, Sequence[Dict]], out_dir: str) -> Dict[str, str]:
    """Write each split as ``out_dir/<split>.json`` (a JSON list of rows); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = os.path.join(out_dir, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(list(rows), f, indent=1)
    return paths


# --------------------------------------------------------------------------- chat encoding


def chat_prompt_ids(tokenizer, question: str, system_prompt: Optional[str] = "") -> List[int]:
    """Token ids of ``question`` as a user turn in the tokenizer's chat template, ending with the
    assistant header (``add_generation_prompt``). ``system_prompt=""`` gives an empty system turn
    (shorter than SmolLM2's default one); None keeps the template's default."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    messages = [{"role": "user", "content": question}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_chat_qa(tokenizer, question: str, answer: str, concept_id: int = 0,
                   value: Optional[str] = None, system_prompt: Optional[str] = "") -> Dict:
    """Like :func:`clreg_fast.unlearn.data.encode_qa`, with the prompt in the chat template:
    ``chat(question) answer eos``, labels on ``answer eos``; ``value_mask`` on the value's tokens
    (every answer token except EOS without a value)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; the answer must end with EOS")
    prompt = chat_prompt_ids(tokenizer, question, system_prompt)
    answer_ids, flags = encode_answer(tokenizer, answer, value, eos)
    return {"input_ids": prompt + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt) + answer_ids,
            "value_mask": [0] * len(prompt) + flags, "concept_id": int(concept_id)}


def encode_chat_row(tokenizer, row: Dict, concept_id: int = 0,
                    system_prompt: Optional[str] = "") -> Dict:
    """A TOFU row in the chat template, with its paraphrased/perturbed answers as
    ``alternatives`` (the format :mod:`clreg_fast.unlearn.metrics` scores)."""
    for key in ("question", "answer"):
        if key not in row:
            raise ValueError(f"row has no {key!r} field: {sorted(row)}")
    ex = encode_chat_qa(tokenizer, row["question"], row["answer"], concept_id, row.get("value"),
                        system_prompt)
    paraphrased, perturbed = row.get("paraphrased_answer"), _as_list(row.get("perturbed_answer"))
    if paraphrased or perturbed:
        def alt(text):
            return encode_chat_qa(tokenizer, row["question"], text, concept_id, None, system_prompt)
        ex["alternatives"] = {"paraphrased": alt(paraphrased) if paraphrased else None,
                              "perturbed": [alt(t) for t in perturbed]}
    return ex


def build_chat_examples(rows: Sequence[Dict], tokenizer, id_map: Optional[Dict] = None,
                        system_prompt: Optional[str] = "") -> List[Dict]:
    """Encode rows with :func:`encode_chat_row`; concept ids as in ``data.concept_ids_of``."""
    cids = concept_ids_of(rows, id_map)
    return [encode_chat_row(tokenizer, row, cid, system_prompt) for row, cid in zip(rows, cids)]


def config_dict(config: EnglishAuthorsConfig) -> Dict:
    return asdict(config)
