"""The study runner (clreg_fast.study): aggregation math on fixed fixtures, the protocol rule on
a fabricated validation table, the phase guards, resuming, and one micro select + test run."""
import dataclasses
import itertools
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from clreg_fast import demo, study  # noqa: E402

# t_{0.975, 3} from a t table (not from scipy, which the code under test uses).
T_975_3 = 3.182446305284263


# ----------------------------------------------------------------------------- aggregation


def test_describe_values_mean_and_sample_std():
    d = study.describe_values([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5
    assert d["std"] == pytest.approx(math.sqrt(5.0 / 3.0))  # sum of squares 5, n - 1 = 3
    assert d["values"] == [1.0, 2.0, 3.0, 4.0]
    d = study.describe_values([2.0, None, 4.0, float("nan")])
    assert d["mean"] == 3.0 and d["std"] == pytest.approx(math.sqrt(2.0))
    assert d["values"] == [2.0, None, 4.0, None]
    assert study.describe_values([5.0]) == {"mean": 5.0, "std": None, "values": [5.0]}


def test_paired_t_interval_by_hand():
    low, high = study.paired_t_interval([1.0, 2.0, 3.0, 4.0])
    half = T_975_3 * math.sqrt(5.0 / 3.0) / 2.0   # t * sd / sqrt(4)
    assert low == pytest.approx(2.5 - half, abs=1e-9) and high == pytest.approx(2.5 + half)
    assert (round(low, 4), round(high, 4)) == (0.4457, 4.5543)
    with pytest.raises(ValueError, match="at least 2"):
        study.paired_t_interval([1.0])


def test_paired_bootstrap_interval_against_the_exact_resampling_distribution():
    # Two differences {0, 1}: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1.
    assert study.paired_bootstrap_interval([0.0, 1.0], n_boot=4000) == (0.0, 1.0)
    assert study.paired_bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    # Four differences: all 4**4 = 256 equally likely resamples, enumerated; the 2.5% and
    # 97.5% quantiles of that distribution are its 7th (ceil(6.4)) and 250th means.
    diffs = [0.0, 1.0, 3.0, 8.0]
    exact = sorted(sum(c) / 4 for c in itertools.product(diffs, repeat=4))
    low, high = study.paired_bootstrap_interval(diffs, n_boot=20000)
    assert exact[5] <= low <= exact[7] and exact[248] <= high <= exact[250]
    assert (exact[6], exact[249]) == (0.5, 6.25)


def test_paired_difference_is_with_minus_without_and_drops_unpaired_seeds():
    d = study.paired_difference([3.0, 5.0, 7.0, 9.0, None], [2.0, 3.0, 4.0, 5.0, 1.0],
                                n_boot=2000)
    assert d["n"] == 4 and d["mean_diff"] == 2.5          # diffs 1, 2, 3, 4
    assert (round(d["ci_low"], 4), round(d["ci_high"], 4)) == (0.4457, 4.5543)
    assert 1.0 <= d["boot_low"] <= d["mean_diff"] <= d["boot_high"] <= 4.0
    one = study.paired_difference([1.0], [0.5])
    assert one["mean_diff"] == 0.5 and one["ci_low"] is None
    with pytest.raises(ValueError, match="equal lengths"):
        study.paired_difference([1.0, 2.0], [1.0])


def _fixture_seeds():
    """Three seeds of fabricated per-arm metrics (plain graddiff forget quality 0.1, 0.2, 0.3;
    with CLReg 0.2, 0.4, 0.3: differences 0.1, 0.2, 0.0)."""
    per_seed = {}
    for seed, (plain, clreg) in zip((7, 3, 5), ((0.1, 0.2), (0.2, 0.4), (0.3, 0.3))):
        per_seed[seed] = {
            "target": {"forget_quality": 0.01, "retain_value_acc": 1.0},
            "oracle": {"forget_quality": 1.0, "retain_value_acc": 1.0},
            "graddiff": {"forget_quality": plain, "retain_value_acc": 0.9, "lr": 1e-4,
                         "final_loss": 2.0, "sweep": [{"lr": 1e-4}]},
            "graddiff+clreg": {"forget_quality": clreg, "retain_value_acc": 0.8, "lr": 1e-4,
                               "sweep": []},
        }
    return per_seed


def test_aggregate_has_the_issue_schema_and_hand_values():
    summary = study.aggregate(_fixture_seeds(), ["graddiff"], "tiny", {"rule": "x"}, n_boot=500)
    assert set(summary) == {"model", "seeds", "protocol", "arms", "paired"}
    assert summary["model"] == "tiny" and summary["seeds"] == [3, 5, 7]
    assert list(summary["arms"]) == ["target", "oracle", "graddiff", "graddiff+clreg"]
    fq = summary["arms"]["graddiff"]["forget_quality"]
    assert fq["values"] == [0.2, 0.3, 0.1]                # seed order 3, 5, 7
    assert fq["mean"] == pytest.approx(0.2) and fq["std"] == pytest.approx(0.1)
    assert set(summary["arms"]["graddiff"]) == {"forget_quality", "retain_value_acc"}
    paired = summary["paired"]["graddiff"]["forget_quality"]
    diffs = [0.2, 0.0, 0.1]                               # with - without, seeds 3, 5, 7
    half = 4.302652729911275 * 0.1 / math.sqrt(3)         # t_{0.975, 2} * sd / sqrt(n)
    assert paired["mean_diff"] == pytest.approx(sum(diffs) / 3)
    assert paired["ci_low"] == pytest.approx(0.1 - half) and paired["ci_high"] == pytest.approx(
        0.1 + half)
    assert summary["paired"]["graddiff"]["retain_value_acc"]["mean_diff"] == pytest.approx(-0.1)


# ----------------------------------------------------------------------------- protocol rule


def _row(seed, lr, fq, utility, weight=None):
    clreg = None if weight is None else {"clreg_weight": weight, "clreg_layer": 2,
                                         "clreg_temperature": 0.1}
    return {"seed": seed, "split": 10.0, "method": "npo", "lr": lr, "clreg": clreg,
            "forget_quality": fq, "utility": utility}


def _validation_table():
    rows = []
    for seed, shift in ((100, 0.01), (101, -0.01)):   # averaged over the two seeds
        rows += [
            _row(seed, 1e-4, 0.10, 0.50 + shift),                # plain: utility 0.50
            _row(seed, 1e-4, 0.30, 0.495 + shift, weight=1.0),   # eligible at 2%: >= 0.49
            _row(seed, 1e-4, 0.90, 0.48 + shift, weight=3.0),    # best FQ, loses 4% utility
            _row(seed, 2e-4, 0.05, 0.40 + shift),                # plain at the larger lr
            _row(seed, 2e-4, 0.25, 0.399 + shift, weight=1.0),   # eligible, lower FQ
        ]
    return rows


def test_protocol_rule_best_forget_quality_within_the_utility_margin():
    chosen = study.select_protocol(_validation_table(), ["npo"], tolerance=0.02)["npo"]
    assert (chosen["lr"], chosen["clreg_weight"]) == (1e-4, 1.0)
    assert chosen["forget_quality"] == pytest.approx(0.30)
    assert chosen["plain_utility"] == pytest.approx(0.50) and not chosen["fallback"]
    assert chosen["n_eligible"] == 2
    # A wider margin admits the 4% utility loss, and its higher forget quality wins.
    wide = study.select_protocol(_validation_table(), ["npo"], tolerance=0.05)["npo"]
    assert (wide["lr"], wide["clreg_weight"]) == (1e-4, 3.0)


def test_protocol_rule_falls_back_to_the_smallest_utility_loss():
    rows = [r for r in _validation_table() if not (r["clreg"] and r["clreg"]["clreg_weight"]
                                                    == 1.0 and r["lr"] == 1e-4)]
    rows = [dict(r, utility=r["utility"] - 0.2) if r["clreg"] else r for r in rows]
    chosen = study.select_protocol(rows, ["npo"], tolerance=0.02)["npo"]
    assert chosen["fallback"] and chosen["n_eligible"] == 0
    # Relative, as eligibility is: 0.28 / 0.50 = 0.56 of the plain utility beats
    # 0.199 / 0.40 = 0.4975 (an absolute loss would pick the other: -0.201 beats -0.22).
    assert (chosen["lr"], chosen["clreg_weight"]) == (1e-4, 3.0)


# ----------------------------------------------------------------------------- configuration


def test_target_check_judges_each_split_on_its_own():
    cfg = study.study_preset(demo.TINY, "full")
    bar = cfg.forget_quality_bar
    per_split = {5.0: {0: {"target": {"forget_quality": 0.51}},
                       1: {"target": {"forget_quality": bar / 10}}},
                 10.0: {0: {"target": {"forget_quality": bar / 10}},
                        1: {"target": {"forget_quality": bar / 2}}}}
    check = study.target_check(cfg, per_split)
    assert check["ok_by_split"] == {"5": False, "10": True}
    assert check["ok"] is False
    assert [c["below_bar"] for c in check["cells"]] == [False, True, True, True]
    # a missing forget quality never passes
    per_split[10.0][1]["target"] = {}
    assert study.target_check(cfg, per_split)["ok_by_split"]["10"] is False


def test_forget_split_sizes_and_errors():
    assert [study.forget_count(100, p) for p in (1, 5, 10)] == [1, 5, 10]
    assert [study.forget_count(40, p) for p in (1, 5, 10)] == [1, 2, 4]
    with pytest.raises(ValueError, match="no retain author"):
        study.forget_count(2, 80)
    base = study.study_preset("tiny", "micro")
    with pytest.raises(ValueError, match="same forget author counts"):
        dataclasses.replace(base, splits=(1, 5))          # both 1 author of 10
    with pytest.raises(ValueError, match="percentages"):
        dataclasses.replace(base, splits=(0, 10))
    with pytest.raises(ValueError, match="micro"):
        study.study_preset("smollm2-135m", "micro")
    with pytest.raises(ValueError, match="unknown grid keys"):
        study.Grid.from_dict({"lrs": [1e-4], "clreg_weights": [1.0], "clreg_layers": [1],
                              "clreg_temperatures": [0.1], "steps": [3]})


def test_one_target_serves_every_split_and_forget_sets_are_nested():
    micro = study.study_preset("tiny", "micro")
    trained, forget = [], []
    for split in micro.splits:
        splits, _, _ = demo.prepare_data(study.seed_config(micro, 3, split), None, None, print)
        trained.append([(ex["input_ids"], ex["concept_id"])
                        for ex in splits["forget"] + splits["retain"]])
        forget.append({ex["concept_id"] for ex in splits["forget"]})
    assert all(t == trained[0] for t in trained)          # same rows, same order
    assert forget[0] < forget[1]                          # 10% of 10 authors in 20% of them
    assert len(forget[0]) == 1 and len(forget[1]) == 2


def test_english_authors_train_the_same_rows_at_every_split():
    """The SmolLM2 data: forget + retain rows do not depend on the forget author count."""
    from clreg_fast.unlearn.english_authors import (EnglishAuthorsConfig,
                                                    generate_english_authors)

    smol = study.study_preset("smollm2-135m")
    trained = []
    for split in smol.splits:
        rows = generate_english_authors(study.seed_config(smol, 5, split).data)
        trained.append(rows["forget"] + rows["retain"])
        assert len({r["author"] for r in rows["forget"]}) == study.forget_count(40, split)
    assert all(t == trained[0] for t in trained)
    assert isinstance(smol.base.data, EnglishAuthorsConfig) and smol.utility_key == "model_utility"


# ----------------------------------------------------------------------------- phases


def test_test_phase_refuses_without_protocol(tmp_path):
    micro = study.study_preset("tiny", "micro")
    runner = study.Runner(micro, str(tmp_path), str(tmp_path / "cache"), progress=False)
    with pytest.raises(FileNotFoundError, match="select"):
        study.run_test(micro, str(tmp_path), [0], runner)
    with pytest.raises(SystemExit):  # the CLI exits with an error, having run nothing
        study.main(["test", "--seeds", "0", "--size", "micro", "--out-dir", str(tmp_path),
                    "--no-progress"])
    assert not (tmp_path / "test").exists()


def _micro_study():
    micro = study.study_preset("tiny", "micro")
    return dataclasses.replace(
        micro, base=dataclasses.replace(micro.base, methods=("graddiff",)),
        # CLReg trains at layer 0; every arm is measured at the preset's layer 1
        grid=study.Grid(lrs=[5e-4, 1e-3], clreg_weights=[1.0], clreg_layers=[0],
                        clreg_temperatures=[0.1]), n_boot=500)


class _Counting(study.Runner):
    """A runner that counts the unlearning runs and the fine-tunings by role."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"unlearn": 0, "target": 0, "oracle": 0}
        self.layers = {"unlearn": set(), "measure": set()}

        def unlearn(target, splits, cfg, method, clreg, *a, **k):
            self.calls["unlearn"] += 1
            if clreg:
                self.layers["unlearn"].add(cfg.clreg_layer)
            return demo.unlearn_copy(target, splits, cfg, method, clreg, *a, **k)

        def evaluate(model, cfg, *a, **k):
            self.layers["measure"].add(cfg.clreg_layer)
            return demo.evaluate_arm(model, cfg, *a, **k)

        def train(role, *a, **k):
            self.calls[role] += 1
            return demo.trained_model(role, *a, **k)

        self.unlearn_fn, self.train_fn, self.evaluate_fn = unlearn, train, evaluate


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """select on validation seed 100, test on seeds 0 and 1 (2 splits each)."""
    root = tmp_path_factory.mktemp("study")
    out, cache = str(root / "out"), str(root / "cache")
    cfg = _micro_study()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
        protocol = study.run_select(cfg, out, [100], runner)
        select_calls = dict(runner.calls, layers=runner.layers)
        runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
        summary = study.run_test(cfg, out, [0, 1], runner)
    finally:
        torch.set_num_threads(threads)
    return cfg, out, cache, protocol, select_calls, summary


@pytest.mark.slow
def test_select_writes_the_protocol_from_validation_seeds_only(micro_run):
    cfg, out, _, protocol, calls, _ = micro_run
    # the primary split (20%) only: 2 lrs x (plain + 1 CLReg setting); one target, one oracle
    assert cfg.selection_splits == [20.0]
    layers = calls.pop("layers")
    assert calls == {"unlearn": 4, "target": 1, "oracle": 1}
    assert layers == {"unlearn": {0}, "measure": {1}}
    with open(os.path.join(out, "protocol.json")) as f:
        written = json.load(f)
    assert written["validation_seeds"] == [100] and written["fingerprint"] == cfg.fingerprint()
    assert set(written["chosen"]) == {"graddiff"} and "rule" in written and "written" in written
    assert {r["seed"] for r in written["validation"]} == {100} and len(written["validation"]) == 4
    assert written["chosen"]["graddiff"]["lr"] in cfg.grid.lrs
    # the protocol is fixed: select refuses once test results exist
    with pytest.raises(RuntimeError, match="already holds test results"):
        study.run_select(cfg, out, [100], study.Runner(cfg, out, "unused", progress=False))


@pytest.mark.slow
def test_micro_study_writes_a_valid_summary(micro_run):
    cfg, out, _, protocol, _, summary = micro_run
    with open(os.path.join(out, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["seeds"] == [0, 1] and on_disk["model"] == "tiny"
    assert on_disk["split"] == cfg.primary_split == 20.0
    assert set(on_disk["arms"]) == {"target", "oracle", "graddiff", "graddiff+clreg"}
    for arm, metrics in on_disk["arms"].items():
        for key in ("forget_quality", "retain_value_acc", "knn_mixing", "entanglement_score"):
            entry = metrics[key]
            assert set(entry) == {"mean", "std", "values"} and len(entry["values"]) == 2, arm
    for key, d in on_disk["paired"]["graddiff"].items():
        assert {"mean_diff", "ci_low", "ci_high"} <= set(d), key
    pair = on_disk["paired"]["graddiff"]["forget_quality"]
    values = on_disk["arms"]
    assert pair["mean_diff"] == pytest.approx(
        values["graddiff+clreg"]["forget_quality"]["mean"]
        - values["graddiff"]["forget_quality"]["mean"])
    assert on_disk["protocol"]["chosen"] == protocol["chosen"]
    for seed in (0, 1):
        for split in cfg.splits:
            with open(os.path.join(study.cell_dir(out, "test", seed, split),
                                   "metrics.json")) as f:
                arms = json.load(f)
            # the lr sweep on the primary split; the other split at the protocol's lr only
            lrs = (cfg.grid.lrs if split == cfg.primary_split
                   else [protocol["chosen"]["graddiff"]["lr"]])
            assert [p["lr"] for p in arms["graddiff+clreg"]["sweep"]] == lrs
    assert os.path.exists(os.path.join(out, "summary-split10.json"))
    with open(os.path.join(out, "headline.md")) as f:
        assert f.read() == study.headline_markdown(on_disk)
    with open(os.path.join(out, "target_check.json")) as f:
        check = json.load(f)
    assert len(check["cells"]) == 4
    assert set(check["ok_by_split"]) == {f"{p:g}" for p in cfg.splits}
    for name in ("tradeoff.png", "privleak.png", "entanglement.png"):
        assert os.path.getsize(os.path.join(out, name)) > 5_000, name
    with open(os.path.join(out, "timings.jsonl")) as f:
        stages = [json.loads(line)["stage"] for line in f]
    assert "select/seed-100/split-20/oracle" in stages and "test/seed-1/target-model" in stages
    # summary.md: the same numbers as summary.json, every split, the sweep and the wall time
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    primary = md[md.index("## Forget split 20%"):md.index("## Learning-rate sweep")]
    assert f"| graddiff | {study._paired_cell(pair)} |" in primary
    assert study._mean_std(values["graddiff"]["forget_quality"]) in md
    assert "## Forget split 10%" in md and "## Learning-rate sweep, split 20%" in md
    assert "| select | oracle | 1 |" in md and "| test | run |" in md
    table = study.timing_table(out)
    select_s = sum(t["total_s"] for t in table
                   if t["phase"] == "select" and t["kind"] != "target-model")
    assert f"select {select_s / 60:.0f} min" in md
    # a split whose target check failed says so above its table, and only such a split
    for split in cfg.splits:
        section = md[md.index(f"## Forget split {split:g}%"):]
        section = section[:section.index("| arm |")]
        assert ("Target check failed in this split" in section) == (
            not check["ok_by_split"][f"{split:g}"])


@pytest.mark.slow
def test_rerun_skips_done_stages_and_redoes_only_what_is_missing(micro_run):
    cfg, out, cache, *_ = micro_run
    runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
    runs_of = lambda split: study.selection_runs(cfg)  # noqa: E731
    runner.run_cells("select", [100], cfg.selection_splits, runs_of)
    assert runner.calls == {"unlearn": 0, "target": 0, "oracle": 0}
    assert runner.stages_run == 0 and runner.stages_skipped == 6   # oracle, target, 4 runs
    os.remove(os.path.join(study.cell_dir(out, "select", 100, 20.0), "arms",
                           study.setting_id("graddiff", 1e-3, None) + ".json"))
    runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
    runner.run_cells("select", [100], cfg.selection_splits, runs_of)
    # the missing run only; the target comes back from the model cache
    assert runner.calls == {"unlearn": 1, "target": 1, "oracle": 0}
    assert runner.stages_run == 1


@pytest.mark.slow
def test_a_stop_inside_the_feature_cell_keeps_the_features_it_made(micro_run):
    """The entanglement picture's features are saved stage by stage: a run stopped inside the
    feature cell keeps those it made, and resuming redoes only the stage that was cut short."""
    cfg, out, cache, protocol, *_ = micro_run
    cell = study.cell_dir(out, "test", 0, cfg.primary_split)
    path = os.path.join(cell, "features.pt")
    kept = torch.load(path)
    runs = [study.setting_id(m, lr, c)
            for m, lr, c in study.final_runs(cfg, protocol, cfg.primary_split)
            if study.setting_id(m, lr, c) in kept]
    assert len(runs) == 2, runs   # graddiff with and without CLReg at the chosen lr
    os.remove(path)
    for name in runs:
        os.remove(os.path.join(cell, "arms", name + ".json"))

    class Stop(Exception):
        pass

    runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
    unlearn = runner.unlearn_fn

    def stop_at_the_last(target, splits, acfg, method, clreg, lr, *a, **k):
        setting = study.chosen_clreg(protocol, method) if clreg else None
        if study.setting_id(method, lr, setting) == runs[-1]:
            raise Stop
        return unlearn(target, splits, acfg, method, clreg, lr, *a, **k)

    runner.unlearn_fn = stop_at_the_last
    with pytest.raises(Stop):
        study.run_test(cfg, out, [0, 1], runner, make_plot=False)
    assert set(torch.load(path)) == set(kept) - {runs[-1]}

    runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
    study.run_test(cfg, out, [0, 1], runner, make_plot=False)
    assert runner.calls["unlearn"] == 1 and runner.calls["oracle"] == 0
    assert set(torch.load(path)) == set(kept)


@pytest.mark.slow
def test_test_phase_guards(micro_run):
    cfg, out, *_ = micro_run
    runner = study.Runner(cfg, out, "unused", progress=False)
    with pytest.raises(ValueError, match="were validation seeds"):
        study.run_test(cfg, out, [100], runner)
    other = dataclasses.replace(cfg, utility_tolerance=0.1)
    with pytest.raises(ValueError, match="differs from the one protocol.json"):
        study.run_test(other, out, [0], runner)
    with pytest.raises(FileNotFoundError, match="run the test phase for seed 2"):
        study.report(cfg, out, [0, 2], make_plot=False)
    # test and report rebuild the configuration from protocol.json
    with open(os.path.join(out, "protocol.json")) as f:
        rebuilt = study.study_from_protocol(json.load(f))
    assert rebuilt.fingerprint() == cfg.fingerprint()


def test_prepare_caches_every_model_a_seed_needs_and_writes_no_stage(tmp_path):
    cfg = _micro_study()
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
        os.makedirs(out)
        assert study.run_prepare(cfg, [7], runner) == 3      # the target, one oracle per split
        assert runner.calls == {"unlearn": 0, "target": 1, "oracle": 2}
        assert os.listdir(out) == ["timings.jsonl"]           # no stage: nothing to select on
        again = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
        assert study.run_prepare(cfg, [7], again) == 0
        # the stages of that seed find every model in the cache (every split, both roles)
        later = _Counting(cfg, out, cache, progress=False, log=lambda t: None)
        later.run_cells("select", [7], cfg.splits, lambda split: [])
        assert later.stages_run == 2 * len(cfg.splits)        # evaluations only
    finally:
        torch.set_num_threads(threads)
    entries = [json.loads(line) for line in open(os.path.join(out, "timings.jsonl"))]
    kinds = [study.stage_kind(e["stage"]) for e in entries]
    assert kinds.count("oracle-model") == 2 and kinds.count("target-model") == 2
    loaded = [e for e in entries if e["stage"].startswith("select/")
              and study.stage_kind(e["stage"]) in ("oracle", "target-model")]
    assert len(loaded) == 3 and all(e["cached_model"] for e in loaded)


def test_unknown_or_no_methods_fail_before_any_training(tmp_path):
    micro = study.study_preset("tiny", "micro")
    for methods in (("graddiff", "gradiff"), ()):
        with pytest.raises(ValueError, match="methods: unknown"):
            dataclasses.replace(micro, base=dataclasses.replace(micro.base, methods=methods))
    with pytest.raises(SystemExit):  # the CLI: a usage error, nothing run
        study.main(["select", "--val-seeds", "100", "--size", "micro", "--methods", "nop",
                    "--out-dir", str(tmp_path), "--no-progress"])
    assert not (tmp_path / "select").exists()


def test_stages_of_another_model_configuration_are_not_reused(tmp_path):
    """A stage is done when its file exists: a folder's stages must come from one model/data
    configuration (a grid or rule change keeps them; a size change must not)."""
    micro = _micro_study()
    out = str(tmp_path)
    study.Runner(micro, out, "unused", progress=False)._claim_phase_dir("select")
    wider = dataclasses.replace(micro, grid=study.Grid(lrs=[1e-3, 2e-3], clreg_weights=[1.0],
                                                       clreg_layers=[0], clreg_temperatures=[0.1]))
    study.Runner(wider, out, "unused", progress=False)._claim_phase_dir("select")  # same base
    bigger = dataclasses.replace(micro, base=dataclasses.replace(micro.base, max_steps=3))
    with pytest.raises(ValueError, match="another model/data configuration"):
        study.Runner(bigger, out, str(tmp_path / "cache"), progress=False).run_cells(
            "select", [100], bigger.selection_splits, lambda split: study.selection_runs(bigger))
    on_device = dataclasses.replace(micro, base=dataclasses.replace(micro.base, device="cpu"))
    study.Runner(on_device, out, "unused", progress=False)._claim_phase_dir("select")


def test_one_seed_says_n_a_instead_of_an_interval():
    one = study.paired_difference([0.7], [0.5])
    assert one["n"] == 1 and one["ci_low"] is None and one["boot_low"] is None
    assert study.paired_line("npo", "privleak", one).endswith(
        "+0.2, 95% t interval n/a (n=1)")
    none = study.paired_difference([None], [0.5])
    assert none["mean_diff"] is None and "n/a" in study.paired_line("npo", "privleak", none)
    two = study.paired_difference([1.0, 2.0], [0.0, 0.0], n_boot=200)
    assert study.paired_line("npo", "privleak", two).endswith("[-4.85, +7.85]")
    summary = study.aggregate({0: _fixture_seeds()[3]}, ["graddiff"], "tiny", {}, n_boot=100)
    assert summary["arms"]["graddiff"]["forget_quality"]["std"] is None
    assert summary["paired"]["graddiff"]["forget_quality"]["ci_high"] is None


def test_plan_counts_pending_stages_and_survives_a_partial_timing_line(tmp_path):
    micro = _micro_study()
    (tmp_path / "timings.jsonl").write_text(
        '{"stage": "select/seed-100/split-20/graddiff-lr0.001", "seconds": 2.0}\n'
        '{"stage": "select/seed-100/split-20/ora')          # killed while appending
    counts = study.plan(micro, str(tmp_path), [100], [0])
    # select: oracle, target, 2 lrs x (plain + 1 CLReg setting); one target fine-tuning
    assert counts["select"]["pending_by_kind"] == {"oracle": 1, "target": 1, "run": 4,
                                                   "target-model": 1}
    assert counts["select"]["pending_seconds"] == 4 * 2.0 and counts["select"]["done"] == 0
    # test (placeholder protocol): 2 splits x (oracle, target) + lr sweep on the primary split
    assert counts["test"]["pending_by_kind"]["run"] == 4 + 2


def test_report_refuses_another_configuration_or_a_validation_seed(tmp_path):
    micro = _micro_study()
    (tmp_path / "protocol.json").write_text(json.dumps(
        {"fingerprint": micro.fingerprint(), "validation_seeds": [100], "chosen": {}}))
    other = dataclasses.replace(micro, utility_tolerance=0.1)
    with pytest.raises(ValueError, match="differs from the one protocol.json"):
        study.report(other, str(tmp_path), [0], make_plot=False)
    with pytest.raises(ValueError, match="were validation seeds"):
        study.report(micro, str(tmp_path), [0, 100], make_plot=False)
    assert not (tmp_path / "summary.json").exists()


def test_cli_usage_errors_exit_cleanly(tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--size", "micro", "--out-dir", out, "--no-progress"]
    bad = [["select", "--val-seeds", "1,1"] + common,                    # not distinct
           ["select", "--val-seeds", "a"] + common,
           ["select", "--val-seeds", "100", "--splits", "10,150"] + common,  # unknown split
           ["select", "--val-seeds", "100", "--primary-split", "30"] + common,
           ["select", "--val-seeds", "100", "--grid", str(tmp_path / "none.json")] + common]
    for argv in bad:
        with pytest.raises(SystemExit) as exit_info:
            study.main(argv)
        assert exit_info.value.code == 2, argv
    # select into a folder holding another configuration's stages: a usage error too
    os.makedirs(os.path.join(out, "select"))
    with open(os.path.join(out, "select", "stages.json"), "w") as f:
        json.dump({"stage_fingerprint": "0" * 16}, f)
    with pytest.raises(SystemExit):
        study.main(["select", "--val-seeds", "100"] + common)
    assert "another model/data configuration" in capsys.readouterr().err


def test_readme_quotes_each_linked_study_as_committed():
    """README's result rows are read off summary.json: for every study folder README links to,
    each row of headline_markdown(summary.json) appears in README verbatim (and headline.md on
    disk is that table)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "README.md")) as f:
        readme = f.read()
    results = os.path.join(repo, "experiments", "results")
    linked = [name for name in sorted(os.listdir(results))
              if f"experiments/results/{name}/summary.md" in readme]
    assert "study-tiny" in linked
    for name in linked:
        with open(os.path.join(results, name, "summary.json")) as f:
            table = study.headline_markdown(json.load(f))
        with open(os.path.join(results, name, "headline.md")) as f:
            assert f.read() == table, name
        for row in table.splitlines():
            assert row in readme, f"{name}: README lacks {row!r}"


def test_a_protocol_rebuilds_its_own_data_configuration_after_the_preset_changed():
    cfg = study.study_preset(demo.TINY, "micro")
    older = dataclasses.replace(cfg, base=dataclasses.replace(
        cfg.base, data=dataclasses.replace(cfg.base.data, n_authors=12), lrs=(1e-3, 2e-3)))
    assert older.stage_fingerprint() != cfg.stage_fingerprint()
    rebuilt = study.study_from_protocol({"study": older.describe()})
    assert rebuilt.fingerprint() == older.fingerprint()
    assert rebuilt.stage_fingerprint() == older.stage_fingerprint()
    assert type(rebuilt.base.data) is type(cfg.base.data) and rebuilt.base.lrs == (1e-3, 2e-3)
