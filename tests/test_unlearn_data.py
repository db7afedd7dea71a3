"""TOFU-format loading, prompt masking, value masks, the synthetic dataset and its tokenizer."""
import json

import pytest
import torch

from clreg_fast.unlearn.data import (IGNORE_INDEX, answer_mask, build_examples, collate,
                                     concept_ids_of, encode_qa, encode_row, load_qa_examples,
                                     load_qa_file)
from clreg_fast.unlearn.synthetic import (SyntheticConfig, WordTokenizer, generate_authors,
                                          make_synthetic, write_jsonl)


@pytest.fixture
def tok():
    return WordTokenizer.from_texts(["who wrote the book ? ann wrote it . bob did not ."],
                                    extra_words=["question", "answer", ":"])


def test_encode_qa_masks_prompt_and_appends_eos(tok):
    ex = encode_qa(tok, "who wrote the book ?", "ann wrote it .", concept_id=3, value="ann")
    prompt = [tok.bos_token_id] + tok.encode("question : who wrote the book ? answer :")
    answer = tok.encode("ann wrote it .") + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + answer
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert ex["value_mask"] == [0] * len(prompt) + [1, 0, 0, 0, 0]
    assert ex["concept_id"] == 3
    # without a value: every answer token but the EOS
    ex = encode_qa(tok, "who wrote the book ?", "ann wrote it .")
    assert ex["value_mask"] == [0] * len(prompt) + [1, 1, 1, 1, 0]


def test_value_mask_takes_last_occurrence_and_spans(tok):
    ex = encode_qa(tok, "who ?", "it . it .", value="it .")
    n_prompt = ex["labels"].count(IGNORE_INDEX)
    assert ex["value_mask"][n_prompt:] == [0, 0, 1, 1, 0]


def test_encode_qa_errors(tok):
    with pytest.raises(ValueError, match="value"):
        encode_qa(tok, "who ?", "ann wrote it .", value="bob")
    with pytest.raises(TypeError, match="question and answer"):
        encode_qa(tok, "who ?", 3)
    with pytest.raises(ValueError, match="max_length"):
        encode_qa(tok, "who wrote the book ?", "ann .", max_length=3)


def test_max_length_truncates_consistently(tok):
    ex = encode_qa(tok, "who ?", "ann wrote it .", value="it", max_length=8)
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["value_mask"]) == 8


def test_collate_batches_value_mask_and_keeps_eos(tok):
    a = encode_qa(tok, "who ?", "ann wrote it .", value="ann", concept_id=1)
    b = encode_qa(tok, "who wrote the book ?", "bob .", value="bob", concept_id=2)
    # pad = eos: the mask must still cover the real EOS of each row
    batch = collate([a, b], pad_id=tok.eos_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(a["input_ids"]), len(b["input_ids"])]
    assert batch["concept_ids"].tolist() == [1, 2]
    assert batch["value_mask"].dtype == torch.bool
    assert batch["value_mask"].sum().item() == 2
    assert (batch["labels"][batch["value_mask"]] == torch.tensor(
        [tok.encode("ann")[0], tok.encode("bob")[0]])).all()
    assert answer_mask(batch["labels"]).sum().item() == 5 + 3  # "ann wrote it ." + eos, "bob ." + eos
    # examples without value_mask: no key, the loop's batch format is unchanged
    plain = [{k: v for k, v in a.items() if k != "value_mask"}, b]
    assert "value_mask" not in collate(plain, 0)


def test_load_json_and_jsonl(tmp_path, tok):
    rows = [{"question": "who wrote the book ?", "answer": "ann wrote it .", "author": "ann",
             "paraphrased_answer": "it . ann wrote", "perturbed_answer": "bob wrote it ."},
            {"question": "who ?", "answer": "bob did not .", "author": "bob",
             "perturbed_answer": ["ann did not .", "it did not ."]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("a.json", "b.json", "c.jsonl"):
        assert load_qa_file(str(tmp_path / name)) == rows
    ex = load_qa_examples(str(tmp_path / "c.jsonl"), tok)
    assert [e["concept_id"] for e in ex] == [0, 1]
    assert ex[0]["alternatives"]["paraphrased"]["labels"][-1] == tok.eos_token_id
    assert len(ex[0]["alternatives"]["perturbed"]) == 1
    assert ex[1]["alternatives"]["paraphrased"] is None
    assert len(ex[1]["alternatives"]["perturbed"]) == 2
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="answer"):
        load_qa_file(str(tmp_path / "bad.json"))


def test_concept_ids_of():
    rows = [{"author": "x"}, {"author": "y"}, {"author": "x"}, {"concept_id": 7}, {}]
    shared = {}
    assert concept_ids_of(rows, shared) == [0, 1, 0, 7, 0]
    assert concept_ids_of([{"author": "y"}, {"author": "z"}], shared) == [1, 2]
    with pytest.raises(TypeError):
        concept_ids_of([{"concept_id": 1.5}])


def test_works_with_a_hf_style_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["Question", "Answer", ":", "who", "?", "ann", "wrote", "it", ".", "[UNK]", "<s>", "</s>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                              eos_token="</s>", unk_token="[UNK]")
    ex = encode_qa(hf, "who ?", "ann wrote it .", value="ann")
    assert ex["input_ids"][0] == hf.bos_token_id and ex["input_ids"][-1] == hf.eos_token_id
    n_prompt = ex["labels"].count(IGNORE_INDEX)
    assert hf.decode(ex["input_ids"][n_prompt:-1]) == "ann wrote it ."
    assert ex["value_mask"][n_prompt:] == [1, 0, 0, 0, 0]


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_splits_and_determinism():
    cfg = SyntheticConfig(n_authors=10, n_forget_authors=2, n_holdout_authors=3, n_facts=4,
                          n_perturbed=2, seed=5)
    a, b = generate_authors(cfg), generate_authors(cfg)
    assert a == b
    assert generate_authors(SyntheticConfig(n_authors=10, n_forget_authors=2, seed=6)) != a
    assert [len(a[s]) for s in ("forget", "retain", "holdout")] == [8, 32, 12]
    authors = {s: {r["concept_id"] for r in a[s]} for s in a}
    assert len(authors["forget"]) == 2 and len(authors["retain"]) == 8
    assert not (authors["forget"] & authors["retain"]) and not (authors["holdout"] & authors["retain"])
    for row in a["forget"]:
        assert row["value"] in row["answer"].split() and row["value"] in row["paraphrased_answer"].split()
        assert len(row["perturbed_answer"]) == 2
        for wrong in row["perturbed_answer"]:
            assert row["value"] not in wrong.split()
            # the perturbed answers differ from the paraphrase only in the value
            assert len(wrong.split()) == len(row["paraphrased_answer"].split())


def test_synthetic_examples_roundtrip(tmp_path):
    splits, tok = make_synthetic(SyntheticConfig(n_authors=6, n_forget_authors=2,
                                                 n_holdout_authors=1, seed=0))
    ex = build_examples(splits["forget"], tok)
    for row, e in zip(splits["forget"], ex):
        values = [t for t, m in zip(e["input_ids"], e["value_mask"]) if m]
        assert tok.decode(values) == row["value"]
        assert tok.unk_token_id not in e["input_ids"]
        assert e["concept_id"] == row["concept_id"]
        assert e["alternatives"]["paraphrased"] is not None
    # the TOFU-style files written for the rows read back to the same examples
    write_jsonl(splits["forget"], str(tmp_path / "forget.jsonl"))
    assert load_qa_examples(str(tmp_path / "forget.jsonl"), tok) == ex
    tok.save(str(tmp_path / "tok.json"))
    assert WordTokenizer.load(str(tmp_path / "tok.json")).vocab == tok.vocab


def test_word_tokenizer():
    tok = WordTokenizer.from_texts(["Hello, world!"])
    ids = tok.encode("hello world , zzz", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.unk_token_id
    assert tok.decode(ids) == "hello world ,"
    with pytest.raises(ValueError, match="special"):
        WordTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="n_forget_authors"):
        SyntheticConfig(n_authors=3, n_forget_authors=3)
    with pytest.raises(ValueError, match="n_facts"):
        SyntheticConfig(n_facts=99)


def test_load_edge_cases(tmp_path):
    row = {"question": "q ?", "answer": "a ."}
    (tmp_path / "one.jsonl").write_text(json.dumps(row) + "\n")
    assert load_qa_file(str(tmp_path / "one.jsonl")) == [row]
    (tmp_path / "pretty.json").write_text(json.dumps({"data": [row, row]}, indent=0))
    assert load_qa_file(str(tmp_path / "pretty.json")) == [row, row]
    (tmp_path / "broken.json").write_text('{"question": ')
    with pytest.raises(ValueError, match="neither JSON"):
        load_qa_file(str(tmp_path / "broken.json"))
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list of JSON objects"):
        load_qa_file(str(tmp_path / "nums.json"))
