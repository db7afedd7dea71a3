"""torch.compile: the registered custom ops, graph breaks, eager equality and dynamic shapes.

On CPU: the torch backend end to end (Inductor), and the triton backend's ops under the
interpreter. The GPU variants (triton, cuda, no host sync) are marked gpu and skip here.
"""
import pytest
import torch

from clreg_fast import fused_clreg_loss
from clreg_fast.backends import available_backends
from clreg_fast.backends.base import route_through_ops
from clreg_fast.backends.torch_chunked import ops as torch_ops
from clreg_fast.bench.compile_step import TinyEncoder

torch._dynamo.config.cache_size_limit = 64  # many small graphs over the whole module


def _rows(n, d, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)


# ---------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("nf, nc, offset", [(5, 12, 0), (7, 7, 0), (4, 9, 5), (3, 6, -2)])
def test_torch_lse_forward_passes_opcheck(nf, nc, offset):
    za, zc = _rows(nf, 6, 0), _rows(nc, 6, 1)
    torch.library.opcheck(torch.ops.clreg_fast.torch_lse_forward.default, (za, zc, offset, 10.0))


@pytest.mark.parametrize("n_grad_cols, need_dza", [(12, True), (5, True), (0, True), (12, False),
                                                   (3, False)])
def test_torch_lse_backward_passes_opcheck(n_grad_cols, need_dza):
    za, zc = _rows(5, 6, 0), _rows(12, 6, 1)
    lse = torch_ops.lse_forward_chunked(za, zc, 0, 10.0)
    w = torch.rand(5)
    torch.library.opcheck(torch.ops.clreg_fast.torch_lse_backward.default,
                          (za, zc, lse, w, 0, 10.0, n_grad_cols, need_dza))


def test_eager_calls_through_the_ops_equal_direct_calls():
    """Eager skips the op dispatch; both paths must give the same numbers."""
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(9, 7, generator=g), torch.randn(5, 7, generator=g),
            torch.randn(4, 7, generator=g)]
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    results = []
    for via_ops in (False, True):
        leaves = [a.clone().requires_grad_() for a in args]
        with route_through_ops(via_ops):
            loss = fused_clreg_loss(*leaves, labels=labels, backend="torch")
            loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- compiled step

def TinyModel(backend="torch"):
    """A small encoder whose forward ends in the loss, as a training step would (the benchmark's)."""
    return TinyEncoder(12, 16, 8, backend, temperature=0.2)


def _batch(nf, nr, seed, n_labels=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_labels, (nf,), generator=g)
    labels[:2] = 0  # at least one positive
    x_forget = torch.randn(nf, 12, generator=g).to(device)
    x_retain = torch.randn(nr, 12, generator=g).to(device)
    return x_forget, x_retain, labels.to(device)


def _loss_and_grads(model, fn, batch):
    model.zero_grad()
    loss = fn(*batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_compiled_matches_eager(model, compiled, sizes, device="cpu"):
    """Loss and every gradient of the compiled step equal eager's (fp32, 1e-5) at each (Nf, Nr)."""
    for seed, (nf, nr) in enumerate(sizes):
        batch = _batch(nf, nr, seed, device=device)
        want_loss, want_grads = _loss_and_grads(model, model, batch)
        got_loss, got_grads = _loss_and_grads(model, compiled, batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_graph_break_with_labels():
    model = TinyModel()
    explained = torch._dynamo.explain(model)(*_batch(10, 7, 0))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("labels, retain, reduction, extra", [
    (False, True, "mean", False), (True, False, "sum", False), (True, True, "none", True)])
def test_no_graph_break_across_options(labels, retain, reduction, extra):
    g = torch.Generator().manual_seed(1)
    f, r, w = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(4, 6)
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4]) if labels else None
    queue = torch.randn(7, 4, generator=g) if extra else None

    def step(f, r, w):
        loss = fused_clreg_loss(f, r if retain else None, w, labels=lab, reduction=reduction,
                                extra_negatives=queue, backend="torch")
        return loss.sum()

    explained = torch._dynamo.explain(step)(f.requires_grad_(), r, w.requires_grad_())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.slow
def test_compiled_step_matches_eager_inductor():
    torch.manual_seed(0)
    model = TinyModel()
    compiled = torch.compile(model, fullgraph=True)
    _assert_compiled_matches_eager(model, compiled, [(10, 7)])


def test_compiled_step_without_retain_rows():
    """Nr = 0 takes another branch (and another graph: sizes 0 and 1 are specialized)."""
    model = TinyModel()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_compiled_matches_eager(model, compiled, [(nf, 0) for nf in [9, 14]])


SIZES = [(10, 7), (13, 11), (17, 5), (22, 19), (9, 8), (31, 3), (12, 26)]


@pytest.mark.parametrize("dynamic, most_graphs", [(None, 2), (True, 1)])
def test_varying_batch_sizes_do_not_recompile_every_step(dynamic, most_graphs):
    """Automatic dynamic shapes: one recompile after the first size change, then none."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = TinyModel()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    _assert_compiled_matches_eager(model, compiled, SIZES)
    assert counter.frame_count <= most_graphs, counter.frame_count


def test_no_positive_raises_eager_and_is_nan_under_compile():
    model = TinyModel()
    x_f, x_r, _ = _batch(6, 4, 0)
    unique = torch.arange(6)
    with pytest.raises(ValueError, match="no forget row has a positive"):
        model(x_f, x_r, unique)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x_f, x_r, unique)
    assert torch.isnan(loss)  # documented: mean over 0 anchors
    loss.backward()
    assert all(torch.all(p.grad == 0) for p in model.parameters())  # documented: no gradient
    model.backend = "torch"

    def summed(f, r):
        return fused_clreg_loss(f, r, labels=unique, reduction="sum", backend="torch")

    f = torch.randn(6, 5, requires_grad=True)
    total = torch.compile(summed, backend="aot_eager", fullgraph=True)(f, torch.randn(3, 5))
    assert total.item() == 0.0
    total.backward()
    assert torch.all(f.grad == 0)


# ---------------------------------------------------------------------------- GPU

def _gpu_backends():
    return [b for b in ("torch", "triton", "cuda") if b in available_backends()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_compiled_step_matches_eager_gpu(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(0)
    model = TinyModel(backend=backend).cuda()
    explained = torch._dynamo.explain(model)(*_batch(10, 7, 0, device="cuda"))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(model, fullgraph=True)
    _assert_compiled_matches_eager(model, compiled, [(70, 33), (129, 65), (40, 0)], device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_compiled_loss_makes_no_host_sync_gpu(backend):
    """Compiled with labels, forward and backward run under sync debug mode "error"."""
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    model = TinyModel(backend=backend).cuda()
    compiled = torch.compile(model, fullgraph=True)
    batch = _batch(64, 32, 0, device="cuda")
    compiled(*batch).backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled(*batch).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------- triton

def _triton_or_skip():
    if "triton" not in available_backends():
        pytest.skip("the triton backend is not usable here (no GPU and no TRITON_INTERPRET=1)")
    from clreg_fast.backends.triton import library

    return library


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("p, bias", [(None, False), (8, True), (20, False)])
def test_triton_project_normalize_passes_opcheck(p, bias):
    _triton_or_skip()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g).to(DEVICE)
    weight = torch.randn(p, 6, generator=g).to(DEVICE) if p else None
    b = torch.randn(p, generator=g).to(DEVICE) if bias else None
    torch.library.opcheck(torch.ops.clreg_fast.triton_project_normalize.default,
                          (x, weight, b, 16))
    dz, z, norm = torch.randn(9, 6), _rows(9, 6, 1), torch.rand(9) + 0.5
    torch.library.opcheck(torch.ops.clreg_fast.triton_normalize_backward.default,
                          (dz.to(DEVICE), z.to(DEVICE), norm.to(DEVICE)))


@pytest.mark.parametrize("dot_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_grad_cols, need_dza, offset", [(19, True, 0), (7, True, 0),
                                                           (0, True, 0), (19, False, 3)])
def test_triton_lse_ops_pass_opcheck(dot_dtype, n_grad_cols, need_dza, offset):
    _triton_or_skip()
    za, zc = _rows(7, 20, 0, DEVICE), _rows(19, 20, 1, DEVICE)
    torch.library.opcheck(torch.ops.clreg_fast.triton_lse_forward.default,
                          (za, zc, offset, 5.0, dot_dtype, 16, None))
    lse = torch.ops.clreg_fast.triton_lse_forward(za, zc, offset, 5.0, dot_dtype, 16, None)
    w = torch.rand(7, device=DEVICE)
    torch.library.opcheck(torch.ops.clreg_fast.triton_lse_backward.default,
                          (za, zc, lse, w, offset, 5.0, n_grad_cols, dot_dtype, need_dza, 16,
                           None))


@pytest.mark.slow
def test_compiled_step_matches_eager_triton():
    """Under the interpreter the triton ops are opaque custom ops; on GPU triton_ops."""
    _triton_or_skip()
    torch.manual_seed(0)
    model = TinyModel(backend="triton").to(DEVICE)
    explained = torch._dynamo.explain(model)(*_batch(10, 7, 0, device=DEVICE))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # Inductor, on CPU too
    _assert_compiled_matches_eager(model, compiled, [(10, 7), (13, 9)], device=DEVICE)


# ---------------------------------------------------------------------------- cuda

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dot", ["float32", "bfloat16", "float16"])
def test_cuda_ops_pass_opcheck(dot):
    if "cuda" not in available_backends():
        pytest.skip("the cuda backend is not available here")
    za, zc = _rows(70, 40, 0, "cuda"), _rows(133, 40, 1, "cuda")
    torch.library.opcheck(torch.ops.clreg_fast.cuda_lse_forward.default, (za, zc, 0, 10.0, dot))
    lse = torch.ops.clreg_fast.cuda_lse_forward(za, zc, 0, 10.0, dot)
    w = torch.rand(70, device="cuda")
    for n_grad_cols, need_dza in [(133, True), (70, True), (0, True), (133, False)]:
        torch.library.opcheck(torch.ops.clreg_fast.cuda_lse_backward.default,
                              (za, zc, lse, w, 0, 10.0, n_grad_cols, dot, need_dza))


def test_module_temperature_attribute_compiles_with_dynamic_true():
    """CLRegLoss keeps temperature as a float attribute, which dynamic=True makes symbolic: the
    input check must trace it (math.isfinite could not) and the loss equal eager."""
    from clreg_fast import CLRegLoss

    torch.manual_seed(0)
    loss_fn = CLRegLoss(6, 4, temperature=0.2)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True, dynamic=True)
    f, r, lab = *_batch(7, 5, 0)[:2], torch.tensor([0, 0, 1, 1, 2, 2, 3])
    f, r = f[:, :6], r[:, :6]
    torch.testing.assert_close(compiled(f, r, labels=lab), loss_fn(f, r, labels=lab),
                               rtol=1e-5, atol=1e-6)
