"""Question/answer examples for unlearning and the batch format the training loop consumes.

An example is a dict ``{"input_ids": [int], "labels": [int], "concept_id": int}`` where
``labels`` is -100 on prompt tokens (only answer tokens are learned or unlearned). Examples built
here also carry ``value_mask`` (1 on the answer tokens that spell the fact's value, the clearest
memorization signal on a small model) and, when the row has them, ``alternatives`` (the
paraphrased and perturbed answers encoded the same way, for the truth ratio).

Rows are TOFU-style dicts: ``question``, ``answer`` and optionally ``paraphrased_answer``,
``perturbed_answer`` (a string or a list), ``value`` (the span of the answer that is the fact)
and a concept id (``concept_id``, ``author_id`` or ``author``).
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100

# Words of the prompt template, so closed-vocabulary tokenizers can include them.
PROMPT_WORDS = ("question", "answer", ":")


def collate(examples: Sequence[Dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    The attention mask comes from the lengths, not from ``input_ids != pad_id``: with
    ``pad = eos`` the latter would hide the real EOS token at the end of each answer.
    When every example has a ``value_mask`` the batch gets a bool ``value_mask`` too.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    concept_ids = torch.as_tensor([int(ex.get("concept_id", 0)) for ex in examples], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "concept_ids": concept_ids}
    if examples and all("value_mask" in ex for ex in examples):
        value_mask = torch.zeros((batch, width), dtype=torch.bool)
        for row, (ex, n) in enumerate(zip(examples, lengths)):
            value_mask[row, :n] = torch.as_tensor(ex["value_mask"], dtype=torch.bool)
        out["value_mask"] = value_mask
    return out


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T) mask of answer tokens (the positions whose label is learned)."""
    return labels != IGNORE_INDEX


def format_prompt(question: str) -> str:
    """The prompt the answer follows (plain text, so any tokenizer can take it)."""
    return f"Question: {question}\nAnswer:"


def _find_last(haystack: Sequence[int], needle: Sequence[int]) -> int:
    for start in range(len(haystack) - len(needle), -1, -1):
        if list(haystack[start:start + len(needle)]) == list(needle):
            return start
    return -1


def encode_answer(tokenizer, text: str, value: Optional[str], eos: int) -> Tuple[List[int], List[int]]:
    """``(answer ids + [eos], value flags)``: the flags mark the last occurrence of ``value`` in
    the answer's tokens (with or without a leading space); without a value, every answer token
    but the EOS."""
    answer_ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not answer_ids:
        raise ValueError(f"answer {text.strip()!r} encodes to no tokens")
    flags = [1] * len(answer_ids)
    if value is not None:
        start, value_ids = -1, []
        for variant in (" " + value, value):
            value_ids = list(tokenizer.encode(variant, add_special_tokens=False))
            start = _find_last(answer_ids, value_ids) if value_ids else -1
            if start >= 0:
                break
        if start < 0:
            raise ValueError(f"value {value!r} is not a token span of answer {text.strip()!r}")
        flags = [int(start <= i < start + len(value_ids)) for i in range(len(answer_ids))]
    return answer_ids + [eos], flags + [0]


def encode_qa(tokenizer, question: str, answer: str, concept_id: int = 0,
              value: Optional[str] = None, max_length: Optional[int] = None) -> Dict:
    """Tokenize one question/answer pair into a training example.

    ``[bos] prompt answer eos``: labels are -100 on ``[bos] prompt`` and the token ids on
    ``answer eos``. ``value_mask`` marks the last occurrence of ``value`` in the answer; without
    a value it marks every answer token except the EOS. ``max_length`` truncates from the right.
    """
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TypeError("question and answer must be strings, got "
                        f"{type(question).__name__} and {type(answer).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; the answer must end with EOS")
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt_ids = ([bos] if bos is not None else []) + list(
        tokenizer.encode(format_prompt(question), add_special_tokens=False))
    answer_ids, value_flags = encode_answer(tokenizer, " " + answer, value, eos)
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    value_mask = [0] * len(prompt_ids) + value_flags
    if max_length is not None:
        if max_length <= len(prompt_ids):
            raise ValueError(f"max_length={max_length} leaves no answer token after a "
                             f"{len(prompt_ids)}-token prompt")
        input_ids, labels, value_mask = (input_ids[:max_length], labels[:max_length],
                                         value_mask[:max_length])
    return {"input_ids": input_ids, "labels": labels, "concept_id": int(concept_id),
            "value_mask": value_mask}


def _as_list(x) -> List[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def encode_row(tokenizer, row: Dict, concept_id: Optional[int] = None,
               max_length: Optional[int] = None) -> Dict:
    """Encode a TOFU-style row, with its paraphrased/perturbed answers as ``alternatives``.

    The alternatives carry no ``value`` (a paraphrase may phrase it differently); the truth
    ratio scores their whole answers.
    """
    for key in ("question", "answer"):
        if key not in row:
            raise ValueError(f"row has no {key!r} field: {sorted(row)}")
    cid = concept_id if concept_id is not None else int(row.get("concept_id", 0))
    ex = encode_qa(tokenizer, row["question"], row["answer"], cid, row.get("value"), max_length)
    paraphrased = row.get("paraphrased_answer")
    perturbed = _as_list(row.get("perturbed_answer"))
    if paraphrased or perturbed:
        def alt(text):
            return encode_qa(tokenizer, row["question"], text, cid, None, max_length)
        ex["alternatives"] = {
            "paraphrased": alt(paraphrased) if paraphrased else None,
            "perturbed": [alt(text) for text in perturbed],
        }
    return ex


def load_qa_file(path: str) -> List[Dict]:
    """Rows of a local JSON (a list, or ``{"data": [...]}``) or JSON-lines file."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is None or (path.endswith(".jsonl") and isinstance(data, dict) and "data" not in data):
        # JSON lines: one object per line (a one-line .jsonl file also parses as one object).
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: neither JSON nor JSON lines ({err})") from None
    else:
        rows = data["data"] if isinstance(data, dict) and "data" in data else data
        if isinstance(rows, dict):
            rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of JSON objects")
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}: row {i} lacks 'question' or 'answer' (keys: {sorted(row)})")
    return rows


def concept_ids_of(rows: Sequence[Dict], id_map: Optional[Dict] = None) -> List[int]:
    """Concept id per row from ``concept_id``, ``author_id`` or ``author`` (strings get
    consecutive ids in order of first appearance; pass ``id_map`` to share them across files).
    Rows with none of these fields all get concept 0."""
    id_map = {} if id_map is None else id_map
    out = []
    for row in rows:
        for key in ("concept_id", "author_id", "author"):
            if key in row:
                raw = row[key]
                break
        else:
            raw = 0
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise TypeError(f"concept id must be an int or a string, got {raw!r}")
        if isinstance(raw, int):
            out.append(raw)
        else:
            out.append(id_map.setdefault(raw, len(id_map)))
    return out


def build_examples(rows: Sequence[Dict], tokenizer, max_length: Optional[int] = None,
                   id_map: Optional[Dict] = None) -> List[Dict]:
    """Encode rows into examples (see :func:`encode_row`)."""
    cids = concept_ids_of(rows, id_map)
    return [encode_row(tokenizer, row, cid, max_length) for row, cid in zip(rows, cids)]


def load_qa_examples(path: str, tokenizer, max_length: Optional[int] = None,
                     id_map: Optional[Dict] = None) -> List[Dict]:
    """``build_examples(load_qa_file(path), tokenizer)``."""
    return build_examples(load_qa_file(path), tokenizer, max_length, id_map)
