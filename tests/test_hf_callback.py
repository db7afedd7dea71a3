"""RepresentationMetricsCallback on a real ``transformers.Trainer`` with a tiny random-init LLaMA.

Expected values come from a separate path: the weights recorded at each step are loaded into a
fresh model, decoder-layer outputs are read from ``output_hidden_states`` and pooled row by row
in a plain loop, and the metric functions are called on those features.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from tests._torchrun import run_torchrun

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
pytest.importorskip("sklearn")

from transformers import TrainerCallback  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import hf_testing as H  # noqa: E402

import clreg_fast.metrics as RM  # noqa: E402
from clreg_fast.integrations.hf_callback import RepresentationMetricsCallback  # noqa: E402

LAYER = 1  # of H.N_LAYERS = 3: hidden_states[LAYER + 1] is this decoder layer's output


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def probe_rows(n, seed, concept=0):
    gen = torch.Generator().manual_seed(seed)
    return [H._example(gen, concept) for _ in range(n)]


class Recorder(TrainerCallback):
    """Weights at each measured moment, every on_log payload (as a reporter sees it), and the
    model's mode when each step ends."""

    def __init__(self):
        self.weights, self.logs, self.training_at_step_end = {}, [], []

    def _keep(self, state, model):
        self.weights[state.global_step] = copy.deepcopy(model.state_dict())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._keep(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._keep(state, model)
        self.training_at_step_end.append(model.training)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def reference_features(state_dict, rows, pooling):
    """Pooled LAYER outputs of a fresh model with ``state_dict``, one row per forward."""
    model = H.tiny_model()
    model.load_state_dict(state_dict)
    model.eval()
    feats = []
    with torch.no_grad():
        for row in rows:
            ids = torch.as_tensor(row["input_ids"])[None]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
            if "labels" in row:
                keep = [i for i, y in enumerate(row["labels"]) if y != -100]
            else:
                keep = list(range(ids.shape[1]))
            vectors = [hidden[i].double() for i in keep]
            feats.append(sum(vectors) / len(vectors) if pooling == "mean" else vectors[-1])
    return torch.stack(feats)


def expected_metrics(recorder, step, forget, retain, pooling, k, names, reference_step=0):
    f = reference_features(recorder.weights[step], forget, pooling)
    r = reference_features(recorder.weights[step], retain, pooling)
    r0 = reference_features(recorder.weights[reference_step], retain, pooling)
    out = {"entanglement_score": RM.entanglement_score(f, r),
           "knn_mixing": RM.knn_mixing(f, r, k=k),
           "silhouette": RM.forget_retain_silhouette(f, r),
           "linear_probe_acc": RM.linear_probe_accuracy(f, r),
           "forget_retain_cos": RM.mean_cosine(f, r), "retain_drift": RM.feature_drift(r0, r)}
    return {name: out[name] for name in names}


def repr_entries(log_history, prefix="repr/"):
    return [e for e in log_history if any(key.startswith(prefix) for key in e)]


@pytest.mark.slow  # about 6 s: four steps, three measurements, their float64 references
def test_metrics_logged_at_logging_steps_with_the_mixin(tmp_path):
    forget, retain = probe_rows(6, seed=1, concept=1), probe_rows(9, seed=2)
    trainer = H.CLRegGradDiff(model=H.tiny_model(),
                              args=H.training_args(tmp_path, max_steps=4, logging_steps=2,
                                                   learning_rate=0.05),
                              train_dataset=H.make_pairs(16, seed=0), data_collator=H.collate_pairs,
                              clreg_layer=LAYER)
    recorder = Recorder()
    trainer.add_callback(recorder)
    callback = RepresentationMetricsCallback(forget, retain, layer=LAYER, k=3, batch_size=4)
    assert callback.attach(trainer) is callback
    trainer.train()

    entries = repr_entries(trainer.state.log_history)
    assert [e["step"] for e in entries] == [0, 2, 4]
    names = RM.METRIC_NAMES
    for entry in entries:
        want = expected_metrics(recorder, entry["step"], forget, retain, "mean", 3, names)
        assert set(entry) - {"step", "epoch"} == {"repr/" + n for n in names}
        for name, value in want.items():
            assert entry["repr/" + name] == pytest.approx(value, rel=1e-5, abs=1e-6), \
                (entry["step"], name)
    # The model moves between measurements, so a measurement of the wrong step would show.
    first, last = entries[0]["repr/entanglement_score"], entries[-1]["repr/entanglement_score"]
    assert abs(first - last) > 1e-3 * abs(first)
    assert entries[0]["repr/retain_drift"] == pytest.approx(0.0, abs=1e-6)
    assert entries[-1]["repr/retain_drift"] > 1e-4  # the model moved
    # The Trainer's own loss logs (with the mixin's clreg_loss) still come at steps 2 and 4:
    # logging our entry must not consume the step's should_log.
    losses = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in losses] == [2, 4]
    assert all("clreg_loss" in e for e in losses)
    # Every callback's on_log saw our keys (as TensorBoard/W&B would), once per measurement.
    seen = [log for log in recorder.logs if "repr/knn_mixing" in log]
    assert len(seen) == 3
    # The model trained in train mode: each measurement restored it.
    assert recorder.training_at_step_end == [True] * 4


class EvaluateLikeOpenUnlearning(H.PlainGradDiff):
    """OpenUnlearning's trainers override evaluate (their evaluators run there; without one it
    returns {} and logs nothing)."""

    def evaluate(self, *args, **kwargs):
        return {}


def test_metrics_at_evaluation_steps_on_a_plain_trainer_with_a_batch_probe(tmp_path):
    forget, retain = probe_rows(5, seed=3, concept=1), probe_rows(7, seed=4)
    # A tokenized batch without labels: pooled over the attended tokens (right padding).
    width = max(len(r["input_ids"]) for r in retain)
    batch = {"input_ids": torch.zeros(len(retain), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(retain), width, dtype=torch.long)}
    for i, row in enumerate(retain):
        batch["input_ids"][i, :len(row["input_ids"])] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :len(row["input_ids"])] = 1
    forget_plain = [{"input_ids": r["input_ids"]} for r in forget]
    retain_plain = [{"input_ids": r["input_ids"]} for r in retain]
    trainer = EvaluateLikeOpenUnlearning(
        model=H.tiny_model(), args=H.training_args(tmp_path, max_steps=4, logging_steps=1,
                                                   eval_strategy="steps", eval_steps=3,
                                                   learning_rate=0.05),
        train_dataset=H.make_pairs(16, seed=1), eval_dataset=H.make_pairs(4, seed=2),
        data_collator=H.collate_pairs)
    recorder = Recorder()
    trainer.add_callback(recorder)
    names = ("entanglement_score", "knn_mixing", "silhouette")
    RepresentationMetricsCallback(forget_plain, batch, layer=LAYER, pooling="last", k=2,
                                  when="evaluate", metrics=names, at_train_begin=False,
                                  prefix="probe_").attach(trainer)
    trainer.train()

    entries = repr_entries(trainer.state.log_history, prefix="probe_")
    assert [e["step"] for e in entries] == [3, 4]  # eval_steps, and the final step
    for entry in entries:
        want = expected_metrics(recorder, entry["step"], forget_plain, retain_plain, "last", 2,
                                names)
        for name, value in want.items():
            assert entry["probe_" + name] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]


def test_epoch_logging_strategy_measures_at_each_epoch_end(tmp_path):
    # logging_strategy="epoch": DefaultFlowCallback sets should_log in on_epoch_end, not in
    # on_step_end, so only the callback's on_epoch_end sees it.
    trainer = H.PlainGradDiff(model=H.tiny_model(),
                              args=H.training_args(tmp_path, max_steps=-1, num_train_epochs=2,
                                                   logging_strategy="epoch"),
                              train_dataset=H.make_pairs(8, seed=3), data_collator=H.collate_pairs)
    RepresentationMetricsCallback(probe_rows(3, 13, concept=1), probe_rows(3, 14), layer=LAYER,
                                  k=2, metrics=("knn_mixing",)).attach(trainer)
    trainer.train()
    history = trainer.state.log_history
    assert [e["step"] for e in repr_entries(history)] == [0, 2, 4]
    assert [e["step"] for e in history if "loss" in e] == [2, 4]


def test_the_callback_does_not_change_training(tmp_path):
    def run(with_callback):
        trainer = H.CLRegGradDiff(model=H.tiny_model(),
                                  args=H.training_args(tmp_path / str(with_callback), max_steps=3,
                                                       learning_rate=0.05),
                                  train_dataset=H.make_pairs(12, seed=5),
                                  data_collator=H.collate_pairs, clreg_layer=LAYER)
        if with_callback:
            RepresentationMetricsCallback(probe_rows(4, 6), probe_rows(4, 7), layer=LAYER,
                                          k=2, metrics=("knn_mixing", "retain_drift")
                                          ).attach(trainer)
        trainer.train()
        return trainer.model.state_dict()

    plain, measured = run(False), run(True)
    for name, value in plain.items():
        assert torch.equal(value, measured[name]), name


def test_compute_equals_the_metric_functions_on_its_features():
    model = H.tiny_model()
    forget, retain = probe_rows(5, seed=8, concept=1), probe_rows(6, seed=9)
    callback = RepresentationMetricsCallback(forget, retain, layer=-1, k=2,
                                             metrics=("knn_mixing", "forget_retain_cos"))
    assert RepresentationMetricsCallback(forget, retain, metrics="knn_mixing").metrics == (
        "knn_mixing",)  # one name, not its letters
    model.train()
    f, r = callback.features(model)
    assert model.training and all(m.training for m in model.modules())
    assert f.shape == (5, 32) and r.shape == (6, 32)
    assert callback.compute(model) == {"knn_mixing": RM.knn_mixing(f, r, k=2),
                                       "forget_retain_cos": RM.mean_cosine(f, r)}


    class Indexable:  # a row collection that is not a list, as a datasets.Dataset is
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    other = RepresentationMetricsCallback(Indexable(forget), Indexable(retain), layer=-1, k=2)
    f2, r2 = other.features(model)
    assert torch.equal(f, f2) and torch.equal(r, r2)


def test_a_ragged_batch_dict_is_read_row_by_row():
    # A tokenizer's output without padding: lists of different lengths under each key.
    model = H.tiny_model()
    forget, retain = probe_rows(4, seed=15, concept=1), probe_rows(3, seed=16)
    ragged = {key: [row[key] for row in forget] for key in ("input_ids", "labels")}
    make = RepresentationMetricsCallback
    by_batch = make(ragged, retain, layer=LAYER, k=2).features(model)
    by_rows = make(forget, retain, layer=LAYER, k=2).features(model)
    assert all(torch.equal(a, b) for a, b in zip(by_batch, by_rows))
    with pytest.raises(ValueError, match=r"\(rows, tokens\)"):
        make({"input_ids": torch.tensor([5, 6])}, retain)


def test_train_begin_forwards_the_probe_sets_once(tmp_path):
    # The drift reference and the first measurement share one forward.
    trainer = H.PlainGradDiff(model=H.tiny_model(), args=H.training_args(tmp_path, max_steps=1),
                              train_dataset=H.make_pairs(4), data_collator=H.collate_pairs)
    callback = RepresentationMetricsCallback(probe_rows(3, seed=17, concept=1),
                                             probe_rows(3, seed=18), layer=LAYER, k=2,
                                             metrics=("knn_mixing", "retain_drift"))
    callback.attach(trainer)
    forwards, features = [], callback.features
    callback.features = lambda *args, **kwargs: forwards.append(1) or features(*args, **kwargs)
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert len(forwards) == 1
    assert repr_entries(trainer.state.log_history)[-1]["repr/retain_drift"] == pytest.approx(
        0.0, abs=1e-12)


def test_errors_are_clear(tmp_path):
    rows = probe_rows(3, seed=10)
    make = RepresentationMetricsCallback
    with pytest.raises(ValueError, match="pooling"):
        make(rows, rows, pooling="token")
    with pytest.raises(ValueError, match="when"):
        make(rows, rows, when="epoch")
    with pytest.raises(ValueError, match="metrics"):
        make(rows, rows, metrics=("knn",))
    with pytest.raises(ValueError, match="k must be"):
        make(rows, rows, k=6)  # pool = 3 - 1 + 3
    with pytest.raises(ValueError, match="no rows"):
        make([], rows)
    with pytest.raises(ValueError, match="no token to pool"):
        make([{"input_ids": [5, 6], "labels": [-100, -100]}], rows)
    with pytest.raises(ValueError, match="every row has labels or none"):
        make([{"input_ids": [5, 6]}, rows[0]], rows)
    with pytest.raises(ValueError, match="differ in length"):
        make([{"input_ids": [5, 6], "attention_mask": [1]}], rows)
    with pytest.raises(TypeError, match="batch dict or a list"):
        make("text", rows)
    trainer = H.PlainGradDiff(model=H.tiny_model(), args=H.training_args(tmp_path, max_steps=1),
                              train_dataset=H.make_pairs(4), data_collator=H.collate_pairs)
    with pytest.raises(ValueError, match="out of range"):
        make(rows, rows, layer=7, k=2).attach(trainer)
    # Passed in callbacks=[...] without attach: a clear error when training starts.
    trainer.add_callback(make(rows, rows, k=2))
    with pytest.raises(RuntimeError, match="attach"):
        trainer.train()


@pytest.mark.slow
def test_two_process_ddp_gloo_every_rank_logs_the_same_metrics(tmp_path):
    result = run_torchrun(os.path.join(SCRIPTS, "hf_callback_worker.py"),
                          ["--output-dir", tmp_path / "run"], tmp_path / "ddp.pt")
    assert result["world_size"] == 2
    rank0, rank1 = result["ranks"]
    assert rank0["wrapped"] == "DistributedDataParallel"
    assert [e["step"] for e in rank0["logged"]] == [0, 1, 2]
    assert rank0["logged"] == rank1["logged"]  # every rank measured, with equal weights
    last = rank0["logged"][-1]
    assert {k: last["repr/" + k] for k in rank0["final"]} == pytest.approx(rank0["final"])
    assert last["repr/retain_drift"] > 0


def test_an_evaluate_call_outside_training_is_measured_once(tmp_path):
    trainer = H.PlainGradDiff(model=H.tiny_model(), args=H.training_args(tmp_path, max_steps=1),
                              train_dataset=H.make_pairs(4), data_collator=H.collate_pairs)
    forget, retain = probe_rows(3, seed=11, concept=1), probe_rows(4, seed=12)
    callback = RepresentationMetricsCallback(forget, retain, layer=LAYER, k=2, when="evaluate",
                                             metrics=("knn_mixing", "retain_drift"))
    callback.attach(trainer)
    for _ in range(2):  # what Trainer.evaluate() signals when it ends
        trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control,
                                             metrics={})
    entries = [{k: v for k, v in e.items() if k != "epoch"}
               for e in repr_entries(trainer.state.log_history)]
    f, r = callback.features(trainer.model)
    # No train begin, so no drift reference: retain_drift is left out.
    assert entries == [{"repr/knn_mixing": RM.knn_mixing(f, r, k=2), "step": 0}]
