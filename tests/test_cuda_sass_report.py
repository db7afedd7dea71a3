"""scripts/cuda_sass_report.py's claims about the wgmma sweep's SASS (no GPU, no build needed)."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[1] / "scripts" / "cuda_sass_report.py"
_SPEC = importlib.util.spec_from_file_location("cuda_sass_report", _PATH)
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)

_SWEEP_TC = ("sm_80", "void clreg::(anonymous namespace)::sweep_tc_kernel<__half, 64, "
                      "(clreg::SweepMode)0>(int)")
_SWEEP_SIMT = ("sm_80", "void clreg::(anonymous namespace)::sweep_simt_kernel<64, "
                        "(clreg::SweepMode)0>(int)")


def _wgmma(d, mode, hgmma, arrive=None, fence=1):
    name = (f"void clreg::(anonymous namespace)::sweep_wgmma_kernel<__half, {d}, "
            f"(clreg::SweepMode){mode}>(int)")
    arrive = (1 if mode == 0 else 2) if arrive is None else arrive
    return ("sm_90a", name), {"HGMMA": hgmma, "LDGSTS": 10, "WARPGROUP.ARRIVE": arrive,
                              "FENCE.VIEW.ASYNC.S": fence}


def _failures(*kernels):
    counts = {_SWEEP_TC: {"HMMA": 8, "LDGSTS": 8, "LDSM": 8}, _SWEEP_SIMT: {"LDGSTS": 8}}
    counts.update(dict(kernels))
    return report.check(counts, expect_wgmma=True)[1]


@pytest.mark.parametrize("d", [64, 128, 256])
def test_wgmma_kernels_need_every_wgmma_of_a_tile(d):
    # One HGMMA per 16-wide k block: D / 16 for the scores, 64 / 16 more for the RS product of
    # the backward passes. A k block lost in the unrolled loops (or a CuTe fallback path that
    # compiles to a trap) shows as another count.
    assert _failures(_wgmma(d, 0, d // 16), _wgmma(d, 1, d // 16 + 4),
                     _wgmma(d, 2, d // 16 + 4)) == []
    for mode, wrong in ((0, d // 16 - 1), (1, d // 16), (2, 0)):
        failures = _failures(_wgmma(d, mode, wrong))
        assert any("HGMMA" in f for f in failures), failures


def test_wgmma_kernels_need_their_fences():
    # one wgmma.fence per batch (scores; scores and product), the async-proxy fence once
    assert any("WARPGROUP.ARRIVE" in f for f in _failures(_wgmma(64, 1, 8, arrive=1)))
    assert any("FENCE.VIEW.ASYNC.S" in f for f in _failures(_wgmma(64, 0, 4, fence=0)))


def test_sass_opcodes_are_counted():
    text = """
        code for sm_90a
                Function : _Z1kv
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   FENCE.VIEW.ASYNC.S ;
    """
    ops = report.parse_sass(text)[("sm_90a", "_Z1kv")]
    assert (ops["WARPGROUP.ARRIVE"], ops["HGMMA"], ops["FENCE.VIEW.ASYNC.S"]) == (1, 1, 1)
