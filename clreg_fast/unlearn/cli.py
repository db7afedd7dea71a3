"""``clreg-unlearn``: unlearn a question/answer forget set from a Hugging Face causal LM.

    clreg-unlearn --model PATH --forget forget.json --retain retain.json --out runs/npo \\
        --method npo --clreg-weight 0.5 --lr 1e-5 --epochs 5 --batch-size 32

    torchrun --nproc_per_node=8 -m clreg_fast.unlearn.cli --parallel fsdp ...

Every :class:`~clreg_fast.unlearn.train.UnlearnConfig` field is an option (``clreg_weight`` ->
``--clreg-weight``). Data files are TOFU-style JSON or JSON-lines rows
``{"question": ..., "answer": ...}`` with an optional concept field (``concept_id``,
``author_id`` or ``author``). The unlearned model and its tokenizer are written to
``OUT/final``; checkpoints to ``OUT/checkpoint-N``; metrics to ``OUT/metrics.{jsonl,csv}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Dict, List, Optional

from clreg_fast.unlearn.train import UnlearnConfig

# Options the CLI sets itself or that make no sense on the command line.
_SKIP = {"out_dir"}
_HELP = {
    "method": "unlearning objective",
    "clreg_weight": "weight of the CLReg term (0 = off)",
    "clreg_layer": "decoder layer of the CLReg features (-1 = last)",
    "clreg_pooling": "pool answer-token states by mean, last token, or keep every token",
    "clreg_proj_dim": "size of a trainable projection head before CLReg (default: none)",
    "clreg_negatives": "CLReg batch: local (one micro-batch per GPU) or global (every GPU's "
                       "micro-batch of the accumulation step, as one GPU with the whole batch)",
    "clreg_queue_size": "earlier retain rows kept as extra CLReg negatives (0 = no queue)",
    "batch_size": "forget examples per optimizer step over all ranks",
    "parallel": "none, or ddp/fsdp under torchrun",
    "resume": "resume from the newest checkpoint in --out (no value) or from PATH",
    "bf16": "auto, true or false",
    "rmu_train_layers": "comma-separated decoder layers RMU trains",
    "adam_betas": "two comma-separated floats",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool_or_auto(text: str):
    low = text.lower()
    if low in ("auto",):
        return "auto"
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto/true/false, got {text!r}")


def _int_list(text: str):
    return [int(x) for x in text.split(",") if x.strip()]


def _float_pair(text: str):
    values = [float(x) for x in text.split(",")]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated floats, got {text!r}")
    return tuple(values)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clreg-unlearn", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("model and data")
    io.add_argument("--model", required=True,
                    help="Hugging Face model directory or hub id, or a known name "
                         "(smollm2-135m: fetched once into ~/.cache/clreg_fast)")
    io.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    io.add_argument("--forget", required=True, help="forget set (JSON / JSONL)")
    io.add_argument("--retain", required=True, help="retain set (JSON / JSONL)")
    io.add_argument("--out", required=True, help="output directory")
    io.add_argument("--max-length", type=int, default=512, help="truncate examples to this")
    io.add_argument("--eval-examples", type=int, default=64,
                    help="forget/retain examples scored by the periodic evaluation")

    train = parser.add_argument_group("unlearning (UnlearnConfig)")
    hints = typing.get_type_hints(UnlearnConfig)
    for f in dataclasses.fields(UnlearnConfig):
        if f.name in _SKIP:
            continue
        default = f.default
        hint = hints[f.name]
        kwargs: Dict = {"default": default, "help": _HELP.get(f.name, f.name.replace("_", " "))}
        if f.name == "resume":
            kwargs.update(nargs="?", const=True, default=False, metavar="PATH")
        elif f.name == "bf16":
            kwargs["type"] = _parse_bool_or_auto
        elif f.name == "rmu_train_layers":
            kwargs["type"] = _int_list
        elif f.name == "adam_betas":
            kwargs["type"] = _float_pair
        elif hint is bool:
            if default:
                train.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                   action="store_false", help=f"disable {f.name}")
                continue
            kwargs = {"action": "store_true", "help": kwargs["help"]}
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:  # Optional[int] / Optional[float] / Optional[str]
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            kwargs["type"] = _optional(inner[0] if inner else str)
        choices = _choices(f.name)
        if choices:
            kwargs["choices"] = choices
        train.add_argument(_flag(f.name), dest=f.name, **kwargs)
    return parser


def _choices(name: str):
    from clreg_fast.unlearn import methods as M
    from clreg_fast.unlearn import train as T
    return {"method": M.METHODS, "parallel": T.PARALLEL, "lr_schedule": T.SCHEDULES,
            "optimizer": T.OPTIMIZERS, "clreg_pooling": ("mean", "last", "token"),
            "clreg_label_by": ("concept", "sequence"), "clreg_retain_source": ("model", "ref"),
            "clreg_fallback": ("one_concept", "skip"),
            "clreg_negatives": T.CLREG_NEGATIVES}.get(name)


def _nll_eval(examples_by_split: Dict[str, List[Dict]], pad_id: int):
    """eval_fn: mean answer-token NLL of a few forget and retain examples."""
    import torch

    from clreg_fast.unlearn.data import collate
    from clreg_fast.unlearn.methods import sequence_nll

    def evaluate(model):
        device = next(model.parameters()).device
        out = {}
        for split, examples in examples_by_split.items():
            total, count = 0.0, 0
            for start in range(0, len(examples), 8):
                batch = collate(examples[start:start + 8], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], use_cache=False).logits
                nll, n = sequence_nll(logits, batch["labels"])
                total += float(nll.sum())
                count += int(n.sum())
            out[f"{split}_nll"] = total / max(count, 1)
        return out

    return evaluate


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clreg_fast.unlearn.data import load_qa_examples
    from clreg_fast.unlearn.train import unlearn

    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    cfg = UnlearnConfig(out_dir=args.out, **{k: v for k, v in vars(args).items() if k in fields})

    from clreg_fast.unlearn.models import resolve_model

    model_path = resolve_model(args.model)  # a known name becomes its cached HF folder
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    load_kwargs = {}
    if cfg.attn_implementation:
        if cfg.attn_implementation == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
                load_kwargs["attn_implementation"] = "flash_attention_2"
            except ImportError:
                print("flash-attn is not installed; using the default attention", file=sys.stderr)
        else:
            load_kwargs["attn_implementation"] = cfg.attn_implementation
    # float32 master weights; bf16 compute comes from autocast / the FSDP policy.
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **load_kwargs)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32,
                                                     **load_kwargs)

    id_map: Dict = {}  # concept names -> ids, shared by both files
    forget = load_qa_examples(args.forget, tokenizer, max_length=args.max_length, id_map=id_map)
    retain = load_qa_examples(args.retain, tokenizer, max_length=args.max_length, id_map=id_map)
    eval_fn = None
    if cfg.eval_every:
        eval_fn = _nll_eval({"forget": forget[:args.eval_examples],
                             "retain": retain[:args.eval_examples]}, pad_id)
    history = unlearn(model, forget, retain, cfg, pad_id=pad_id, eval_fn=eval_fn)

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        final = os.path.join(args.out, "final")
        if cfg.save_final and os.path.isdir(final):
            tokenizer.save_pretrained(final)
        if history:
            print(json.dumps(history[-1]))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
