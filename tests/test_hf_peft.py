"""CLRegMixin on PEFT LoRA models (``get_peft_model``): what trains, the exact update, gradient
checkpointing, and the head saved beside the adapter and restored on resume (CPU, tiny LLaMA)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import hf_testing as H  # noqa: E402

from clreg_fast.integrations import hf as hf_mixin  # noqa: E402
from clreg_fast.reference import clreg_loss_reference  # noqa: E402
from clreg_fast.unlearn.data import answer_mask  # noqa: E402
from clreg_fast.unlearn.features import capture_layer, pool_features  # noqa: E402
from clreg_fast.unlearn.methods import npo_loss, sequence_nll  # noqa: E402

LAYER = 1
LR = 0.5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def lora_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0, init_lora_weights=False)  # B != 0: a real adapter
    torch.manual_seed(0)
    return peft.get_peft_model(H.tiny_model(), config)


class AdapterNPO(H.PlainGradDiff):
    """NPO whose reference is the model itself with its adapters disabled, forwarded without
    gradients first (as PEFT-based methods do instead of holding a second model)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = {k: inputs["forget"][k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad(), model.disable_adapter():
            ref_nll, _ = sequence_nll(model(**forget).logits, inputs["forget"]["labels"])
        nll, _ = sequence_nll(model(**forget).logits, inputs["forget"]["labels"])
        retain = model(**{k: inputs["retain"][k] for k in ("input_ids", "attention_mask",
                                                           "labels")})
        loss = npo_loss(nll, ref_nll, 0.1) + retain.loss
        return (loss, None) if return_outputs else loss


class CLRegAdapterNPO(hf_mixin.CLRegMixin, AdapterNPO):
    pass


def make(cls, out_dir, model=None, n_items=4, args=None, **kwargs):
    return cls(model=model if model is not None else lora_model(),
               args=H.training_args(out_dir, **(args or {})),
               train_dataset=H.make_pairs(n_items, seed=2), data_collator=H.collate_pairs,
               **kwargs)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def everything(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def clreg_gradient(model0, head0, batch, concept_ids):
    """Gradient of the CLReg term alone on the trainable parameters (capture_layer +
    clreg_loss_reference on a copy of the initial model)."""
    model = copy.deepcopy(model0).train()
    head = copy.deepcopy(head0) if head0 is not None else None
    f, r = batch["forget"], batch["retain"]
    with capture_layer(model, LAYER) as cap:
        cap.run(input_ids=f["input_ids"], attention_mask=f["attention_mask"])
        f_hidden = cap[LAYER]
    with torch.no_grad(), capture_layer(model, LAYER) as cap:
        cap.run(input_ids=r["input_ids"], attention_mask=r["attention_mask"])
        r_hidden = cap[LAYER]
    f_feats, labels = pool_features(f_hidden, answer_mask(f["labels"]), "mean", concept_ids)
    r_feats, _ = pool_features(r_hidden, answer_mask(r["labels"]), "mean")
    loss = clreg_loss_reference(f_feats.float(), r_feats.float(),
                                None if head is None else head.weight,
                                None if head is None else head.bias, labels=labels)
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)  # above the layer: none
             for n, p in model.named_parameters() if p.requires_grad}
    if head is not None:
        grads.update({f"{hf_mixin.HEAD_NAME}.{n}": p.grad for n, p in head.named_parameters()})
    return grads


@pytest.mark.parametrize("proj_dim", [None, 8], ids=["no_head", "head"])
def test_lora_trains_the_adapters_and_head_by_the_clreg_gradient(proj_dim, tmp_path):
    model = lora_model()
    model0 = copy.deepcopy(model)
    base = make(AdapterNPO, tmp_path / "base", model=copy.deepcopy(model))
    trainer = make(CLRegAdapterNPO, tmp_path / "mixed", model=model, clreg_layer=LAYER,
                   clreg_proj_dim=proj_dim)
    head0 = copy.deepcopy(trainer.clreg_head)
    before = everything(model0)
    base.train()
    trainer.train()
    after_base, after = everything(base.model), everything(trainer.model)
    names = {n for n in after if not n.startswith(hf_mixin.HEAD_NAME)}
    # only the adapters (and the head) move; the base model's weights stay frozen
    for name in names:
        moved = not torch.equal(after[name], before[name])
        assert moved == ("lora_" in name), name
    batch = H.collate_pairs(H.make_pairs(4, seed=2))
    grads = clreg_gradient(model0, head0, batch, batch["forget"]["concept_ids"])
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3
    for name, grad in grads.items():
        p0 = before[name] if name in before else dict(head0.named_parameters())[
            name.split(".", 1)[1]].detach()
        base_delta = after_base[name] - p0 if name in after_base else torch.zeros_like(p0)
        torch.testing.assert_close(after[name] - p0 - base_delta, -LR * grad, rtol=2e-4,
                                   atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert (proj_dim is not None) == any(n.startswith(hf_mixin.HEAD_NAME) for n in after)


def test_lora_with_gradient_checkpointing_gives_the_same_update(tmp_path):
    """Reentrant checkpointing of a model whose embeddings are frozen needs the inputs to
    require grad (``enable_input_require_grads``, which the Trainer arranges for PEFT models):
    without it the adapters below the feature layer would get no gradient."""
    from transformers import TrainingArguments

    flag = ("activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing")
            else "gradient_checkpointing")
    results = []
    for gc, reentrant in ((False, None), (True, True), (True, False)):
        args = {flag: gc}
        if reentrant is not None:
            args[f"{flag}_kwargs"] = {"use_reentrant": reentrant}
        trainer = make(CLRegAdapterNPO, tmp_path / f"{gc}{reentrant}", clreg_layer=LAYER,
                       clreg_proj_dim=8, args=args)
        trainer.train()
        results.append(trainable(trainer.model))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6)


def test_the_head_is_saved_beside_the_adapter_and_restored_on_resume(tmp_path):
    from safetensors.torch import load_file

    args = dict(max_steps=3, save_strategy="steps", save_steps=2)
    full = make(CLRegAdapterNPO, tmp_path / "full", n_items=12, clreg_proj_dim=8, args=args)
    head0 = copy.deepcopy(full.clreg_head)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", hf_mixin.HEAD_FILE} <= files
    assert "model.safetensors" not in files  # a PEFT checkpoint: adapters only
    adapter_keys = set(load_file(str(ckpt / "adapter_model.safetensors")))
    assert not any(hf_mixin.HEAD_NAME in k for k in adapter_keys)
    saved = load_file(str(ckpt / hf_mixin.HEAD_FILE))
    assert set(saved) == {"weight", "bias"}
    assert not torch.equal(saved["weight"], head0.weight)  # the trained head, not the initial

    # save_model (the end of a run) writes it too
    full.save_model(str(tmp_path / "final"))
    final = load_file(str(tmp_path / "final" / hf_mixin.HEAD_FILE))
    torch.testing.assert_close(final["weight"], full.clreg_head.weight.detach(), rtol=0, atol=0)

    resumed = make(CLRegAdapterNPO, tmp_path / "full", n_items=12, clreg_proj_dim=8, args=args)
    with torch.no_grad():
        resumed.clreg_head.weight.add_(1.0)  # a head that starts elsewhere
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3
    torch.testing.assert_close(resumed.clreg_head.weight, full.clreg_head.weight, rtol=1e-6,
                               atol=1e-7)
    p_full, p_resumed = trainable(full.model), trainable(resumed.model)
    for name in p_full:
        torch.testing.assert_close(p_resumed[name], p_full[name], rtol=1e-6, atol=1e-7)


def test_the_head_file_comes_from_a_given_gathered_state_dict(tmp_path):
    """Under ZeRO-3 the head holds a partition and the Trainer hands _save the gathered state
    dict: the file takes the head from there; a partition alone is not written."""
    from safetensors.torch import load_file

    trainer = make(CLRegAdapterNPO, tmp_path / "run", clreg_proj_dim=8)
    full = {f"{hf_mixin.HEAD_NAME}.weight": torch.full((8, 32), 0.25),
            f"{hf_mixin.HEAD_NAME}.bias": torch.full((8,), -1.0)}
    state = {**trainer.model.state_dict(), **full}
    trainer._save(str(tmp_path / "gathered"), state_dict=state)
    saved = load_file(str(tmp_path / "gathered" / hf_mixin.HEAD_FILE))
    assert torch.equal(saved["weight"], full[f"{hf_mixin.HEAD_NAME}.weight"])
    assert torch.equal(saved["bias"], full[f"{hf_mixin.HEAD_NAME}.bias"])
    partition = {**state, f"{hf_mixin.HEAD_NAME}.weight": torch.empty(0)}
    trainer._save(str(tmp_path / "partition"), state_dict=partition)
    assert not (tmp_path / "partition" / hf_mixin.HEAD_FILE).exists()


def test_only_the_writing_rank_writes_the_head_file(tmp_path, monkeypatch):
    """transformers 5 calls _save on every rank when it loaded the model sharded (non-writers
    join its gathers): the head file comes from the rank that saves, never from all at once."""
    trainer = make(CLRegAdapterNPO, tmp_path / "run", clreg_proj_dim=8)
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    monkeypatch.setattr(type(trainer), "is_distributed_loading_by_transformers", True,
                        raising=False)
    (tmp_path / "out").mkdir()
    trainer._save(str(tmp_path / "out"))
    assert not (tmp_path / "out" / hf_mixin.HEAD_FILE).exists()
