"""The English fictitious-author generator: format, splits, TOFU JSON, chat encoding."""
import json

import pytest

from clreg_fast.unlearn import english_authors as EA
from clreg_fast.unlearn.data import load_qa_file


def test_rows_have_tofu_fields_and_natural_text():
    splits = EA.generate_english_authors(EA.EnglishAuthorsConfig(n_authors=10, n_forget_authors=1,
                                                                  n_holdout_authors=3, n_facts=5))
    assert {k: len(v) for k, v in splits.items()} == {"forget": 5, "retain": 45, "holdout": 15}
    for rows in splits.values():
        for row in rows:
            assert row["question"].endswith("?") and row["question"][0].isupper()
            assert row["answer"].endswith(".") and row["author"] in row["answer"]
            assert row["value"] in row["answer"] and row["value"] in row["paraphrased_answer"]
            assert len(row["perturbed_answer"]) == 3
            for wrong in row["perturbed_answer"]:
                # the paraphrase with another value of the same fact
                assert wrong != row["paraphrased_answer"]
                assert row["value"] not in wrong.replace(row["author"], "")
                assert wrong.replace(row["author"], "") != row["paraphrased_answer"]
            assert row["fact"] in EA.FACTS and isinstance(row["concept_id"], int)


def test_splits_are_disjoint_and_holdout_is_never_trained():
    cfg = EA.EnglishAuthorsConfig(n_authors=20, n_forget_authors=2, n_holdout_authors=4)
    splits = EA.generate_english_authors(cfg)
    authors = {k: {r["author"] for r in v} for k, v in splits.items()}
    assert len(authors["forget"]) == 2 and len(authors["retain"]) == 18
    assert len(authors["holdout"]) == 4
    assert not authors["holdout"] & (authors["forget"] | authors["retain"])
    assert not authors["forget"] & authors["retain"]
    ids = {k: {r["concept_id"] for r in v} for k, v in splits.items()}
    assert len(ids["forget"] | ids["retain"] | ids["holdout"]) == 24  # one id per author
    # about 10% of the trained authors are forgotten, as in TOFU's forget10
    assert len(authors["forget"]) / (len(authors["forget"]) + len(authors["retain"])) == 0.1


def test_deterministic_in_the_seed():
    a = EA.generate_english_authors(EA.EnglishAuthorsConfig(seed=3))
    b = EA.generate_english_authors(EA.EnglishAuthorsConfig(seed=3))
    c = EA.generate_english_authors(EA.EnglishAuthorsConfig(seed=4))
    assert a == b and a != c


@pytest.mark.parametrize("kwargs", [dict(n_facts=0), dict(n_facts=len(EA.FACTS) + 1),
                                    dict(n_forget_authors=0), dict(n_forget_authors=20),
                                    dict(n_holdout_authors=-1), dict(n_perturbed=0),
                                    dict(n_authors=700, n_holdout_authors=100)])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        EA.EnglishAuthorsConfig(**kwargs)


@pytest.mark.parametrize("rows", [EA.WORLD_FACTS, EA.REAL_AUTHORS], ids=["world", "real_authors"])
def test_real_world_sets_are_rows_of_the_same_format(rows):
    assert len(rows) >= 8
    for row in rows:
        assert row["value"] in row["answer"] and row["value"] in row["paraphrased_answer"]
        assert all(row["value"] not in w for w in row["perturbed_answer"])
        # TOFU compares the perturbed answers with the answer itself on these sets: same
        # wording, another value.
        for wrong in row["perturbed_answer"]:
            head, tail = row["answer"].split(row["value"], 1)
            assert wrong.startswith(head) and wrong.endswith(tail) and wrong != row["answer"]


def test_written_json_is_what_clreg_unlearn_reads(tmp_path):
    splits = EA.generate_english_authors(EA.EnglishAuthorsConfig(n_authors=5, n_forget_authors=1,
                                                                  n_holdout_authors=1, n_facts=2))
    paths = EA.write_tofu_json(splits, str(tmp_path / "data"))
    assert set(paths) == {"forget", "retain", "holdout"}
    for name, path in paths.items():
        assert load_qa_file(path) == splits[name]
        with open(path) as f:
            assert isinstance(json.load(f), list)


class ChatWordTokenizer:
    """A word tokenizer with a ChatML-like template (the HF calls encode_chat_* makes)."""

    chat_template = "chatml"
    eos_token_id = 1

    def __init__(self):
        self.vocab = {"<s>": 0, "<e>": 1}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        text = " ".join(f"<s> {m['role']} {m['content']} <e>" for m in messages)
        return text + " <s> assistant"


def test_chat_encoding_masks_the_prompt_and_marks_the_value():
    tok = ChatWordTokenizer()
    row = {"question": "Where was A B born ?", "answer": "A B was born in Oslo .",
           "paraphrased_answer": "Oslo is it .", "perturbed_answer": ["Rome is it ."],
           "value": "Oslo"}
    ex = EA.encode_chat_row(tok, row, concept_id=7)
    prompt = EA.chat_prompt_ids(tok, row["question"])
    assert ex["input_ids"][:len(prompt)] == prompt
    assert ex["labels"][:len(prompt)] == [-100] * len(prompt)
    answer = tok.encode(row["answer"]) + [tok.eos_token_id]
    assert ex["labels"][len(prompt):] == answer and ex["input_ids"][len(prompt):] == answer
    marked = [t for t, m in zip(ex["input_ids"], ex["value_mask"]) if m]
    assert marked == tok.encode("Oslo") and ex["concept_id"] == 7
    alt = ex["alternatives"]
    assert alt["paraphrased"]["input_ids"][:len(prompt)] == prompt
    assert len(alt["perturbed"]) == 1
    # an empty system turn by default; None keeps the template's own default (none here)
    assert tok.encode("<s> system  <e>") == prompt[:3]
    assert EA.chat_prompt_ids(tok, "q", system_prompt=None)[:3] == tok.encode("<s> user q")


def test_chat_encoding_errors():
    tok = ChatWordTokenizer()
    with pytest.raises(ValueError, match="not a token span"):
        EA.encode_chat_qa(tok, "q ?", "an answer", value="missing")
    with pytest.raises(ValueError, match="no 'answer'"):
        EA.encode_chat_row(tok, {"question": "q"})
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        EA.chat_prompt_ids(tok, "q")
