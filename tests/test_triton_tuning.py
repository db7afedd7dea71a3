"""The tuning space of the triton kernels: every candidate correct, tables read safely, autotune.

* Every candidate configuration (``tuning.candidates``, the default included) runs in the
  interpreter at a small shape that still leaves partial tiles (37 anchors, 150 columns,
  P = 200, 100, 40, 24 or 13, and P = 300 in two feature tiles), against float64 math. The interpreter ignores warps and stages,
  so configurations differing only there run once; the static check below covers those.
* Tables: a matching table is used, one for another device / triton version / an untested
  configuration is not; lookups read the disk once.
* ``autotune.tune`` with a fake timer (the interpreter cannot time a GPU): picks the fastest
  correct candidate, keeps the default within the margin, stops at the budget.
* Slow: ``compile_check --candidates`` for sm_90 and sm_80: no spills, shared memory within
  limits, and every bf16/fp16 similarity kernel at P <= 256 on sm_90 uses ``wgmma``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from clreg_fast.backends import available_backends  # noqa: E402

if "triton" not in available_backends():
    pytest.skip("the triton backend is not usable here (no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

import triton  # noqa: E402

from clreg_fast.backends.triton import TritonKernels, autotune, tuning  # noqa: E402
from clreg_fast.backends.triton.tuning import KernelConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 10.0
KIND_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
              "fp16": torch.float16}
CLASSES = [(kind, block_p, 1) for kind in ("fp32", "bf16", "fp16", "tf32")
           for block_p in (256, 128, 64, 32, 16)]
# P > 256: two feature tiles, the second partial, and a partial score chunk (300 = 4 x 64 + 44)
CLASSES += [(kind, 256, 2) for kind in ("fp32", "bf16", "fp16", "tf32")]
P_OF_CLASS = {(256, 1): 200, (128, 1): 100, (64, 1): 40, (32, 1): 24, (16, 1): 13,
              (256, 2): 300}


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def unit_rows(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, p, generator=g, dtype=torch.float64), dim=1)
    return z.float().to(DEVICE)


def float64_lse_and_grads(za, zc, w, offset, round_to=None):
    a, c = (za, zc) if round_to is None else (za.to(round_to), zc.to(round_to))
    s = (a.double() @ c.double().T) * SCALE
    rows = torch.arange(za.shape[0])
    cols = rows + offset
    keep = (cols >= 0) & (cols < zc.shape[0])
    s[rows[keep], cols[keep]] = float("-inf")
    lse = torch.logsumexp(s, dim=1)
    p = torch.exp(s - lse[:, None]) * (SCALE * w.double())[:, None]
    return lse, p @ zc.double(), p.T @ za.double()


def _distinct_blocks(kernel, kind, block_p, k_tiles):
    seen = {}
    for cfg in tuning.candidates(kernel, kind, block_p, k_tiles):
        seen.setdefault((cfg.block_m, cfg.block_n), cfg)
    return list(seen.values())


CANDIDATE_CASES = [
    pytest.param(kernel, kind, block_p, k_tiles, cfg,
                 id=f"{kernel}-{kind}-p{block_p}-k{k_tiles}-{cfg.block_m}x{cfg.block_n}")
    for kind, block_p, k_tiles in CLASSES for kernel in tuning.SIMILARITY_KERNELS
    for cfg in _distinct_blocks(kernel, kind, block_p, k_tiles)
]


@pytest.mark.parametrize("kernel,kind,block_p,k_tiles,cfg", CANDIDATE_CASES)
def test_every_candidate_is_correct(kernel, kind, block_p, k_tiles, cfg):
    from clreg_fast.backends.triton import ops

    p = P_OF_CLASS[(block_p, k_tiles)]
    kernels = TritonKernels(allow_tf32=kind == "tf32")
    assert ops._feature_block(p, kernels.max_block_p) == (block_p, k_tiles)
    dtype = KIND_DTYPE[kind]
    na, nc, offset = 37, 150, 3
    za, zc = unit_rows(na, p, seed=p), unit_rows(nc, p, seed=p + 1)
    w = torch.linspace(-0.3, 1.0, na).to(DEVICE)
    lowp = dtype in (torch.bfloat16, torch.float16)
    lse64, dza64, dzc64 = float64_lse_and_grads(za.cpu(), zc.cpu(), w.cpu(), offset)
    if kind == "tf32":
        bar = 8 * 2.0 ** -10 * SCALE  # TF32's 10-bit mantissa, times the scale
    elif lowp:
        bar = 8 * torch.finfo(dtype).eps
    else:
        bar = 2e-7 * SCALE + 2e-6
    if kernel == "lse_forward":
        for splits in (1, 2):
            lse = kernels.lse_forward(za, zc, offset, SCALE, dtype, config=cfg, col_splits=splits)
            if lowp:  # against float64 math on the rounded operands
                want = float64_lse_and_grads(za.cpu(), zc.cpu(), w.cpu(), offset, dtype)[0]
                # 5e-5: fp32 accumulation over P = 200 in a GPU's order, approximate exp/log
                assert (lse.double().cpu() - want).abs().max().item() < 5e-5
            else:
                assert (lse.double().cpu() - lse64).abs().max().item() < bar
    elif kernel == "lse_backward_rows":
        dza, _ = kernels.lse_backward(za, zc, lse64.float().to(DEVICE), w, offset, SCALE, 0, dtype,
                                      rows_config=cfg, col_splits=2)
        assert rel_err(dza, dza64) < bar
    else:
        _, dzc = kernels.lse_backward(za, zc, lse64.float().to(DEVICE), w, offset, SCALE, nc,
                                      dtype, need_dza=False, cols_config=cfg)
        assert rel_err(dzc, dzc64) < bar


def test_candidate_space_shape():
    for kernel in tuning.SIMILARITY_KERNELS:
        for kind in tuning.KINDS:
            for block_p, k_tiles in ((256, 1), (128, 1), (64, 1), (256, 16)):
                cands = tuning.candidates(kernel, kind, block_p, k_tiles)
                assert cands[0] == tuning.default_config(kernel, kind, block_p, k_tiles)
                assert len(set(cands)) == len(cands)
                for cfg in cands:
                    assert cfg.block_m >= 16 and cfg.block_n >= 16
                    assert cfg.num_warps in (4, 8) and 1 <= cfg.num_stages <= 4
    # the tuned classes really have a choice; wgmma needs the column kernel's BLOCK_N >= 64
    assert len(tuning.candidates("lse_backward_rows", "bf16", 256, 1)) >= 2
    for kind in ("bf16", "fp16"):
        for block_p in (128, 256):
            for cfg in tuning.candidates("lse_backward_cols", kind, block_p, 1):
                assert cfg.block_n >= 64
            for kernel in ("lse_forward", "lse_backward_rows"):
                assert all(c.block_m >= 64 for c in tuning.candidates(kernel, kind, block_p, 1))


# --------------------------------------------------------------------------- tables

DEVICE_RECORD = {"name": "NVIDIA H200", "capability": [9, 0]}


def _table(entries, device=DEVICE_RECORD, triton_version=None):
    return {"format": tuning.TABLE_FORMAT, "device": device,
            "versions": {"triton": triton_version or triton.__version__, "torch": "x"},
            "entries": {key: {"config": cfg._asdict(), "ms": 1.0} for key, cfg in entries.items()}}


TUNED_KEY = "lse_forward/bf16/p256/k1"
TUNED = tuning.candidates("lse_forward", "bf16", 256, 1)[-1]


def test_parse_table_keeps_only_matching_tested_entries():
    table = _table({TUNED_KEY: TUNED})
    assert tuning.parse_table(table, DEVICE_RECORD) == {TUNED_KEY: TUNED}
    assert tuning.parse_table(table, {"name": "NVIDIA A100", "capability": [8, 0]}) == {}
    assert tuning.parse_table(_table({TUNED_KEY: TUNED}, triton_version="2.0.0"),
                              DEVICE_RECORD) == {}
    untested = KernelConfig(16, 256, 2, 7)
    with pytest.warns(RuntimeWarning, match="not a tested candidate"):
        assert tuning.parse_table(_table({TUNED_KEY: untested}), DEVICE_RECORD) == {}
    bad = _table({})
    bad["entries"] = {"lse_forward/bf16/p256": {"config": TUNED._asdict()},
                      "lse_forward/bf16/p256/k1": {"config": {"block_m": "64"}}}
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert tuning.parse_table(bad, DEVICE_RECORD) == {}
    with pytest.warns(RuntimeWarning, match="not a clreg_fast triton tuning table"):
        assert tuning.parse_table({"format": 99}, DEVICE_RECORD) == {}


def test_parse_table_never_raises_on_a_malformed_table():
    """Tables are read at the first launch: a bad one is ignored with a warning, not raised."""
    for part, value in (("device", ["NVIDIA H200"]), ("versions", "3.8"), ("entries", [1])):
        table = _table({TUNED_KEY: TUNED})
        table[part] = value
        with pytest.warns(RuntimeWarning, match="must be objects"):
            assert tuning.parse_table(table, DEVICE_RECORD) == {}
    table = _table({TUNED_KEY: TUNED})
    table["device"] = {"name": DEVICE_RECORD["name"], "capability": 90}
    assert tuning.parse_table(table, DEVICE_RECORD) == {}  # another device, silently


@pytest.mark.parametrize("key", ["lse_forward/bf16/p0256/k1", "lse_forward/bf16/x256/k1",
                                 "lse_forward/bf16/p200/k1", "lse_forward/bf16/p256/k0",
                                 "lse_fwd/bf16/p256/k1", "lse_forward/int8/p256/k1",
                                 "lse_forward/bf16/p256/k1/extra"])
def test_parse_table_rejects_keys_a_lookup_never_makes(key):
    default = tuning.default_config("lse_forward", "bf16", 256, 1)
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert tuning.parse_table(_table({key: default}), DEVICE_RECORD) == {}


def test_candidates_reject_an_unknown_kernel_or_kind():
    with pytest.raises(ValueError, match="kernel"):
        tuning.candidates("lse_fwd", "bf16", 256, 1)
    with pytest.raises(ValueError, match="kind"):
        tuning.candidates("lse_forward", "int8", 256, 1)


def test_lookup_reads_the_table_once_and_falls_back_to_defaults(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table({TUNED_KEY: TUNED})))
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    reads = []
    monkeypatch.setattr(tuning, "device_record", lambda index: reads.append(index) or DEVICE_RECORD)
    tuning.reload_tables()
    try:
        gpu = torch.device("cuda", 0)
        assert tuning.lookup("lse_forward", "bf16", 256, 1, gpu) == TUNED
        assert tuning.lookup("lse_forward", "bf16", 256, 1, gpu) == TUNED
        default = tuning.default_config("lse_backward_rows", "bf16", 256, 1)
        assert tuning.lookup("lse_backward_rows", "bf16", 256, 1, gpu) == default
        assert tuning.lookup("lse_forward", "bf16", 256, 1, torch.device("cpu")) == \
            tuning.default_config("lse_forward", "bf16", 256, 1)
        assert reads == [0]  # one read per device, then dict lookups
        monkeypatch.setenv(tuning.TABLE_ENV, str(tmp_path / "missing.json"))
        tuning.reload_tables()
        with pytest.warns(RuntimeWarning, match="neither a file nor a folder"):
            assert tuning.lookup("lse_forward", "bf16", 256, 1, gpu) == \
                tuning.default_config("lse_forward", "bf16", 256, 1)
    finally:
        tuning.reload_tables()


# --------------------------------------------------------------------------- autotune


def test_autotune_picks_the_fastest_correct_candidate_within_budget():
    kind, p = "bf16", 128
    block_p = 128
    fwd = tuning.candidates("lse_forward", kind, block_p, 1)
    backward = (tuning.candidates("lse_backward_rows", kind, block_p, 1)
                + tuning.candidates("lse_backward_cols", kind, block_p, 1))
    fastest = next(cfg for cfg in fwd[1:] if cfg not in backward)  # a forward-only candidate

    def timer(fn, cfg):  # the fake clock: one forward candidate is much faster
        fn()
        return 0.5 if cfg == fastest else 1.0

    ticks = iter(range(10 ** 6))
    entries, timings = autotune.tune([(kind, p)], n_rows=20, n_cols=45, budget_s=10 ** 6,
                                     device=DEVICE, timer=timer, log=lambda *a: None,
                                     clock=lambda: next(ticks))
    fwd_key = tuning.shape_class("lse_forward", kind, block_p, 1)
    assert entries[fwd_key]["config"] == fastest._asdict()
    assert entries[fwd_key]["ms"] == 0.5 and entries[fwd_key]["default_ms"] == 1.0
    rows_key = tuning.shape_class("lse_backward_rows", kind, block_p, 1)
    assert entries[rows_key]["config"] == tuning.candidates("lse_backward_rows", kind,
                                                            block_p, 1)[0]._asdict()  # a tie
    assert all(t["status"] == "ok" for t in timings)
    # the table it writes is read back for the device it names
    table = tuning.make_table(0, entries) if torch.cuda.is_available() else {
        "format": tuning.TABLE_FORMAT, "device": DEVICE_RECORD,
        "versions": {"triton": triton.__version__}, "entries": entries}
    device = tuning.device_record(0) if torch.cuda.is_available() else DEVICE_RECORD
    assert tuning.parse_table(json.loads(json.dumps(table)), device)[fwd_key] == fastest

    # A budget that runs out after a few candidates: the rest is skipped, unmeasured classes
    # get no entry (their launches keep the defaults).
    ticks = iter(range(10 ** 6))
    entries, timings = autotune.tune([(kind, p)], n_rows=20, n_cols=45, budget_s=3,
                                     device=DEVICE, timer=timer, log=lambda *a: None,
                                     clock=lambda: next(ticks))
    assert fwd_key in entries and rows_key not in entries
    assert any(t["status"] == "skipped" for t in timings)


def test_autotune_never_chooses_a_wrong_candidate(monkeypatch):
    wrong = tuning.candidates("lse_forward", "fp32", 256, 1)[1]
    real = TritonKernels.lse_forward

    def broken(self, *args, config=None, **kwargs):
        out = real(self, *args, config=config, **kwargs)
        return out + 1.0 if config == wrong else out

    monkeypatch.setattr(TritonKernels, "lse_forward", broken)
    logs = []
    entries, timings = autotune.tune([("fp32", 200)], n_rows=20, n_cols=45, budget_s=10 ** 6,
                                     device=DEVICE, timer=lambda fn, cfg: 0.1 if cfg == wrong
                                     else 1.0, log=logs.append)
    key = tuning.shape_class("lse_forward", "fp32", 256, 1)
    assert entries[key]["config"] != wrong._asdict()
    assert [t["status"] for t in timings if t["config"] == wrong._asdict()
            and t["shape_class"] == key] == ["wrong"]
    assert any("differs" in line for line in logs)


def test_autotune_skips_a_kernel_whose_default_fails(monkeypatch):
    default = tuning.candidates("lse_forward", "fp32", 256, 1)[0]
    real = TritonKernels.lse_forward
    runs = []

    def failing_default(self, *args, config=None, **kwargs):
        runs.append(config)
        if config == default:
            raise RuntimeError("out of resources")
        return real(self, *args, config=config, **kwargs)

    monkeypatch.setattr(TritonKernels, "lse_forward", failing_default)
    logs = []
    entries, timings = autotune.tune([("fp32", 200)], n_rows=20, n_cols=45, budget_s=10 ** 6,
                                     device=DEVICE, timer=lambda fn, cfg: 1.0, log=logs.append)
    key = tuning.shape_class("lse_forward", "fp32", 256, 1)
    statuses = [t["status"] for t in timings if t["shape_class"] == key]
    assert key not in entries
    assert statuses[0] == "error" and statuses[1:] == ["skipped"] * (len(statuses) - 1)
    assert len(statuses) == len(tuning.candidates("lse_forward", "fp32", 256, 1)) > 1
    # only the default ran as a forward candidate (runs with config=None: the backward's lse)
    assert [c for c in runs if c is not None] == [default]
    rows_key = tuning.shape_class("lse_backward_rows", "fp32", 256, 1)
    assert rows_key in entries  # the other kernels of the class are tuned as usual


def test_autotune_command_dry_run_and_without_gpu(tmp_path, capsys):
    assert autotune.main(["--dry-run", "--classes", "bf16:256", "fp32:4096"]) == 0
    out = capsys.readouterr().out
    assert "lse_backward_cols/bf16/p256/k1: 4 candidates" in out
    assert "lse_forward/fp32/p256/k16: 1 candidates" in out
    if not torch.cuda.is_available():
        assert autotune.main(["--out", str(tmp_path / "t.json")]) == 0
        assert not (tmp_path / "t.json").exists()
    with pytest.raises(SystemExit):
        autotune.main(["--classes", "bf17:256"])


def test_autotune_command_writes_a_table_the_launchers_accept(tmp_path, monkeypatch, capsys):
    """The command's GPU path, with the interpreter standing in for the GPU and a fake timer."""
    monkeypatch.setattr(autotune, "_tuning_device", lambda: torch.device(DEVICE))
    monkeypatch.setattr(autotune, "cuda_timer", lambda fn, cfg: 1.0 / cfg.block_n)
    monkeypatch.setattr(tuning, "device_record", lambda index: DEVICE_RECORD)
    out = tmp_path / "sub" / "table.json"
    assert autotune.main(["--out", str(out), "--classes", "bf16:100", "--rows", "20",
                          "--cols", "45", "--budget-s", "600"]) == 0
    table = json.loads(out.read_text())
    assert table["device"] == DEVICE_RECORD and table["versions"]["triton"] == triton.__version__
    assert table["shape"] == {"rows": 20, "cols": 45, "scale": autotune.SCALE}
    assert len(table["timings"]) == sum(len(tuning.candidates(k, "bf16", 128, 1))
                                        for k in tuning.SIMILARITY_KERNELS)
    parsed = tuning.parse_table(table, DEVICE_RECORD)
    assert set(parsed) == {tuning.shape_class(k, "bf16", 128, 1)
                           for k in tuning.SIMILARITY_KERNELS}
    for key, cfg in parsed.items():  # the fake timer favours the widest BLOCK_N
        kernel = key.split("/")[0]
        widest = max(c.block_n for c in tuning.candidates(kernel, "bf16", 128, 1))
        assert cfg.block_n == widest
    assert not list(out.parent.glob("*.tmp"))
    assert "3 kernel shape classes measured" in capsys.readouterr().out


# --------------------------------------------------------------------------- static checks


@pytest.mark.slow
def test_candidates_compile_without_spills_and_bf16_fp16_use_wgmma_on_hopper():
    """Every candidate for sm_90 and sm_80 at every feature tile of P <= 256 (BLOCK_P 16 to 256;
    bf16, fp16, fp32, tf32): compiles, no register spills, shared memory within the limit;
    bf16/fp16 similarity kernels on sm_90 compile to wgmma. With the launch's divisibility hints
    and both forward forms, about 25 minutes on two busy shared cores with empty caches (the same
    compile_check run, measured), seconds once triton's cache and compile_check's report cache
    hold the kernels."""
    pytest.importorskip("triton.backends.nvidia")
    PS = (256, 128, 64, 24, 16)  # one P per feature tile width
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "clreg_fast.backends.triton.compile_check", "--candidates",
         "--arch", "90", "80", "--p", *map(str, PS), "--dtype", "bf16", "fp16", "fp32", "tf32"],
        capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    # the forward in both forms (fixed shift and running max): one configuration serves both
    expected = sum(len(tuning.candidates(k, kind, triton.next_power_of_2(p), 1))
                   * (2 if k == "lse_forward" else 1)
                   for k in tuning.SIMILARITY_KERNELS
                   for kind in ("bf16", "fp16", "fp32", "tf32") for p in PS)
    assert len(lines) == 2 * expected and all(line.startswith("ok  ") for line in lines)
    hopper_lowp = [line for line in lines if line.startswith("ok   sm_90")
                   and (" ROUND=1 " in line or " ROUND=2 " in line)]
    assert hopper_lowp and all("mma=wgmma" in line for line in hopper_lowp), \
        [line for line in hopper_lowp if "mma=wgmma" not in line]


@pytest.mark.slow
def test_default_kernels_at_wide_p_compile_without_spills():
    """Every kernel launched by default at P = 384, 512 and 1024 (two and four feature tiles)
    for sm_90 and sm_80 and every input kind: compiles, no register spills, shared memory within
    the limit. About 10 minutes on two busy shared cores with empty caches, seconds warm."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "clreg_fast.backends.triton.compile_check", "--arch", "90", "80",
         "--p", "384", "512", "1024", "--dtype", "bf16", "fp16", "fp32", "tf32"],
        capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    similarity = [line for line in lines if " lse_" in line]
    # 4 similarity variants (the forward twice) x 3 widths x 4 kinds x 2 architectures
    assert len(similarity) == 4 * 3 * 4 * 2
    assert all(line.startswith("ok  ") and "spill_bytes=0 " in line for line in lines), \
        [line for line in lines if not line.startswith("ok  ")]
    assert all("K_TILES=2" in line or "K_TILES=4" in line for line in similarity)
