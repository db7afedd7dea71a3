"""The unlearning loop: every method runs, resume is exact, and torchrun DDP/FSDP2 on CPU (gloo)
make the same update as one process on the same global batch."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests._torchrun import run_torchrun

pytest.importorskip("transformers")

from clreg_fast.unlearn.train import UnlearnConfig, unlearn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER_PATH = os.path.join(HERE, "dist_scripts", "unlearn_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("unlearn_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(method="graddiff", model=None, forget=None, retain=None, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("max_steps", 2)
    kwargs.setdefault("progress", False)
    model = model if model is not None else W.tiny_model()
    history = unlearn(model, forget or W.FORGET, retain or W.RETAIN,
                      UnlearnConfig(method=method, **kwargs), pad_id=0)
    return model, history


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kwargs, match", [
    (dict(method="kl"), "method"),
    (dict(clreg_pooling="max"), "clreg_pooling"),
    (dict(parallel="deepspeed"), "parallel"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=1.5), "grad_accum"),
    (dict(lr=0.0), "lr"),
    (dict(clreg_temperature=-1.0), "clreg_temperature"),
    (dict(clreg_proj_dim=0), "clreg_proj_dim"),
    (dict(bf16="maybe"), "bf16"),
    (dict(save_every=2), "out_dir"),
    (dict(clreg_negatives="all"), "clreg_negatives"),
    (dict(clreg_queue_size=-1), "clreg_queue_size"),
    (dict(clreg_queue_size=True), "clreg_queue_size"),
    (dict(clreg_queue_size=8, clreg_backend="reference"), "fused clreg_backend"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearnConfig(**kwargs)


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ValueError, match="divisible"):
        run(batch_size=3, grad_accum=2)


def test_bad_examples():
    with pytest.raises(ValueError, match="forget_examples"):
        unlearn(W.tiny_model(), [], W.RETAIN, UnlearnConfig())
    with pytest.raises(ValueError, match="labels"):
        unlearn(W.tiny_model(), [{"input_ids": [1, 2], "labels": [1]}], W.RETAIN, UnlearnConfig())


# ----------------------------------------------------------------------------- methods

@pytest.mark.parametrize("method", ["gradascent", "graddiff", "npo", "simnpo", "rmu"])
def test_every_method_runs_with_and_without_clreg(method):
    for clreg in (0.0, 0.5):
        model = W.tiny_model()
        before = params_of(model)
        _, history = run(method, model, clreg_weight=clreg, clreg_proj_dim=8 if clreg else None,
                         lr=1e-3)
        assert [h["step"] for h in history] == [1, 2]
        for h in history:
            assert all(torch.isfinite(torch.tensor(v)) for v in h.values())
            assert ("clreg_loss" in h) == (clreg > 0)
            assert ("retain_loss" in h) == (method != "gradascent")
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_gradascent_raises_forget_nll():
    _, history = run("gradascent", lr=3e-3, max_steps=6, optimizer="adamw")
    assert history[-1]["forget_nll"] > history[0]["forget_nll"] + 0.05


def test_rmu_trains_only_the_chosen_parameters():
    model = W.tiny_model()
    before = params_of(model)
    run("rmu", model, rmu_layer=7, rmu_steering=4.0, lr=1e-2)  # layer 7 clamps to 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)}


def test_rmu_rejects_layers_past_the_steered_one():
    with pytest.raises(ValueError, match="rmu_train_layers"):
        run("rmu", rmu_layer=1, rmu_train_layers=[1, 2])


def test_reference_model_is_not_trained():
    model, ref = W.tiny_model(), W.tiny_model()
    ref_before = params_of(ref)
    unlearn(model, W.FORGET, W.RETAIN, UnlearnConfig(method="npo", max_steps=2, batch_size=4,
                                                     lr=1e-2, progress=False), ref_model=ref)
    assert all(torch.equal(ref_before[n], p) for n, p in ref.named_parameters())


def test_npo_cached_reference_matches_per_step_reference():
    cached, h_cached = run("npo", cache_ref=True, optimizer="sgd", lr=0.5)
    fresh, h_fresh = run("npo", cache_ref=False, optimizer="sgd", lr=0.5)
    for (n, p), q in zip(cached.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert h_cached[-1]["loss"] == pytest.approx(h_fresh[-1]["loss"], rel=1e-5)


def test_grad_accum_matches_one_big_batch():
    one, h_one = run("graddiff", optimizer="sgd", lr=0.5, max_steps=1, batch_size=4)
    acc, h_acc = run("graddiff", optimizer="sgd", lr=0.5, max_steps=1, batch_size=4, grad_accum=4)
    for (n, p), q in zip(one.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    for key in ("forget_loss", "retain_loss", "grad_norm"):
        assert h_one[0][key] == pytest.approx(h_acc[0][key], rel=1e-5), key
    # GradDiff's loss is a difference of two ~4.2 terms: float32 sums in another order move it
    # by a few ulps of the terms, not of the (small) difference.
    scale = abs(h_one[0]["forget_loss"]) + abs(h_one[0]["retain_loss"])
    assert h_one[0]["loss"] == pytest.approx(h_acc[0]["loss"], abs=1e-6 * scale)


def test_clreg_falls_back_when_every_concept_is_distinct():
    distinct = [dict(ex, concept_id=i) for i, ex in enumerate(W.FORGET)]
    _, history = run("graddiff", forget=distinct, clreg_weight=1.0, clreg_pooling="mean")
    assert history[0]["clreg_fallback"] == 1.0 and history[0]["clreg_loss"] > 0
    _, history = run("graddiff", forget=distinct, clreg_weight=1.0, clreg_fallback="skip")
    assert history[0]["clreg_skipped"] == 1.0 and history[0]["clreg_loss"] == 0.0


def test_gradient_checkpointing_gives_the_same_update():
    plain, h_plain = run("graddiff", optimizer="sgd", lr=0.5, max_steps=1, clreg_weight=0.5)
    ckpt, h_ckpt = run("graddiff", optimizer="sgd", lr=0.5, max_steps=1, clreg_weight=0.5,
                       grad_checkpointing=True)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert not ckpt.model.layers[0].gradient_checkpointing  # switched back off


def test_eval_fn_schedule_and_warmup():
    seen = []

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        seen.append(1)
        return W.eval_nll(model)

    model = W.tiny_model()
    history = unlearn(model, W.FORGET, W.RETAIN,
                      UnlearnConfig(max_steps=5, batch_size=4, eval_every=2, warmup_steps=2,
                                    lr=1e-3, progress=False), pad_id=0, eval_fn=eval_fn)
    assert [("eval_nll" in h) for h in history] == [False, True, False, True, True]
    assert [h["lr"] for h in history] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert model.training


def test_global_negatives_in_one_process_are_local():
    kwargs = dict(optimizer="sgd", lr=0.5, clreg_weight=0.5, clreg_proj_dim=8)
    local, h_local = run("graddiff", clreg_negatives="local", **kwargs)
    glob, h_glob = run("graddiff", clreg_negatives="global", **kwargs)
    for (n, p), q in zip(local.named_parameters(), glob.parameters()):
        assert torch.equal(p, q), n
    assert h_local == h_glob


def test_queue_adds_earlier_retain_rows_as_negatives(tmp_path):
    kwargs = dict(clreg_weight=0.5, clreg_proj_dim=8, lr=1e-3, max_steps=3)
    _, plain = run("graddiff", **kwargs)
    _, queued = run("graddiff", clreg_queue_size=6, out_dir=str(tmp_path), save_every=2,
                    save_final=False, **kwargs)
    # step 1 sees an empty queue; from step 2 on the earlier retain rows are extra negatives,
    # which can only raise the log-sum-exp of every anchor
    assert queued[0] == plain[0]
    for step in (1, 2):
        assert queued[step]["clreg_loss"] > plain[step]["clreg_loss"] + 1e-3
    state = torch.load(tmp_path / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    (saved,) = state["clreg_queue"]
    # 2 steps x 4 retain rows into 6 slots: full, the next write at row 8 mod 6
    assert saved["_extra_state"] == {"next": 2, "filled": 6, "capacity": 6}
    norms = saved["features"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(6), rtol=0, atol=1e-6)
    # clreg_loss is logged for every step, in both log files
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["clreg_loss"] for h in logged] == [h["clreg_loss"] for h in queued]
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("clreg_loss")
    assert [float(r.split(",")[column]) for r in rows] == \
        pytest.approx([h["clreg_loss"] for h in queued], rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints

def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    kwargs = dict(method="npo", clreg_weight=0.5, clreg_proj_dim=8, lr=1e-3, warmup_steps=2,
                  lr_schedule="cosine", max_steps=4, save_every=2, seed=7)
    straight, h_straight = run(out_dir=str(tmp_path / "a"), **kwargs)
    ckpt = tmp_path / "a" / "checkpoint-2"
    for name in ("model.safetensors", "config.json", "trainer_state.pt", "clreg_head.safetensors"):
        assert (ckpt / name).is_file(), name
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".")]  # no temp dirs left

    # a fresh run directory holding the step-2 checkpoint plus debris of an unfinished save
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(ckpt, b / "checkpoint-2")
    (b / "checkpoint-3").mkdir()
    (b / ".tmp-checkpoint-3-x").mkdir()
    resumed, h_resumed = run(out_dir=str(b), resume=True, **kwargs)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert h_resumed == h_straight

    lines = (b / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    csv_lines = (b / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,epoch,lr,") and len(csv_lines) == 5

    from transformers import LlamaForCausalLM

    final = LlamaForCausalLM.from_pretrained(str(b / "final"))
    for (n, p), q in zip(final.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_resume_restores_the_retain_feature_queue(tmp_path):
    kwargs = dict(method="graddiff", clreg_weight=0.5, clreg_proj_dim=8, clreg_queue_size=6,
                  lr=1e-3, max_steps=4, save_every=2, save_final=False, seed=3)
    straight, h_straight = run(out_dir=str(tmp_path / "a"), **kwargs)
    ckpt = str(tmp_path / "a" / "checkpoint-2")
    resumed, h_resumed = run(out_dir=str(tmp_path / "b"), resume=ckpt, **kwargs)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert h_resumed == h_straight

    # without the saved queue the resumed steps differ: the check has teeth
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    del state["clreg_queue"]
    stripped = tmp_path / "c" / "checkpoint-2"
    shutil.copytree(ckpt, stripped)
    torch.save(state, stripped / "trainer_state.pt")
    with pytest.warns(UserWarning, match="no CLReg retain feature queue"):
        _, h_stripped = run(out_dir=str(tmp_path / "d"), resume=str(stripped), **kwargs)
    assert h_stripped[2]["clreg_loss"] != h_straight[2]["clreg_loss"]

    with pytest.raises(ValueError, match="retain feature queue of shape"):
        run(out_dir=str(tmp_path / "e"), resume=ckpt, **dict(kwargs, clreg_queue_size=5))


def test_resume_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        run(out_dir=str(tmp_path), resume=str(tmp_path))


def test_keep_checkpoints(tmp_path):
    run(out_dir=str(tmp_path), max_steps=4, save_every=1, keep_checkpoints=2, save_final=False)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == \
        ["checkpoint-3", "checkpoint-4"]


# ----------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from clreg_fast.unlearn import cli

    words = "what is the book of author wrote ? .".split() + [f"w{i}" for i in range(12)]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "Question:": 4, "Answer:": 5}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16,
                                         intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64))
    model.save_pretrained(str(tmp_path / "model"))
    fast.save_pretrained(str(tmp_path / "model"))
    rows = [{"question": f"what is the book of w{i} ?", "answer": f"w{(3 * i) % 12} wrote w{i} .",
             "author": f"w{i % 3}"} for i in range(12)]
    (tmp_path / "forget.json").write_text(json.dumps(rows[:6]))
    (tmp_path / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in rows[6:]))

    out = tmp_path / "out"
    assert cli.main(["--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.json"),
                     "--retain", str(tmp_path / "retain.jsonl"), "--out", str(out),
                     "--method", "npo", "--clreg-weight", "0.5", "--max-steps", "2",
                     "--batch-size", "2", "--lr", "1e-3", "--eval-every", "1", "--no-progress",
                     "--clreg-proj-dim", "none", "--bf16", "false"]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert "eval_forget_nll" in history[-1] and "clreg_loss" in history[-1]
    assert (out / "final" / "tokenizer_config.json").is_file()
    assert json.loads((out / "final" / "unlearn_config.json").read_text())["method"] == "npo"


def test_cli_help_lists_config_options(capsys):
    from clreg_fast.unlearn import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--clreg-weight", "--parallel", "--grad-checkpointing", "--resume",
                 "--no-progress", "--rmu-train-layers", "--clreg-negatives",
                 "--clreg-queue-size"):
        assert flag in text


def test_cli_parses_the_clreg_batch_flags(capsys):
    from clreg_fast.unlearn import cli

    required = ["--model", "m", "--forget", "f", "--retain", "r", "--out", "o"]
    args = cli.build_parser().parse_args(required)
    assert (args.clreg_negatives, args.clreg_queue_size) == ("local", 0)
    args = cli.build_parser().parse_args(required + ["--clreg-negatives", "global",
                                                     "--clreg-queue-size", "4096"])
    assert (args.clreg_negatives, args.clreg_queue_size) == ("global", 4096)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(required + ["--clreg-negatives", "world"])
    assert "invalid choice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- torchrun

def _torchrun(parallel, tmp_path, resume=False):
    args = ["--parallel", parallel] + (["--resume-dir", tmp_path / "resume"] if resume else [])
    return run_torchrun(WORKER_PATH, args, tmp_path / f"{parallel}.pt")


_FSDP_BF16_NPO = """
import json, sys
import torch
sys.path[:0] = [{root!r}, {scripts!r}]
import unlearn_worker as W
from clreg_fast.unlearn.train import UnlearnConfig, unlearn
torch.set_num_threads(1)
history = unlearn(W.tiny_model(), W.FORGET, W.RETAIN,
                  UnlearnConfig(method="npo", parallel="fsdp", bf16=True, max_steps=1,
                                batch_size=4, lr=1e-6, progress=False), pad_id=0)
print(json.dumps(history[0]))
"""


@pytest.mark.slow
def test_fsdp_bf16_keeps_the_reference_log_probs_in_float32():
    """FSDP2 with the bf16 policy (one process, its own group): at the first NPO step the model
    is its reference, so log p - log p_ref = 0 and the loss is exactly (2/beta) log 2. Cast to
    bf16 on the way into the wrapped forward, the float32 reference NLL sums would not be."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    script = _FSDP_BF16_NPO.format(root=ROOT, scripts=os.path.dirname(WORKER_PATH))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    if proc.returncode:
        pytest.fail(f"FSDP bf16 run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def dist_results(request, tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    return request.param, _torchrun(request.param, tmp_path_factory.mktemp(request.param),
                                    resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(W.SCENARIOS))
def test_two_ranks_match_one_process(dist_results, scenario):
    """First-step (and second-step) update of torchrun DDP/FSDP2 on 2 CPU ranks equals the
    single-process update on the same global batch (same micro-batches: 2x accumulation)."""
    parallel, results = dist_results
    torch.set_num_threads(1)
    base = W.run_scenario(scenario, "none", world=2)
    got = results[scenario]
    initial = W.tiny_model().state_dict()
    moved = 0.0
    for name, expected in base["params"].items():
        # fp32 sums in a different order (all-reduce / reduce-scatter): a few ulps apart
        torch.testing.assert_close(got["params"][name], expected, rtol=0, atol=1e-6,
                                   msg=f"{parallel} {scenario} {name}")
        moved = max(moved, float((expected - initial[name]).abs().max()))
    assert moved > 1e-4  # the step really moved the parameters: the check has teeth
    assert len(got["history"]) == len(base["history"])
    for h_got, h_base in zip(got["history"], base["history"]):
        assert h_got.keys() == h_base.keys()
        for key, value in h_base.items():
            assert h_got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (parallel, key)


@pytest.mark.slow
def test_two_ranks_local_clreg_is_not_the_whole_batch(dist_results):
    """Without clreg_negatives="global" each rank contrasts its own 2 forget rows: the update
    is not that of one process on all 4 (the global scenario's baseline)."""
    parallel, results = dist_results
    torch.set_num_threads(1)
    whole = W.run_scenario("npo_clreg_head_global", "none", world=2)
    local = results["npo_clreg_head"]
    gap = max(float((local["params"][n] - p).abs().max()) for n, p in whole["params"].items())
    assert gap > 1e-4, (parallel, gap)
    assert local["history"][0]["clreg_loss"] != pytest.approx(whole["history"][0]["clreg_loss"],
                                                              rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["resume", "resume_global"])
def test_two_ranks_resume_exactly(dist_results, run_name):
    """Resume from step 2 of 3, with per-rank ("local") and shared ("global") retain queues."""
    parallel, results = dist_results
    r = results[run_name]
    for name, p in r["straight"].items():
        assert torch.equal(p, r["resumed"][name]), (parallel, run_name, name)
    assert r["h_straight"] == r["h_resumed"]


def test_queue_without_clreg_warns_that_it_is_unused():
    with pytest.warns(UserWarning, match="clreg_weight is 0"):
        UnlearnConfig(clreg_queue_size=16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearnConfig(clreg_queue_size=16, clreg_weight=1.0)
