"""Benchmark outputs: the CSV (one row per task), the markdown report and the PNG plots."""
from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from clreg_fast.bench.config import PROVIDERS, TARGET, BenchConfig, group_label

META_COLUMNS = ["date_utc", "git_commit", "device", "device_type", "device_memory_gib",
                "torch_version", "triton_version", "cuda_version", "python_version",
                "clreg_fast_version", "threads", "backends"]
CONFIG_COLUMNS = ["nf", "nr", "d", "p", "dtype", "labels", "retain_detached", "temperature"]
NUMBER_COLUMNS = [
    "fwd_ms", "fwd_ms_q1", "fwd_ms_q3", "bwd_ms", "bwd_ms_q1", "bwd_ms_q3",
    "fwd_bwd_ms", "fwd_bwd_ms_q1", "fwd_bwd_ms_q3", "reps", "first_call_s",
    "inputs_mib", "mem_base_mib", "peak_mib", "peak_increase_mib", "fwd_peak_increase_mib",
    "saved_mib", "mem_method", "loss",
    "flops_fwd", "flops_bwd", "flops_fwd_bwd", "matmul_dtype", "matmul_tflops",
    "tflops_fwd", "tflops_bwd", "tflops_fwd_bwd", "frac_of_matmul", "x_roofline_floor", "wall_s",
]
COLUMNS = META_COLUMNS + ["provider", "status", "note"] + CONFIG_COLUMNS + NUMBER_COLUMNS
_INT_COLUMNS = {"nf", "nr", "d", "reps", "flops_fwd", "flops_bwd", "flops_fwd_bwd"}
_BOOL_COLUMNS = {"labels", "retain_detached"}
_STR_COLUMNS = set(META_COLUMNS) | {"provider", "status", "note", "dtype", "mem_method",
                                    "matmul_dtype"}

STYLE = {  # provider -> (color, marker)
    "reference": ("tab:red", "o"),
    "eager_native": ("tab:orange", "v"),
    "compile": ("tab:purple", "s"),
    "compile_native": ("tab:pink", "D"),
    "torch": ("tab:blue", "^"),
    "triton": ("tab:green", "P"),
    "cuda": ("black", "X"),
}


# ---------------------------------------------------------------------------------------------
# CSV

def _cell(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class CsvWriter:
    """Writes the header at once and each row as it comes (a killed sweep keeps its rows)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS, extrasaction="ignore")
        self._writer.writeheader()
        self._handle.flush()

    def write(self, row: Dict[str, object]) -> None:
        self._writer.writerow({k: _cell(row.get(k, "")) if k in row else "" for k in COLUMNS})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _parse(column: str, text: str):
    if column in _STR_COLUMNS:
        return text
    if column == "p":
        return None if text in ("none", "") else int(text)
    if column in _BOOL_COLUMNS:
        return text == "true"
    if text == "":
        return math.nan
    if column in _INT_COLUMNS:
        return int(float(text))
    return float(text)


def read_csv(path: Path) -> List[Dict[str, object]]:
    with open(path, newline="") as handle:
        return [{k: _parse(k, v or "") for k, v in row.items() if k is not None}
                for row in csv.DictReader(handle)]


def write_meta(path: Path, meta: Dict[str, object]) -> None:
    Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Helpers over rows

def config_of(row: Dict[str, object]) -> BenchConfig:
    return BenchConfig.from_dict(row)


def group_of(row) -> tuple:
    return (row["d"], row["p"], row["dtype"], row["labels"], row["retain_detached"],
            row["temperature"])


def _ok(row) -> bool:
    return row.get("status") == "ok"


def _num(row, key) -> float:
    value = row.get(key, math.nan)
    return value if isinstance(value, (int, float)) else math.nan


def _find(rows, provider: str, config_key: tuple):
    for row in rows:
        if row["provider"] == provider and (row["nf"], row["nr"]) + group_of(row) == config_key:
            return row
    return None


def config_key(row) -> tuple:
    return (row["nf"], row["nr"]) + group_of(row)


def fmt_ms(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_spread(row, part: str) -> str:
    med, q1, q3 = _num(row, f"{part}_ms"), _num(row, f"{part}_ms_q1"), _num(row, f"{part}_ms_q3")
    if not math.isfinite(med):
        return "-"
    if math.isfinite(q1) and math.isfinite(q3) and med > 0:
        return f"{fmt_ms(med)} ±{100 * (q3 - q1) / 2 / med:.0f}%"
    return fmt_ms(med)


def fmt_mib(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 1024:
        return f"{value / 1024:.2f} GiB"
    return f"{value:.1f} MiB"


def fmt_n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def fmt_num(value: float, spec: str, suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if math.isfinite(value) else "-"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


def _provider_order(provider: str) -> int:
    return PROVIDERS.index(provider) if provider in PROVIDERS else len(PROVIDERS)


# ---------------------------------------------------------------------------------------------
# Targets of the issue (GPU, headline configuration)

FUSED_FOR_TARGETS = ("cuda", "triton")


def best_fused(rows, key) -> Optional[Dict[str, object]]:
    """The fastest ok row of the fused GPU kernels (cuda, triton) at ``key``."""
    cands = [r for r in (_find(rows, p, key) for p in FUSED_FOR_TARGETS) if r is not None and _ok(r)]
    return min(cands, key=lambda r: _num(r, "fwd_bwd_ms")) if cands else None


def target_checks(rows: Sequence[Dict[str, object]]) -> List[Dict[str, str]]:
    """The issue's targets, evaluated on the headline configuration of this run (if present)."""
    key = (TARGET.nf, TARGET.nr, TARGET.d, TARGET.p, TARGET.dtype, TARGET.labels,
           TARGET.retain_detached, TARGET.temperature)
    big = (262144, 262144) + key[2:]
    if not any(config_key(r) in (key, big) for r in rows):
        return []  # this run does not hold the headline configuration (e.g. the CPU mode)
    fused = best_fused(rows, key)
    ref, comp = _find(rows, "reference", key), _find(rows, "compile", key)
    checks = []

    def add(name, value, goal, passed):
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        checks.append({"check": name, "value": value, "target": goal, "verdict": verdict})

    fname = f"fused ({fused['provider']})" if fused else "fused"
    if fused and ref and _ok(ref):
        s = _num(ref, "fwd_bwd_ms") / _num(fused, "fwd_bwd_ms")
        add(f"{fname} speed-up over eager reference", fmt_ratio(s), ">= 3x", s >= 3)
        m = _num(fused, "peak_increase_mib") / _num(ref, "peak_increase_mib")
        add(f"{fname} memory increase / eager's", f"{m:.3f}", "<= 0.1",
            m <= 0.1 if math.isfinite(m) else None)
    else:
        add("fused speed-up over eager reference", "-", ">= 3x", None)
        add("fused memory increase / eager's", "-", "<= 0.1", None)
    if fused and comp and _ok(comp):
        s = _num(comp, "fwd_bwd_ms") / _num(fused, "fwd_bwd_ms")
        add(f"{fname} speed-up over torch.compile", fmt_ratio(s), ">= 1.5x", s >= 1.5)
    else:
        add("fused speed-up over torch.compile", "-", ">= 1.5x", None)
    floor = _num(fused, "x_roofline_floor") if fused else math.nan
    add(f"{fname} time / roofline floor", fmt_ratio(floor), "<= 1.5x",
        floor <= 1.5 if math.isfinite(floor) else None)
    for other in ("eager_native", "compile_native"):
        row = _find(rows, other, key)
        if fused and row and _ok(row):
            s = _num(row, "fwd_bwd_ms") / _num(fused, "fwd_bwd_ms")
            add(f"{fname} speed-up over {other} (bf16 math; information)", fmt_ratio(s), "-", None)
    fused_big = best_fused(rows, big)
    ref_big = _find(rows, "reference", big)
    if fused_big is not None or ref_big is not None:
        eager_state = ref_big["status"] if ref_big else "not run"
        value = (f"fused: {'ok, ' + fmt_ms(_num(fused_big, 'fwd_bwd_ms')) + ' ms' if fused_big else 'not ok'}"
                 f"; eager: {eager_state}")
        add("Nf = Nr = 262144 on one GPU", value, "fused runs, eager OOM",
            bool(fused_big) and eager_state == "OOM")
    return checks


# ---------------------------------------------------------------------------------------------
# Markdown

def markdown(rows: Sequence[Dict[str, object]]) -> str:
    if not rows:
        return "# CLReg benchmark\n\nNo results.\n"
    first = rows[0]
    lines = [f"# CLReg benchmark: {first.get('device', '?')}", ""]
    lines.append(f"- date {first.get('date_utc', '?')}, commit `{first.get('git_commit', '?')}`")
    lines.append(f"- torch {first.get('torch_version')}, triton {first.get('triton_version')}, "
                 f"CUDA {first.get('cuda_version')}, python {first.get('python_version')}, "
                 f"{first.get('threads')} CPU threads; backends: {first.get('backends')}")
    rates = OrderedDict()
    for row in rows:
        if isinstance(row.get("matmul_tflops"), float) and math.isfinite(row["matmul_tflops"]):
            rates[row["matmul_dtype"]] = row["matmul_tflops"]
    if rates:
        lines.append("- measured matmul rate (square torch.matmul, this run): " + ", ".join(
            f"{k} {v:.2f} TFLOP/s" for k, v in rates.items()))
    lines += [
        "",
        "Nf = Nr = N rows per side. Times: median over repetitions after warm-up, ± half the "
        "interquartile range in percent. Memory: peak increase over the inputs during one "
        f"forward + backward ({first.get('mem_method') or 'see mem_method in the CSV'}). "
        "TFLOP/s: the FLOP model of benchmarks/README.md over the fwd+bwd median; % matmul: that "
        "rate over the measured matmul rate of the same dtype (1 / time over the roofline floor).",
        "",
    ]
    checks = target_checks(rows)
    if checks:
        lines += ["## Targets (N = 8192, D = 4096, P = 256, bf16, fwd+bwd)", "",
                  "| check | value | target | verdict |", "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['value']} | {c['target']} | {c['verdict']} |"
                  for c in checks]
        lines.append("")
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for row in rows:
        groups.setdefault(group_of(row), []).append(row)
    for key, grows in groups.items():
        shown = [r for r in grows if r["status"] not in ("unavailable",)]
        if not shown:
            continue
        lines += [f"## {group_label(key)}", "",
                  "| N | provider | fwd ms | bwd ms | fwd+bwd ms | peak increase | TFLOP/s | "
                  "% matmul | vs reference | vs compile | loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        shown.sort(key=lambda r: (r["nf"], r["nr"], _provider_order(r["provider"])))
        for row in shown:
            if not _ok(row):
                lines.append(f"| {fmt_n(row['nf'])} | {row['provider']} | {row['status']} "
                             f"| | | | | | | | |")
                continue
            speedups = []
            for base in ("reference", "compile"):
                other = _find(rows, base, config_key(row))
                if other is not None and _ok(other) and other is not row:
                    speedups.append(fmt_ratio(_num(other, "fwd_bwd_ms") / _num(row, "fwd_bwd_ms")))
                else:
                    speedups.append("-")
            lines.append(
                f"| {fmt_n(row['nf'])} | {row['provider']} | {fmt_spread(row, 'fwd')} | "
                f"{fmt_spread(row, 'bwd')} | {fmt_spread(row, 'fwd_bwd')} | "
                f"{fmt_mib(_num(row, 'peak_increase_mib'))} | "
                f"{fmt_num(_num(row, 'tflops_fwd_bwd'), '.3g')} | "
                f"{fmt_num(100 * _num(row, 'frac_of_matmul'), '.1f', '%')} | "
                f"{speedups[0]} | {speedups[1]} | {fmt_num(_num(row, 'loss'), '.5g')} |")
        lines.append("")
    notes = _notes(rows)
    if notes:
        lines += ["## Not measured", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _notes(rows) -> List[str]:
    notes, seen = [], set()
    for row in rows:
        if _ok(row):
            continue
        if row["status"] == "unavailable":
            text = f"{row['provider']}: {row['note']}"
        else:
            text = (f"{row['provider']} at N={fmt_n(row['nf'])}, {group_label(group_of(row))}: "
                    f"{row['status']}" + (f" ({row['note']})" if row.get("note") else ""))
        if text not in seen:
            seen.add(text)
            notes.append(text)
    return notes


# ---------------------------------------------------------------------------------------------
# Plots

def _has(row, metric: str) -> bool:
    key = "fwd_bwd_ms" if metric == "time" else "peak_increase_mib"
    return _ok(row) and math.isfinite(_num(row, key))


def _plot_groups(rows, metric: str) -> "OrderedDict[tuple, List[dict]]":
    """Groups with at least two sizes measured: the ones a curve along N says something about."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for row in rows:
        groups.setdefault(group_of(row), []).append(row)
    return OrderedDict((k, v) for k, v in groups.items()
                       if len({r["nf"] for r in v if _has(r, metric)}) >= 2)


def plot(rows: Sequence[Dict[str, object]], path: Path, metric: str) -> Optional[Path]:
    """Log-log plot of ``metric`` ("time" or "memory") against N, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    from clreg_fast.bench.flops import flop_model, matrix_bytes

    groups = _plot_groups(rows, metric)
    if not groups:
        return None
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.6 * nrows), squeeze=False)
    device = rows[0].get("device", "")
    for ax, (key, grows) in zip(axes.flat, groups.items()):
        providers = sorted({r["provider"] for r in grows}, key=_provider_order)
        all_n = sorted({r["nf"] for r in grows if r["status"] in ("ok", "OOM")})
        for provider in providers:
            color, marker = STYLE.get(provider, ("gray", "o"))
            ok = sorted((r for r in grows if r["provider"] == provider and _has(r, metric)),
                        key=lambda r: r["nf"])
            xs = [r["nf"] for r in ok]
            if metric == "time":
                ys = [_num(r, "fwd_bwd_ms") for r in ok]
                lo = [y - _num(r, "fwd_bwd_ms_q1") for y, r in zip(ys, ok)]
                hi = [_num(r, "fwd_bwd_ms_q3") - y for y, r in zip(ys, ok)]
                err = [[max(0.0, v) if math.isfinite(v) else 0.0 for v in lo],
                       [max(0.0, v) if math.isfinite(v) else 0.0 for v in hi]]
            else:
                ys = [max(_num(r, "peak_increase_mib"), 1e-3) for r in ok]
                err = None
            if xs:
                ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, markersize=5,
                            linewidth=1.6, capsize=3, label=provider)
            oom = sorted(r["nf"] for r in grows if r["provider"] == provider
                         and r["status"] == "OOM")
            if oom:  # first size that ran out of memory: a cross at the top of the panel
                ax.plot([oom[0]], [0.96], transform=ax.get_xaxis_transform(), color=color,
                        marker="x", markersize=10, markeredgewidth=2.5, linestyle="none",
                        label=f"{provider} OOM" if not xs else None)
                ax.annotate("OOM", (oom[0], 0.96), xycoords=ax.get_xaxis_transform(),
                            xytext=(6, -4), textcoords="offset points", color=color, fontsize=8)
        if all_n:
            configs = [BenchConfig(n, n, key[0], key[1], key[2], key[3], key[4], key[5])
                       for n in all_n]
            if metric == "time":
                rate = next((_num(r, "matmul_tflops") for r in grows
                             if math.isfinite(_num(r, "matmul_tflops"))), math.nan)
                if math.isfinite(rate) and rate > 0:
                    floor = [flop_model(c)["fwd_bwd"] / (rate * 1e12) * 1e3 for c in configs]
                    ax.plot(all_n, floor, color="gray", linestyle="--", linewidth=1.2,
                            label=f"roofline floor ({key[2]} matmul {rate:.3g} TFLOP/s)")
            else:
                mat = [matrix_bytes(c, 4) / 2**20 for c in configs]
                ax.plot(all_n, mat, color="gray", linestyle="--", linewidth=1.2,
                        label="one Nf x (Nf+Nr) fp32 matrix")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if all_n:
            ax.set_xticks(all_n)
            ax.set_xticklabels([fmt_n(n) for n in all_n], fontsize=8)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("N = Nf = Nr (rows per side)")
        ax.set_ylabel("forward + backward time (ms)" if metric == "time"
                      else "peak memory increase over inputs (MiB)")
        ax.set_title(group_label(key), fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    title = ("CLReg forward + backward time (median, bars: interquartile range)" if metric == "time"
             else "CLReg peak memory increase during forward + backward")
    fig.suptitle(f"{title}\n{device}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_reports(rows: Sequence[Dict[str, object]], out_dir: Path,
                  log: Callable[[str], None] = print) -> Dict[str, Optional[Path]]:
    """results.md, time_vs_n.png and memory_vs_n.png next to results.csv."""
    out_dir = Path(out_dir)
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(rows))
    written: Dict[str, Optional[Path]] = {"markdown": md_path}
    try:
        written["time_png"] = plot(rows, out_dir / "time_vs_n.png", "time")
        written["memory_png"] = plot(rows, out_dir / "memory_vs_n.png", "memory")
    except ImportError as exc:
        log(f"plots skipped: {exc} (pip install matplotlib)")
        written["time_png"] = written["memory_png"] = None
    for name, path in written.items():
        if path is None and name.endswith("png"):
            log(f"{name}: nothing to plot (no group with two sizes measured)")
    return written


def rows_from_dirs(dirs: Iterable[Path]) -> List[Dict[str, object]]:
    rows = []
    for directory in dirs:
        rows.extend(read_csv(Path(directory) / "results.csv"))
    return rows
