"""CPU checks of the benchmark code (clreg_fast.bench, benchmarks/): parsing, plans, the FLOP
model, the OOM path, CSV/markdown/PNG writing on a tiny run, peak-RSS children, the GPU suite's
CPU-checkable parts. No timing is asserted."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clreg_fast.bench import config as cfg
from clreg_fast.bench import measure, report, sweep
from clreg_fast.bench.__main__ import main as bench_main
from clreg_fast.bench.config import BenchConfig, Task
from clreg_fast.bench.flops import flop_model, matrix_bytes, roofline
from clreg_fast.bench.peak_rss import measure_peak_rss, run_child
from clreg_fast.bench.providers import make_inputs, make_loss_fn

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Parsing and configs

def test_parse_sizes_accepts_k_suffix_and_rejects_garbage():
    assert cfg.parse_sizes("1k, 2048,256K") == [1024, 2048, 262144]
    for bad in ("abc", "", "0", "-4", "1.5k"):
        with pytest.raises(ValueError):
            cfg.parse_sizes(bad)


def test_parse_lists():
    assert cfg.parse_projections("128,256,none") == [128, 256, None]
    assert cfg.parse_dtypes("bf16,float32,half") == ["bf16", "fp32", "fp16"]
    assert cfg.parse_labels("on,off") == [True, False]
    assert cfg.parse_retain("grad,detached") == [False, True]
    assert cfg.parse_providers("torch,reference,torch") == ["torch", "reference"]
    with pytest.raises(ValueError, match="dtype"):
        cfg.parse_dtypes("int8")
    with pytest.raises(ValueError, match="provider"):
        cfg.parse_providers("numpy")
    with pytest.raises(ValueError, match="labels"):
        cfg.parse_labels("maybe")
    with pytest.raises(TypeError):
        cfg.parse_sizes(1024)


@pytest.mark.parametrize("kwargs, match", [
    (dict(nf=1, nr=4, d=8, p=4), "nf"),
    (dict(nf=4, nr=-1, d=8, p=4), "nr"),
    (dict(nf=4, nr=4, d=0, p=4), "d"),
    (dict(nf=4, nr=4, d=8, p=0), "p"),
    (dict(nf=4, nr=4, d=8, p=4, dtype="int8"), "dtype"),
    (dict(nf=8, nr=4, d=8, p=4, labels=True), "labels"),
])
def test_bench_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_config_dict_round_trip():
    c = BenchConfig(64, 32, 16, None, "bf16", True, True, 0.05)
    assert BenchConfig.from_dict(c.to_dict()) == c
    assert "no proj" in c.group_label() and "detached" in c.group_label()


def test_gpu_plan_puts_target_and_largest_size_first():
    tasks = cfg.expand(cfg.preset_jobs("gpu"))
    head = [t.provider for t in tasks[:5]]
    assert all(t.config == cfg.TARGET for t in tasks[:5])
    assert head == ["reference", "eager_native", "torch", "triton", "cuda"]
    # then the 262144-per-side tasks, then torch.compile on the target (slow to compile)
    big = tasks[5:8]
    assert all(t.config.nf == t.config.nr == 262144 for t in big)
    assert {t.provider for t in big} == {"reference", "triton", "cuda"}
    assert [(t.config, t.provider) for t in tasks[8:10]] == [
        (cfg.TARGET, "compile"), (cfg.TARGET, "compile_native")]
    assert len(set(tasks)) == len(tasks)
    assert all(t.config.nf <= cfg.GPU_MAX_N["torch"] for t in tasks if t.provider == "torch")
    assert not [t for t in tasks if t.provider.endswith("_native") and t.config.dtype == "fp32"]
    sizes = {t.config.nf for t in tasks}
    assert min(sizes) == 1024 and max(sizes) == 262144
    assert {t.config.d for t in tasks} == {2048, 4096}
    assert {t.config.p for t in tasks} == {128, 256, None}
    assert {t.config.dtype for t in tasks} == {"bf16", "fp32"}


def test_preset_filter_and_unknown_preset():
    jobs = cfg.preset_jobs("cpu", providers=["torch"])
    assert jobs and all(provs == ["torch"] for _, provs in jobs)
    with pytest.raises(ValueError, match="preset"):
        cfg.preset_jobs("tpu")


# --------------------------------------------------------------------------------------------
# FLOP model

def test_flop_model_hand_counted():
    # nf=3, nr=5 (N=8), D=7, P=2: similarity 2*3*8*2 = 96, projection 2*8*7*2 = 224
    assert flop_model(BenchConfig(3, 5, 7, 2)) == {"fwd": 320, "bwd": 736, "fwd_bwd": 1056}
    # retain detached, projection trained: retain rows still need dZ (for dW), only dX_r is saved
    assert flop_model(BenchConfig(3, 5, 7, 2, retain_detached=True))["bwd"] == 288 + 224 + 84
    # no projection: K = D = 7, similarity 2*3*8*7 = 336
    assert flop_model(BenchConfig(3, 5, 7, None)) == {"fwd": 336, "bwd": 1008, "fwd_bwd": 1344}
    # no projection, retain detached: the column gradient covers the forget columns only
    assert flop_model(BenchConfig(3, 5, 7, None, retain_detached=True))["bwd"] == 672 + 126


@pytest.mark.parametrize("p", [16, None])
def test_flop_model_matches_flop_counter_on_reference(p):
    """Forward: exactly the matmuls of the eager reference. Backward: the reference's autograd
    matmuls plus the one recompute product the fused algorithm adds."""
    from torch.utils.flop_counter import FlopCounterMode

    from clreg_fast import clreg_loss_reference

    c = BenchConfig(24, 40, 32, p, "fp32")
    x = make_inputs(c, CPU)
    with FlopCounterMode(display=False) as fwd_counter:
        loss = clreg_loss_reference(x["forget"], x["retain"], x["weight"], x["bias"])
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    model = flop_model(c)
    k = p or c.d
    assert fwd_counter.get_total_flops() == model["fwd"]
    assert bwd_counter.get_total_flops() + 2 * c.nf * c.n * k == model["bwd"]


def test_roofline_numbers():
    r = roofline(2e12, 0.5, 8e12)  # 4 TFLOP/s achieved of 8 measured
    assert r["tflops"] == pytest.approx(4.0)
    assert r["frac_of_matmul"] == pytest.approx(0.5)
    assert r["x_roofline_floor"] == pytest.approx(2.0)
    assert math.isnan(roofline(1.0, 0.0, 1.0)["tflops"])
    assert matrix_bytes(BenchConfig(4, 6, 8, 2)) == 4 * 10 * 4


# --------------------------------------------------------------------------------------------
# Measurement helpers

def test_is_oom_classification():
    assert measure.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"))
    assert measure.is_oom(MemoryError())
    assert measure.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not measure.is_oom(RuntimeError("shape mismatch"))
    assert not measure.is_oom(ValueError("out of memory"))  # only RuntimeError texts count


def test_quartiles():
    q = measure.quartiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (q["q1"], q["median"], q["q3"]) == (2.0, 3.0, 4.0)
    assert measure.quartiles([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0}
    assert math.isnan(measure.quartiles([])["median"])


def test_providers_agree_on_the_loss():
    """The bench's inputs and provider closures compute the same loss (a wrong wiring would show)."""
    c = BenchConfig(48, 40, 24, 8, "fp32", labels=True)
    x = make_inputs(c, CPU, seed=3)
    ref = make_loss_fn("reference", c)(x).detach()
    assert float(make_loss_fn("torch", c)(x).detach()) == pytest.approx(float(ref), rel=1e-5)
    assert x["labels"] is not None and x["retain"].requires_grad
    low = BenchConfig(48, 40, 24, 8, "bf16")
    xl = make_inputs(low, CPU, seed=3)
    ref_low = float(make_loss_fn("reference", low)(xl).detach())
    native = make_loss_fn("eager_native", low)(xl)
    assert native.dtype == torch.float32  # bf16 math, float32 out as the spec says
    assert float(native.detach()) == pytest.approx(ref_low, rel=3e-2)
    d = make_inputs(BenchConfig(48, 40, 24, None, "bf16", retain_detached=True), CPU)
    assert d["weight"] is None and not d["retain"].requires_grad and d["forget"].requires_grad
    assert d["forget"].dtype == torch.bfloat16 and d["forget"].abs().sum() > 0


def test_supcon_provider_equals_the_reference():
    """pytorch-metric-learning's SupConLoss with unique retain labels is the spec's loss.

    (Not with a single concept and no retain rows: SupConLoss returns 0 when there is no
    negative pair at all; the bench always has retain rows.)
    """
    pytest.importorskip("pytorch_metric_learning")
    for c in (BenchConfig(40, 21, 12, 6, "fp32", labels=True), BenchConfig(9, 4, 5, None, "fp32")):
        x = make_inputs(c, CPU, seed=1)
        ref = make_loss_fn("reference", c)(x)
        got = make_loss_fn("supcon", c)(x)
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        ref_grads = torch.autograd.grad(ref, [x["forget"]])
        got_grads = torch.autograd.grad(got, [x["forget"]])
        torch.testing.assert_close(got_grads[0], ref_grads[0], rtol=1e-4, atol=1e-6)


def test_measure_task_records_unavailable_provider():
    row = measure.measure_task(Task(BenchConfig(8, 8, 4, 2, "fp32"), "cuda"), CPU)
    assert row["status"] == "unavailable" and "GPU" in row["note"]


# --------------------------------------------------------------------------------------------
# A tiny sweep, its files, and the OOM path

TINY_OPTS = dict(warmup=1, reps=2, min_reps=1, rep_time_s=0.05, memory=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a busy shared CPU are faster and steadier on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    tasks = cfg.expand(cfg.preset_jobs("tiny"))
    rows = sweep.run_sweep(tasks, CPU, out, sweep.SweepOptions(**TINY_OPTS), log=lambda s: None)
    return out, rows


def test_tiny_run_writes_csv_markdown_and_png(tiny_run):
    out, rows = tiny_run
    assert {r["status"] for r in rows} == {"ok"}
    back = report.read_csv(out / "results.csv")
    assert len(back) == len(rows) == 8
    row = back[0]
    assert set(report.COLUMNS) == set(row)
    assert row["device_type"] == "cpu" and row["torch_version"] == torch.__version__
    assert row["git_commit"] and row["date_utc"].endswith("Z")
    assert isinstance(row["nf"], int) and row["p"] in (16, None) and row["labels"] is False
    assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0
    assert row["fwd_bwd_ms_q1"] <= row["fwd_bwd_ms"] <= row["fwd_bwd_ms_q3"]
    assert row["flops_fwd_bwd"] == flop_model(report.config_of(row))["fwd_bwd"]
    assert row["matmul_tflops"] > 0 and row["x_roofline_floor"] > 0
    assert any(r["p"] is None for r in back)
    # each config has both providers, and they saw the same inputs (loss from the memory pass
    # is absent here, so compare their FLOP counts and sizes instead)
    for key in {report.config_key(r) for r in back}:
        pair = [report._find(back, p, key) for p in ("reference", "torch")]
        assert all(r is not None and r["status"] == "ok" for r in pair)
    md = (out / "results.md").read_text()
    assert "| N | provider |" in md and "D=32, P=16, fp32" in md and "D=32, no proj" in md
    assert "Targets" not in md  # the headline GPU config is not in this run
    data = (out / "time_vs_n.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not (out / "memory_vs_n.png").exists()  # memory was off: nothing to plot
    assert (out / "meta.json").exists()


def test_memory_plot_with_oom_marker(tiny_run, tmp_path):
    _, rows = tiny_run
    rows = [dict(r, peak_increase_mib=0.01 * r["nf"] * (10 if r["provider"] == "reference" else 1))
            for r in rows]
    rows.append(dict(rows[0], nf=256, nr=256, status="OOM", note="CUDA out of memory"))
    path = report.plot(rows, tmp_path / "memory.png", "memory")
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    assert report.plot(rows[:1], tmp_path / "none.png", "memory") is None  # one size: no curve


def test_report_subcommand_rewrites_outputs(tiny_run, tmp_path):
    out, _ = tiny_run
    assert bench_main(["report", "--csv", str(out / "results.csv"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "time_vs_n.png").read_bytes()[:8] == PNG_MAGIC


def test_oom_is_recorded_and_larger_sizes_are_not_run(tmp_path, monkeypatch):
    real = measure.make_loss_fn

    def fake(provider, config):
        if provider == "torch" and config.nf >= 128:
            def boom(_):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
            return boom
        if provider == "reference" and config.nf == 128:
            def broken(_):
                raise ValueError("a provider bug")
            return broken
        return real(provider, config)

    monkeypatch.setattr(measure, "make_loss_fn", fake)
    tasks = cfg.expand([(BenchConfig(n, n, 16, 8, "fp32"), ["reference", "torch"])
                        for n in (64, 128, 256)])
    rows = sweep.run_sweep(tasks, CPU, tmp_path, sweep.SweepOptions(**TINY_OPTS),
                           log=lambda s: None)
    status = {(r["provider"], r["nf"]): (r["status"], r["note"]) for r in rows}
    assert status[("torch", 64)][0] == "ok"
    assert status[("torch", 128)][0] == "OOM" and "out of memory" in status[("torch", 128)][1]
    assert status[("torch", 256)][0] == "OOM" and status[("torch", 256)][1].startswith("not run")
    assert status[("reference", 128)] [0] == "error" and "provider bug" in status[("reference", 128)][1]
    assert status[("reference", 256)][0] == "ok"  # an error does not stop the sweep
    with open(tmp_path / "results.csv", newline="") as handle:
        assert [r["status"] for r in csv.DictReader(handle)].count("OOM") == 2
    md = (tmp_path / "results.md").read_text()
    assert "| 128 | torch | OOM |" in md and "## Not measured" in md
    assert (tmp_path / "time_vs_n.png").read_bytes()[:8] == PNG_MAGIC


def test_budget_skips_tasks_predicted_to_overrun(tmp_path):
    tasks = cfg.expand([(BenchConfig(n, n, 16, 8, "fp32"), ["torch"]) for n in (64, 4096)])
    costs = sweep.CostModel()
    costs.add(tasks[0], 0.01, 0.0)
    # 4096 is 64^2 times the work of 64 per side: ~40 s per run predicted, far over 1 s of budget
    assert costs.predict(tasks[1], runs=4) > 100
    opts = sweep.SweepOptions(**{**TINY_OPTS, "budget_s": 0.0})
    rows = sweep.run_sweep(tasks, CPU, tmp_path, opts, log=lambda s: None)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "budget" in rows[0]["note"]


def test_device_size_rules(tmp_path, monkeypatch):
    """On a (pretend) 1 MiB device: compile is not run where one matrix cannot fit, eager is run
    there even with no budget left (its OOM is instant on a GPU), the rest obeys the budget."""
    monkeypatch.setattr(sweep, "_device_bytes", lambda device: 2**20)
    c = BenchConfig(512, 512, 8, 4, "fp32")  # one fp32 matrix: 4 MiB
    tasks = cfg.expand([(c, ["compile", "reference", "torch"])])
    opts = sweep.SweepOptions(**{**TINY_OPTS, "budget_s": 0.0})
    rows = sweep.run_sweep(tasks, CPU, tmp_path, opts, log=lambda s: None)
    status = {r["provider"]: (r["status"], r["note"]) for r in rows}
    assert status["compile"][0] == "OOM" and "not run" in status["compile"][1]
    assert status["reference"][0] == "ok"  # run despite the budget (the CPU has the memory)
    assert status["torch"][0] == "skipped"


def test_target_checks_pass_and_fail():
    base = dict(BenchConfig(8192, 8192, 4096, 256, "bf16").to_dict(), status="ok")

    def row(provider, ms, mib, floor=math.nan, **kw):
        return {**base, "provider": provider, "fwd_bwd_ms": ms, "peak_increase_mib": mib,
                "x_roofline_floor": floor, **kw}

    rows = [row("reference", 30.0, 4000.0), row("compile", 12.0, 3000.0),
            row("triton", 5.0, 100.0, 1.2), row("cuda", 4.0, 90.0, 1.1),
            row("reference", math.nan, math.nan, nf=262144, nr=262144, status="OOM"),
            row("cuda", 900.0, 5000.0, 1.3, nf=262144, nr=262144)]
    checks = report.target_checks(rows)
    assert [c["verdict"] for c in checks] == ["PASS"] * 5
    assert "cuda" in checks[0]["check"]  # the faster fused kernel is the one judged
    rows[3]["fwd_bwd_ms"] = 20.0  # cuda slower now: triton is judged, still 6x and 2.4x
    rows[2]["fwd_bwd_ms"] = 11.0  # triton: 30/11 < 3, 12/11 < 1.5
    verdicts = {c["check"].split(" ", 2)[-1]: c["verdict"] for c in report.target_checks(rows)}
    assert verdicts["speed-up over eager reference"] == "FAIL"
    assert verdicts["speed-up over torch.compile"] == "FAIL"
    assert "| PASS |" in report.markdown(rows) or "| FAIL |" in report.markdown(rows)


# --------------------------------------------------------------------------------------------
# CLI

def test_cli_dry_run_and_bad_arguments(capsys):
    assert bench_main(["--preset", "gpu", "--device", "cpu", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan:") and "N=8192/8192 D=4096, P=256, bf16" in lines[1]
    assert bench_main(["--n", "1k,2k", "--p", "none", "--providers", "torch", "--device", "cpu",
                       "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 tasks" in out and "no proj" in out
    assert bench_main(["--n", "12q", "--device", "cpu", "--dry-run"]) == 2
    assert "--n" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Peak RSS in child processes (each child imports torch: a few seconds)

def test_measure_peak_rss_sees_the_similarity_matrix(capsys):
    """Eager holds at least one (Nf, Nf + Nr) float32 matrix at its peak; the chunked backend
    less. The torch side goes through the CLI entry (JSON on stdout)."""
    import json

    from clreg_fast.bench.peak_rss import main as peak_rss_main

    c = BenchConfig(1024, 1024, 64, None, "fp32")
    ref = measure_peak_rss("reference", 1024, 1024, 64, None, "fp32", threads=1)
    assert ref["status"] == "ok", ref
    assert ref["increase_bytes"] >= matrix_bytes(c, 4)
    assert ref["peak_rss_bytes"] == ref["baseline_rss_bytes"] + ref["increase_bytes"]
    assert ref["inputs_bytes"] == 2 * 1024 * 64 * 4
    assert peak_rss_main(["--provider", "torch", "--nf", "1024", "--nr", "1024", "--d", "64",
                          "--p", "none", "--threads", "1"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["status"] == "ok", fused
    assert 0 <= fused["increase_bytes"] < ref["increase_bytes"]
    assert ref["loss"] == pytest.approx(fused["loss"], rel=1e-5)


def test_peak_rss_script_wraps_the_package_entry():
    import runpy

    from clreg_fast.bench import peak_rss

    namespace = runpy.run_path(str(REPO / "benchmarks" / "peak_rss.py"), run_name="not_main")
    assert namespace["main"] is peak_rss.main


def test_measure_peak_rss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="provider"):
        measure_peak_rss("numpy", 8, 8, 4, 2)
    with pytest.raises(ValueError, match="nf"):
        measure_peak_rss("torch", 1, 8, 4, 2)


def test_run_child_reports_a_killed_child_as_oom(monkeypatch):
    def killed(*args, **kwargs):
        return subprocess.CompletedProcess(args, -9, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", killed)
    res = run_child({"config": BenchConfig(8, 8, 4, 2).to_dict(), "provider": "torch"})
    assert res["status"] == "OOM" and "SIGKILL" in res["note"]


# --------------------------------------------------------------------------------------------
# README table, archiving, GPU suite

def test_readme_table_and_archive(tiny_run, tmp_path):
    out, _ = tiny_run
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import archive_results
        import make_readme_table
    finally:
        sys.path.pop(0)
    # record a run whose commit is unknown, as on the GPU machine
    src = tmp_path / "src"
    src.mkdir()
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for r in rows:
        r["git_commit"] = "unknown"
    with open(src / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dest = archive_results.archive(src, tmp_path / "results", commit="abc1234")
    assert dest.name.endswith("_abc1234") and dest.name.startswith(rows[0]["date_utc"][:10])
    assert {r["git_commit"] for r in report.read_csv(dest / "results.csv")} == {"abc1234"}
    assert (dest / "results.md").exists() and (dest / "time_vs_n.png").exists()
    table = make_readme_table.folder_table(dest)
    assert "commit `abc1234`" in table and "| reference |" in table and "| torch |" in table
    assert make_readme_table.main(["--results", str(tmp_path / "results")]) == 0


def test_gpu_suite_script_parses_and_dry_runs():
    script = REPO / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CLREG_FAST_CUDA_BUILD=1" in out and "build_ext --inplace" in out
    assert "pytest -m 'gpu or not slow'" in out and "--preset gpu" in out
    assert "1. reference      N=8192/8192 D=4096, P=256, bf16" in out
    assert "6. reference      N=262144/262144" in out
    assert "N=262144/262144" in out
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    no_out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert no_out.returncode != 0 and "OUT" in no_out.stderr


@pytest.mark.slow
def test_gpu_suite_end_to_end_on_cpu_with_a_tiny_plan(tmp_path):
    """Everything but the build and the tests, on CPU: logs, sweep, report, summary, file list."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path),
           "CLREG_BENCH_COMMIT": "test123",
           "CLREG_SUITE_SWEEP_ARGS": "--preset tiny --device cpu --providers torch --no-memory "
                                     "--reps 2 --min-reps 1 --threads 1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--skip-build",
                           "--skip-tests", "--total-s", "200"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_suite.log", "results.csv", "results.md", "time_vs_n.png", "meta.json"} <= files
    assert len(files) <= 8 and all(p.is_file() for p in tmp_path.iterdir())
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "gpu_suite summary" in log and "sweep" in log and "commit: test123" in log
    assert {r["git_commit"] for r in report.read_csv(tmp_path / "results.csv")} == {"test123"}


def test_compile_step_bench_counts_graphs_and_matches_eager(tmp_path):
    from clreg_fast.bench import compile_step

    rows = compile_step.measure_step(steps=5, base=8, d=6, hidden=8, p=4, compiler="aot_eager")
    eager, compiled = rows
    assert eager["graphs"] == 0 and 1 <= compiled["graphs"] <= 2
    assert float(compiled["max_loss_diff_vs_eager"]) < 1e-5
    overhead = compile_step.measure_overhead(reps=20)
    assert {r["name"] for r in overhead} >= {"lse_forward", "lse_backward"}
    assert all(r["direct_us"] > 0 and r["custom_op_us"] > 0 for r in overhead)
    assert compile_step.main(["--out", str(tmp_path), "--skip-step", "--reps", "20"]) == 0
    assert "Per-call overhead" in (tmp_path / "compile_step.md").read_text()
    assert (tmp_path / "op_overhead.csv").exists()


@pytest.mark.parametrize("value, loops", [(None, "sweep"), ("auto", "sweep"), ("sweep", "sweep"),
                                          ("sm80", "sweep"), ("wgmma", "wgmma"),
                                          ("legacy", "legacy")])
def test_meta_records_the_cuda_kernel_family(monkeypatch, value, loops):
    """gpu_suite.sh falls back to CLREG_FAST_CUDA_LOOPS=legacy when the sweep fails its GPU
    tests: meta.json must say which kernels the cuda numbers came from."""
    from clreg_fast.bench import env

    if value is None:
        monkeypatch.delenv("CLREG_FAST_CUDA_LOOPS", raising=False)
    else:
        monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", value)
    if torch.cuda.is_available():
        pytest.skip("with a GPU the extension answers (tests/test_cuda_backend.py)")
    meta = env.collect(torch.device("cpu"))
    assert meta["cuda_loops"] == loops and meta["cuda_wgmma"] == ""
