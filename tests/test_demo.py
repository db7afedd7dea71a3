"""The experiment runner: the tiny configuration in its --quick size (about a minute on 2 CPU
cores) and a small slice of the real-model (SmolLM2-135M) configuration."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from clreg_fast import demo  # noqa: E402
from clreg_fast.unlearn.data import build_examples  # noqa: E402
from clreg_fast.unlearn.synthetic import make_synthetic  # noqa: E402

ARMS = ("graddiff", "graddiff+clreg", "npo", "npo+clreg", "target", "oracle")
REQUIRED = ("forget_value_acc", "retain_value_acc", "forget_quality", "knn_mixing")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = str(root / "out"), str(root / "cache")
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--quick", "--out-dir", out, "--cache-dir", cache, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread for the process
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f), out, cache


@pytest.mark.slow
def test_metrics_json_shape(quick_run):
    arms, out, _ = quick_run
    assert set(arms) == set(ARMS)
    with open(os.path.join(out, "run.json")) as f:
        run_info = json.load(f)
    for arm in ARMS:
        for key in REQUIRED:
            assert isinstance(arms[arm][key], float), (arm, key)
    lrs = run_info["config"]["lrs"]
    for arm in ARMS[:4]:
        assert [p["lr"] for p in arms[arm]["sweep"]] == lrs
        assert "retain_drift" in arms[arm] and "privleak" in arms[arm]
    assert os.path.getsize(os.path.join(out, "tradeoff.png")) > 10_000


@pytest.mark.slow
def test_target_memorized_and_unlearning_forgets(quick_run):
    arms = quick_run[0]
    target, oracle = arms["target"], arms["oracle"]
    assert target["forget_value_acc"] >= 0.9 and target["retain_value_acc"] >= 0.9
    # the oracle never saw the forget authors
    assert oracle["forget_value_acc"] < 0.5 and oracle["retain_value_acc"] >= 0.9
    for arm in ARMS[:4]:
        strongest = arms[arm]["sweep"][-1]  # the largest learning rate
        assert strongest["forget_value_acc"] < target["forget_value_acc"] - 0.3, arm


@pytest.mark.slow
def test_models_are_cached(quick_run):
    _, _, cache = quick_run
    names = sorted(os.listdir(cache))
    assert [n.split("-")[0] for n in names] == ["oracle", "target"]
    cfg = demo.quick_config()
    rows, tok = make_synthetic(cfg.data)
    _, cached = demo.trained_model("target", build_examples(rows["retain"], tok), tok, cfg, cache,
                                   progress=False)
    assert cached


def test_format_table():
    text = demo.format_table({"target": {"forget_value_acc": 1.0, "knn_mixing": float("nan")},
                              "npo+clreg": {"forget_value_acc": 0.25, "privleak": -3.0}})
    lines = text.splitlines()
    assert lines[0].startswith("arm") and set(lines[1]) == {"-"}
    assert "1.000" in lines[2] and "0.250" in lines[3] and "-3.0" in lines[3]


# ----------------------------------------------------------------------------- real model


REAL_ARMS = ("target", "oracle", "npo", "npo+clreg")
REAL_REQUIRED = ("forget_quality", "model_utility", "extraction_strength", "privleak",
                 "entanglement_score", "knn_mixing", "silhouette", "linear_probe_acc")


def test_smollm2_presets_have_every_method_and_the_issue_arms():
    for quick in (False, True):
        cfg = demo.preset("smollm2-135m", quick=quick)
        assert tuple(cfg.methods) == ("graddiff", "npo", "simnpo")
        assert cfg.train_layers and cfg.clreg_layer >= 30 - cfg.train_layers  # CLReg is trained
        assert cfg.utility_rows > 0 and cfg.world_facts > 0
    assert demo.preset("tiny").model == "tiny" and demo.quick_config().model == "tiny"


@pytest.mark.slow
def test_real_model_slice_end_to_end(tmp_path):
    """A small slice of the --model smollm2-135m --quick path: fetch (or reuse the cached
    model), fine-tune target and oracle, NPO with and without CLReg, every measure, both PNGs."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    pytest.importorskip("rouge_score")
    from clreg_fast.unlearn.english_authors import EnglishAuthorsConfig
    from clreg_fast.unlearn.models import ModelUnavailableError

    import dataclasses

    cfg = dataclasses.replace(
        demo.preset("smollm2-135m", quick=True),
        data=EnglishAuthorsConfig(n_authors=3, n_forget_authors=1, n_holdout_authors=1,
                                  n_facts=2),
        methods=("npo",), train_epochs=1, max_steps=1, batch_size=2, utility_rows=2,
        world_facts=2, knn_k=1, max_new_tokens=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = str(tmp_path / "out")
    try:
        demo.run(cfg, out, str(tmp_path / "cache"), progress=False, log=lambda t: None)
    except ModelUnavailableError as err:
        pytest.skip(f"the model cannot be fetched here: {err}")
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(out, "metrics.json")) as f:
        arms = json.load(f)
    assert list(arms) == list(REAL_ARMS)
    for arm in REAL_ARMS:
        for key in REAL_REQUIRED:
            assert isinstance(arms[arm][key], float), (arm, key)
        assert 0.0 <= arms[arm]["model_utility"] <= 1.0
    assert arms["oracle"]["forget_quality"] == 1.0 and arms["oracle"]["privleak"] == 0.0
    with open(os.path.join(out, "run.json")) as f:
        run_info = json.load(f)
    assert run_info["model"] == "smollm2-135m" and run_info["n_params"] == 134_515_008
    assert "decoder layers 18-29" in run_info["trained_parameters"]
    assert set(run_info["seconds"]["arms"]) == {"npo", "npo+clreg"}
    for name in ("tradeoff.png", "entanglement.png"):
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    for split in ("forget", "retain", "holdout", "world", "real_authors"):
        assert os.path.exists(os.path.join(out, "data", f"{split}.json"))
    # CLReg changed the NPO run (the two arms differ at the CLReg layer)
    assert arms["npo"]["entanglement_score"] != arms["npo+clreg"]["entanglement_score"]


def test_clreg_on_a_frozen_layer_is_refused_before_any_training(tmp_path):
    """With ``train_layers`` only the upper layers train; CLReg below them has no gradient and
    its arms would silently equal the plain ones (seen: identical metrics)."""
    import dataclasses

    cfg = dataclasses.replace(demo.quick_config(), train_layers=2, clreg_layer=0)
    with pytest.raises(ValueError, match="clreg_layer 0 .*frozen"):
        demo.run(cfg, str(tmp_path / "out"), None, progress=False, make_plot=False,
                 log=lambda t: None)
    with pytest.raises(ValueError, match="out of range"):
        demo.run(dataclasses.replace(cfg, clreg_layer=4), str(tmp_path / "out"), None,
                 progress=False, make_plot=False, log=lambda t: None)


def test_token_pooling_runs_and_evaluates_per_answer_means(tmp_path):
    """``--clreg-pooling token`` trains on one row per answer token; the feature metrics then use
    each answer's mean (the evaluation raised after all the training before)."""
    import dataclasses

    from clreg_fast.unlearn.synthetic import SyntheticConfig

    cfg = dataclasses.replace(
        demo.quick_config(), data=SyntheticConfig(n_authors=6, n_forget_authors=2,
                                                  n_holdout_authors=2, n_facts=2),
        clreg_pooling="token", train_epochs=1, max_steps=1, lrs=(2e-4,), default_lr=2e-4,
        methods=("graddiff",), knn_k=1, hidden_size=32, num_layers=3, clreg_layer=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = demo.run(cfg, str(tmp_path / "out"), None, progress=False, make_plot=False,
                           log=lambda t: None)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(results["graddiff+clreg"]["knn_mixing"], float)
    with open(tmp_path / "out" / "run.json") as f:
        assert json.load(f)["feature_pooling"] == "mean"
