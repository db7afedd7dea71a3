"""The demo end to end in its --quick size (about a minute on 2 CPU cores)."""
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
