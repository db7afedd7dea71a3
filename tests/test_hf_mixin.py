"""CLRegMixin on a real ``transformers.Trainer`` with a tiny random-init LLaMA (CPU).

The base trainers (``tests/dist_scripts/hf_testing.py``) follow OpenUnlearning's method
contract: a GradDiff-like one and an NPO-like one with a frozen reference model. Expected values
come from ``capture_layer`` and ``clreg_loss_reference`` on copies of the initial model, never
from the mixin itself.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from tests._torchrun import run_torchrun

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import hf_testing as H  # noqa: E402

from clreg_fast.integrations import hf as hf_mixin  # noqa: E402
from clreg_fast.reference import clreg_loss_reference  # noqa: E402
from clreg_fast.unlearn.data import answer_mask  # noqa: E402
from clreg_fast.unlearn.features import capture_layer, pool_features  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def recording(cls):
    """``cls`` with its ``_clreg_term`` inputs recorded (the hidden states the mixin captured)."""

    class Recording(cls):
        def _clreg_term(self, forget_hidden, forget, concept_ids, retain_hidden, retain):
            self.records.append({
                "forget_hidden": forget_hidden.detach().clone(),
                "retain_hidden": None if retain_hidden is None else retain_hidden.detach().clone(),
                "forget": {k: v.clone() for k, v in forget.items()},
                "retain": {k: v.clone() for k, v in retain.items()},
                "concept_ids": None if concept_ids is None else concept_ids.clone(),
            })
            return super()._clreg_term(forget_hidden, forget, concept_ids, retain_hidden, retain)

    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording


def make_trainer(cls, tmp_path, n_items=4, model=None, args=None, data_seed=0, concepts=2,
                 **kwargs):
    model = H.tiny_model() if model is None else model
    args = args if args is not None else {}
    trainer = cls(model=model, args=H.training_args(tmp_path / cls.__name__, **args),
                  train_dataset=H.make_pairs(n_items, seed=data_seed, concepts=concepts),
                  data_collator=H.collate_pairs, **kwargs)
    trainer.records = []
    return trainer


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def count_forwards(*modules):
    counts = [0] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def hook(_m, _a, i=i):
            counts[i] += 1
        handles.append(module.register_forward_pre_hook(hook))
    return counts, handles


def expected_clreg(model0, head0, records, layer, pooling, temperature, use_labels):
    """CLReg loss and gradients on ``model0`` (and ``head0``) for the recorded micro-batches,
    averaged over them, from capture_layer + pool_features + clreg_loss_reference."""
    model = copy.deepcopy(model0).train()
    head = copy.deepcopy(head0) if head0 is not None else None
    total, values = 0.0, []
    for rec in records:
        f, r = rec["forget"], rec["retain"]
        with capture_layer(model, layer) as cap:
            cap.run(input_ids=f["input_ids"], attention_mask=f["attention_mask"])
            f_hidden = cap[layer]
        with torch.no_grad(), capture_layer(model, layer) as cap:
            cap.run(input_ids=r["input_ids"], attention_mask=r["attention_mask"])
            r_hidden = cap[layer]
        labels = rec["concept_ids"] if use_labels else None
        f_feats, f_labels = pool_features(f_hidden, answer_mask(f["labels"]), pooling, labels)
        r_feats, _ = pool_features(r_hidden, answer_mask(r["labels"]), pooling)
        loss = clreg_loss_reference(f_feats.float(), r_feats.float(),
                                    None if head is None else head.weight,
                                    None if head is None else head.bias,
                                    labels=f_labels if use_labels else None,
                                    temperature=temperature)
        values.append(float(loss.detach()))
        total = total + loss / len(records)
    total.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    if head is not None:
        grads.update({f"{hf_mixin.HEAD_NAME}.{n}": p.grad for n, p in head.named_parameters()})
    return values, grads


def layer_output(model, layer, batch):
    with torch.no_grad(), capture_layer(model, layer) as cap:
        cap.run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return cap[layer]


def assert_same_forward(actual, expected):
    """Two float32 forwards of the same model on the same batch. A training forward (grad on)
    and a no-grad one may pick other attention/matmul kernels, whose reduction order differs by
    library version (transformers 5.25 vs 5.24), so a few float32 ulps of the largest value are
    allowed: far below what another layer, batch or model gives."""
    assert actual.dtype == expected.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0,
                               atol=16 * torch.finfo(torch.float32).eps * scale)


# ----------------------------------------------------------------------------- import

def test_import_clreg_fast_and_the_mixin_without_transformers():
    script = ("import sys; sys.modules['transformers'] = None\n"
              "import clreg_fast, clreg_fast.integrations\n"
              "from clreg_fast.integrations.hf import CLRegMixin\n"
              "print('ok')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lazy = subprocess.run([sys.executable, "-c", "import sys, clreg_fast; "
                           "print('clreg_fast.integrations' in sys.modules)"],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert lazy.stdout.strip() == "False", lazy.stderr[-3000:]


# ----------------------------------------------------------------------------- capture

@pytest.mark.parametrize("cls", [H.CLRegGradDiff, H.CLRegNPO, H.CLRegSelfReference],
                         ids=["graddiff", "npo", "self_reference"])
def test_captured_features_equal_capture_layer_on_the_same_batch(cls, tmp_path):
    model = H.tiny_model()
    model0 = copy.deepcopy(model).train()
    trainer = make_trainer(recording(cls), tmp_path, model=model, clreg_layer=1)
    if hasattr(trainer, "ref_model"):
        # a reference that differs from the trained model, so its features could not pass
        with torch.no_grad():
            for p in trainer.ref_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    trainer.train()
    assert len(trainer.records) == 1
    rec = trainer.records[0]
    for side in ("forget", "retain"):
        expected = layer_output(model0, 1, rec[side])
        assert_same_forward(rec[f"{side}_hidden"], expected)
    # the concept ids were taken out of the batch before the base trainer saw it
    assert "concept_ids" not in rec["forget"]
    assert rec["concept_ids"] is not None
    # The tolerance still tells the features apart from those of another layer, of another
    # batch (rows in another order) and of the reference model.
    forget = rec["forget"]
    wrong = {"layer 0": layer_output(model0, 0, forget),
             "another batch": layer_output(model0, 1, {k: v.flip(0) for k, v in forget.items()})}
    if hasattr(trainer, "ref_model"):
        wrong["reference model"] = layer_output(trainer.ref_model, 1, forget)
    for what, features in wrong.items():
        with pytest.raises(AssertionError):  # "DID NOT RAISE": `what` passed as the same forward
            assert_same_forward(rec["forget_hidden"], features)


@pytest.mark.parametrize("plain, mixed", [(H.PlainGradDiff, H.CLRegGradDiff),
                                          (H.NPOLike, H.CLRegNPO)], ids=["graddiff", "npo"])
def test_the_mixin_adds_no_model_forward(plain, mixed, tmp_path):
    counts = {}
    for cls in (plain, mixed):
        kwargs = {"clreg_proj_dim": 8} if cls is mixed else {}
        trainer = make_trainer(cls, tmp_path, n_items=8, args={"max_steps": 2}, **kwargs)
        modules = [trainer.model] + ([trainer.ref_model] if hasattr(trainer, "ref_model") else [])
        c, handles = count_forwards(*modules)
        trainer.train()
        for h in handles:
            h.remove()
        counts[cls] = c
    assert counts[plain] == counts[mixed]
    assert counts[plain][0] == 2 * 2  # forget + retain per step
    if plain is H.NPOLike:
        assert counts[plain][1] == 2  # the reference model, once per step


# ----------------------------------------------------------------------------- the update

@pytest.mark.parametrize("plain, mixed", [(H.PlainGradDiff, H.CLRegGradDiff),
                                          (H.NPOLike, H.CLRegNPO)], ids=["graddiff", "npo"])
def test_weight_zero_is_the_base_update_bit_for_bit(plain, mixed, tmp_path):
    results = []
    for cls, kwargs in ((plain, {}), (mixed, {"clreg_weight": 0.0, "clreg_proj_dim": 8})):
        trainer = make_trainer(cls, tmp_path, n_items=8, args={"max_steps": 2}, **kwargs)
        trainer.train()
        results.append((params(trainer.model), trainer.state.log_history))
    (p_plain, log_plain), (p_mixed, log_mixed) = results
    assert p_plain.keys() == p_mixed.keys()  # no head at weight 0
    for name in p_plain:
        assert torch.equal(p_plain[name], p_mixed[name]), name
    assert all("clreg_loss" not in entry for entry in log_mixed)
    assert [e.get("loss") for e in log_plain] == [e.get("loss") for e in log_mixed]


CASES = {
    # name: (plain, mixed, mixin kwargs, extra TrainingArguments, use concept labels)
    "graddiff_mean_one_concept": (H.PlainGradDiff, H.CLRegGradDiff,
                                  dict(clreg_concept_key=None), {}, False),
    "npo_head_concepts": (H.NPOLike, H.CLRegNPO, dict(clreg_proj_dim=8, clreg_weight=0.7), {},
                          True),
    "graddiff_last_accum2": (H.PlainGradDiff, H.CLRegGradDiff,
                             dict(clreg_pooling="last", clreg_layer=-1, clreg_temperature=0.5),
                             {"gradient_accumulation_steps": 2}, True),
    "npo_token_head_accum2": (H.NPOLike, H.CLRegNPO,
                              dict(clreg_pooling="token", clreg_proj_dim=6, clreg_layer=0),
                              {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
                              True),
    # A method that says its loss is already normalized over the accumulated batch: the Trainer
    # then does not divide by the accumulation steps, so the mixin divides its own term.
    "graddiff_accum2_loss_scaled_for_ga": (H.PlainGradDiff, H.CLRegGradDiff,
                                           dict(clreg_proj_dim=5),
                                           {"gradient_accumulation_steps": 2}, True),
}
TRAINER_ATTRS = {"graddiff_accum2_loss_scaled_for_ga": {"loss_is_scaled_for_ga": True}}


@pytest.mark.parametrize("case", list(CASES))
def test_update_differs_from_the_base_by_the_clreg_gradient(case, tmp_path):
    plain, mixed, kwargs, extra_args, use_labels = CASES[case]
    accum = extra_args.get("gradient_accumulation_steps", 1)
    bs = extra_args.get("per_device_train_batch_size", 4)
    n_items = accum * bs  # one optimizer step sees every item once
    lr = 0.5
    model = H.tiny_model()
    model0 = copy.deepcopy(model)
    attrs = TRAINER_ATTRS.get(case, {})
    if any(not hasattr(plain, name) for name in attrs):
        pytest.skip(f"this transformers Trainer has no {sorted(attrs)}")
    base = make_trainer(plain, tmp_path, n_items=n_items, model=copy.deepcopy(model),
                        args=extra_args)
    trainer = make_trainer(recording(mixed), tmp_path, n_items=n_items, model=model,
                           args=extra_args, **kwargs)
    for name, value in attrs.items():
        setattr(base, name, value)
        setattr(trainer, name, value)
    base.train()
    head0 = copy.deepcopy(trainer.clreg_head)
    trainer.train()
    assert len(trainer.records) == accum

    weight = kwargs.get("clreg_weight", 1.0)
    values, grads = expected_clreg(model0, head0, trainer.records, kwargs.get("clreg_layer", -1),
                                   kwargs.get("clreg_pooling", "mean"),
                                   kwargs.get("clreg_temperature", 0.1), use_labels)
    before = params(model0)
    if head0 is not None:
        before.update({f"{hf_mixin.HEAD_NAME}.{n}": p.detach()
                       for n, p in head0.named_parameters()})
    after_base, after_mixed = params(base.model), params(trainer.model)
    assert set(after_mixed) == set(before)
    biggest = max(float(g.abs().max()) for g in grads.values())
    assert biggest > 1e-3  # the CLReg gradient is not negligible: the test can fail
    for name, p0 in before.items():
        base_delta = (after_base[name] - p0) if name in after_base else torch.zeros_like(p0)
        diff = (after_mixed[name] - p0) - base_delta
        # float32 parameters of magnitude <= ~1: each update rounds at ~1e-7
        torch.testing.assert_close(diff, -lr * weight * grads[name], rtol=2e-4, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    logged = [e["clreg_loss"] for e in trainer.state.log_history if "clreg_loss" in e]
    assert len(logged) == 1
    assert math.isclose(logged[0], sum(values) / len(values), rel_tol=1e-4)


# ----------------------------------------------------------------------------- HF Trainer API

def _one_batch(n=4, seed=3):
    batch = H.collate_pairs(H.make_pairs(n, seed=seed))
    return batch


def test_return_outputs_and_the_value_of_the_loss(tmp_path):
    trainer = make_trainer(H.CLRegGradDiff, tmp_path, clreg_weight=0.5, clreg_concept_key=None)
    plain = make_trainer(H.PlainGradDiff, tmp_path)
    batch = _one_batch()
    trainer.model.train()
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    plain.model.train()
    base_loss, base_outputs = plain.compute_loss(plain.model, batch, return_outputs=True)
    torch.testing.assert_close(outputs.logits, base_outputs.logits, rtol=0, atol=0)
    values, _ = expected_clreg(H.tiny_model(), None, [{**batch, "concept_ids": None}], -1, "mean",
                               0.1, use_labels=False)
    torch.testing.assert_close(loss.detach(), base_loss.detach() + 0.5 * values[0],
                               rtol=1e-5, atol=1e-6)
    assert loss.requires_grad


def test_num_items_in_batch_reaches_only_a_base_that_takes_it(tmp_path):
    batch = _one_batch()
    old_style = make_trainer(H.CLRegGradDiff, tmp_path)
    old_style.model.train()
    with pytest.raises(TypeError):  # what the 4.45-style base does when it is passed
        H.GradDiffLike.compute_loss(old_style, old_style.model, batch, num_items_in_batch=7)
    loss = old_style.compute_loss(old_style.model, batch, num_items_in_batch=7)
    assert torch.isfinite(loss)

    new_style = make_trainer(H.CLRegNPO, tmp_path)
    new_style.model.train()
    new_style.compute_loss(new_style.model, batch, num_items_in_batch=7)
    assert new_style.seen_num_items == [7]
    new_style.compute_loss(new_style.model, batch)
    assert new_style.seen_num_items == [7, None]


def test_eval_mode_and_no_grad_call_the_base_alone(tmp_path):
    trainer = make_trainer(H.CLRegGradDiff, tmp_path, clreg_concept_key=None)
    plain = make_trainer(H.PlainGradDiff, tmp_path)
    batch = _one_batch()
    trainer.model.eval()
    plain.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch),
                                   plain.compute_loss(plain.model, batch), rtol=0, atol=0)


def _transformers_resume_broken() -> bool:
    """transformers < 4.51 cannot resume any Trainer checkpoint on torch >= 2.6: its RNG-state
    load trips torch.load's new weights_only default (huggingface/transformers#34631)."""
    import transformers
    from packaging.version import Version

    return (Version(torch.__version__).release >= (2, 6)
            and Version(transformers.__version__).release < (4, 51))


@pytest.mark.xfail(_transformers_resume_broken(), strict=True,
                   reason="transformers < 4.51 on torch >= 2.6 cannot resume a Trainer checkpoint")
def test_head_is_trained_checkpointed_and_restored_on_resume(tmp_path):
    from safetensors import safe_open

    args = dict(max_steps=3, save_strategy="steps", save_steps=2)
    full = make_trainer(H.CLRegNPO, tmp_path / "full", n_items=12, clreg_proj_dim=8, args=args)
    head_ids = {id(p) for p in full.clreg_head.parameters()}
    head0 = copy.deepcopy(full.clreg_head)
    full.train()
    in_optimizer = {id(p) for g in full.optimizer.param_groups for p in g["params"]}
    assert head_ids <= in_optimizer
    assert not torch.equal(full.clreg_head.weight, head0.weight)  # the head was trained

    ckpt = tmp_path / "full" / "CLRegNPO" / "checkpoint-2"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        saved_head = f.get_tensor(f"{hf_mixin.HEAD_NAME}.weight")
    assert {f"{hf_mixin.HEAD_NAME}.weight", f"{hf_mixin.HEAD_NAME}.bias"} <= keys
    assert not torch.equal(saved_head, head0.weight)

    # A fresh trainer whose head starts elsewhere (another seed) resumes at step 2 and ends
    # where the uninterrupted run ended.
    resumed = make_trainer(H.CLRegNPO, tmp_path / "full", n_items=12, clreg_proj_dim=8,
                           args={**args, "seed": 0})
    with torch.no_grad():
        resumed.clreg_head.weight.add_(1.0)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3
    p_full, p_resumed = params(full.model), params(resumed.model)
    for name in p_full:
        torch.testing.assert_close(p_resumed[name], p_full[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    from transformers import TrainingArguments

    # transformers >= 5 renamed gradient_checkpointing to activation_checkpointing
    flag = ("activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing")
            else "gradient_checkpointing")
    results = []
    for gc, reentrant in ((False, None), (True, None), (True, True), (True, False)):
        args = {flag: gc}
        if reentrant is not None:
            args[f"{flag}_kwargs"] = {"use_reentrant": reentrant}
        trainer = make_trainer(H.CLRegNPO, tmp_path / f"{gc}{reentrant}", clreg_proj_dim=8,
                               args=args)
        trainer.train()
        checkpointed = any(getattr(m, "gradient_checkpointing", False)
                           for m in trainer.model.modules())
        assert checkpointed == gc
        results.append(params(trainer.model))
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bf16_trains(weights, tmp_path, monkeypatch):
    """bf16 autocast over float32 weights, and a model whose weights are bf16 (as loaded with
    torch_dtype=bfloat16): the head stays float32 and the features are cast up to it."""
    # older transformers export the precision to the environment: undone after the test
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    model = H.tiny_model().to(getattr(torch, weights))
    trainer = make_trainer(H.CLRegNPO, tmp_path, model=model, clreg_proj_dim=8,
                           args={"bf16": True})
    head0 = copy.deepcopy(trainer.clreg_head)
    trainer.train()
    logged = [e["clreg_loss"] for e in trainer.state.log_history if "clreg_loss" in e]
    assert len(logged) == 1 and math.isfinite(logged[0])
    assert trainer.clreg_head.weight.dtype == torch.float32
    assert not torch.equal(trainer.clreg_head.weight, head0.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_features_head_and_loss_on_different_devices(tmp_path):
    """device_map="auto" puts layers (and so the features), the head (made on the first
    parameter's device) and the method's loss (the last layer's) on different devices: the term
    is computed on the head's device and added on the loss's. Here the model is on the CPU and
    only the head on the GPU."""
    batch = _one_batch()
    values = []
    for head_device in ("cpu", "cuda"):
        # the torch backend: this test is about devices, not about the GPU kernels
        trainer = make_trainer(H.CLRegNPO, tmp_path, clreg_proj_dim=8, clreg_backend="torch")
        trainer.clreg_head.to(head_device)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        assert loss.device.type == "cpu" and trainer._clreg_log_count == 1
        loss.backward()
        assert trainer.clreg_head.weight.grad.device.type == head_device
        values.append(float(loss.detach()))
    assert values[1] == pytest.approx(values[0], rel=1e-4, abs=1e-6)


def test_concepts_from_an_overridden_clreg_concept_ids(tmp_path):
    class ByParity(recording(H.CLRegNPO)):
        def clreg_concept_ids(self, forget):
            return torch.arange(forget["input_ids"].shape[0]) % 2  # the key stays in the batch

    trainer = make_trainer(ByParity, tmp_path)
    trainer.train()
    rec = trainer.records[0]
    assert torch.equal(rec["concept_ids"], torch.tensor([0, 1, 0, 1]))
    assert "concept_ids" in rec["forget"]


def test_a_base_without_a_retain_forward_gets_one_truncated_no_grad_forward(tmp_path):
    class GradAscentLike(H.PlainGradDiff):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**{k: inputs["forget"][k] for k in ("input_ids", "attention_mask",
                                                            "labels")})
            return (-out.loss, out) if return_outputs else -out.loss

    class CLRegGradAscent(hf_mixin.CLRegMixin, GradAscentLike):
        pass

    trainer = make_trainer(recording(CLRegGradAscent), tmp_path, clreg_layer=0)
    layers = trainer.model.model.layers
    counts, handles = count_forwards(trainer.model, layers[0], layers[1])
    trainer.train()
    for h in handles:
        h.remove()
    # the base's forget forward, plus one retain forward that stops after the feature layer
    assert counts == [2, 2, 1]
    assert trainer.records[0]["retain_hidden"] is not None
    assert any("clreg_loss" in e for e in trainer.state.log_history)


def test_a_micro_batch_without_a_repeated_concept(tmp_path):
    """Four forget rows of four concepts: "skip" drops the term (the base's update, the head
    untouched, nothing logged); "one_concept" pools them into one concept."""
    base = make_trainer(H.NPOLike, tmp_path, concepts=4)
    base.train()
    skipping = make_trainer(H.CLRegNPO, tmp_path, concepts=4, clreg_proj_dim=8,
                            clreg_fallback="skip")
    head0 = copy.deepcopy(skipping.clreg_head)
    skipping.train()
    p_base, p_skip = params(base.model), params(skipping.model)
    for name in p_base:
        assert torch.equal(p_base[name], p_skip[name]), name
    assert torch.equal(skipping.clreg_head.weight, head0.weight)
    assert all("clreg_loss" not in e for e in skipping.state.log_history)

    pooled = make_trainer(H.CLRegNPO, tmp_path, concepts=4, clreg_proj_dim=8)
    pooled.train()
    assert any("clreg_loss" in e for e in pooled.state.log_history)
    assert not torch.equal(pooled.clreg_head.weight, head0.weight)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, error, word", [
    (dict(clreg_weight=-1.0), ValueError, "clreg_weight"),
    (dict(clreg_weight=float("nan")), ValueError, "clreg_weight"),
    (dict(clreg_layer=1.5), TypeError, "clreg_layer"),
    (dict(clreg_layer=7), ValueError, "layer 7"),
    (dict(clreg_temperature=0.0), ValueError, "clreg_temperature"),
    (dict(clreg_pooling="max"), ValueError, "clreg_pooling"),
    (dict(clreg_proj_dim=0), ValueError, "clreg_proj_dim"),
    (dict(clreg_backend=3), TypeError, "clreg_backend"),
    (dict(clreg_backend="trition"), ValueError, "clreg_backend"),  # at once, not at step 1
    (dict(clreg_concept_key=1), TypeError, "clreg_concept_key"),
    (dict(clreg_fallback="drop"), ValueError, "clreg_fallback"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, word, tmp_path):
    with pytest.raises(error, match=word):
        make_trainer(H.CLRegGradDiff, tmp_path, **kwargs)


def test_one_row_per_micro_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        make_trainer(H.CLRegGradDiff, tmp_path, args={"per_device_train_batch_size": 1})


def test_data_parallel_is_refused(tmp_path):
    """One process seeing several GPUs makes the Trainer wrap the model in nn.DataParallel,
    whose replicas each forward a slice of the batch: no forward is the forget batch's. A clear
    error, at construction and when compute_loss gets a DataParallel model (on CPU DataParallel
    runs the module as it is, so only the refusal can be checked here)."""
    args = H.training_args(tmp_path / "dp")
    args._n_gpu = 2  # what TrainingArguments reports with 2 visible GPUs and no torchrun
    with pytest.raises(NotImplementedError, match="DataParallel"):
        H.CLRegGradDiff(model=H.tiny_model(), args=args, train_dataset=H.make_pairs(4),
                        data_collator=H.collate_pairs)
    trainer = make_trainer(H.CLRegGradDiff, tmp_path)
    trainer.model.train()
    with pytest.raises(NotImplementedError, match="DataParallel"):
        trainer.compute_loss(torch.nn.DataParallel(trainer.model), _one_batch())


def test_the_head_file_is_written_for_adapters_added_by_transformers(tmp_path, monkeypatch):
    """``model.add_adapter`` / ``load_adapter`` (transformers' own PEFT integration, which sets
    ``_hf_peft_config_loaded``): ``save_pretrained`` writes the adapter alone, as a PeftModel's
    does, so the head gets its file. (The base save is stubbed: the real one needs peft >= 0.22
    for these models.)"""
    import transformers
    from safetensors.torch import load_file

    trainer = make_trainer(H.CLRegGradDiff, tmp_path, clreg_proj_dim=8)
    monkeypatch.setattr(transformers.Trainer, "_save",
                        lambda self, output_dir=None, state_dict=None: None)
    trainer._save(str(tmp_path))
    assert not (tmp_path / hf_mixin.HEAD_FILE).exists()  # a full model: the head is inside
    trainer.model._hf_peft_config_loaded = True
    trainer._save(str(tmp_path))
    saved = load_file(str(tmp_path / hf_mixin.HEAD_FILE))
    assert torch.equal(saved["weight"], trainer.clreg_head.weight.detach())


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "zero3"])
def test_the_head_dtype_fits_the_engine(sharded, tmp_path, monkeypatch):
    """float32 beside a bf16 model, except under ZeRO-3 (and FSDP), whose flat buffers hold one
    dtype: there the model's. The term is float32 either way."""
    monkeypatch.setattr(hf_mixin, "_zero3_enabled", lambda: sharded)
    model = H.tiny_model().to(torch.bfloat16)
    trainer = make_trainer(H.CLRegGradDiff, tmp_path, model=model, clreg_proj_dim=8)
    assert trainer.clreg_head.weight.dtype == (torch.bfloat16 if sharded else torch.float32)
    hidden = torch.randn(4, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = {"labels": torch.full((4, 5), 1)}
    term = trainer._clreg_term(hidden, labels, None, hidden.detach(), labels)
    assert term.dtype == torch.float32 and term.requires_grad


class _FSDPLike(H.GradDiffLike):
    fsdp_version = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_fsdp_enabled = True  # what Trainer sets when accelerate runs FSDP
        self.accelerator.state.fsdp_plugin = type("Plugin", (), {
            "fsdp_version": self.fsdp_version})()


class _CLRegFSDP1(hf_mixin.CLRegMixin, _FSDPLike):
    pass


class _CLRegFSDP2(hf_mixin.CLRegMixin, _FSDPLike):
    fsdp_version = 2


def test_a_head_under_fsdp1_is_refused_naming_what_works(tmp_path):
    try:
        with pytest.raises(NotImplementedError, match="FSDP1.*FSDP2.*ZeRO-3.*DDP"):
            make_trainer(_CLRegFSDP1, tmp_path, clreg_proj_dim=8)
        make_trainer(_CLRegFSDP1, tmp_path)  # without a head the loss reads only activations
        trainer = make_trainer(_CLRegFSDP2, tmp_path, clreg_proj_dim=8)
        assert trainer.clreg_head is not None
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState().fsdp_plugin = None  # a process-wide singleton: leave it as it was


def test_a_head_with_find_unused_parameters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        make_trainer(H.CLRegGradDiff, tmp_path, clreg_proj_dim=8,
                     args={"ddp_find_unused_parameters": True})
    trainer = make_trainer(H.CLRegGradDiff, tmp_path, clreg_proj_dim=8)
    assert trainer.args.ddp_find_unused_parameters is False


def test_a_base_that_never_forwards_the_forget_batch_is_an_error(tmp_path):
    class RetainOnly(H.PlainGradDiff):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**{k: inputs["retain"][k] for k in ("input_ids", "labels")}).loss

    class CLRegRetainOnly(hf_mixin.CLRegMixin, RetainOnly):
        pass

    trainer = make_trainer(CLRegRetainOnly, tmp_path)
    with pytest.raises(RuntimeError, match=r"inputs\['forget'\]"):
        trainer.train()


# ----------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_two_process_ddp_gloo_trains(tmp_path):
    result = run_torchrun(os.path.join(SCRIPTS, "hf_mixin_worker.py"),
                          ["--output-dir", tmp_path / "run"], tmp_path / "ddp.pt")
    assert result["world_size"] == 2
    assert result["ranks_agree"], "parameters (head included) differ between the ranks"
    logged = [e["clreg_loss"] for e in result["log_history"] if "clreg_loss" in e]
    assert len(logged) == result["steps"] and all(math.isfinite(v) for v in logged)
    assert result["head_moved"] and result["model_moved"]
    assert result["forwards_per_rank"] == [2 * result["steps"]] * 2
    # DDP's first update = one process's update on the mean over both ranks' micro-batches
    assert result["micro_batches_first_step"] == 2
    assert result["first_step_scale"] > 1e-3
    assert result["first_step_error"] < 1e-5 * max(1.0, result["first_step_scale"]) + 2e-6
