"""``torch`` backend: the similarity part in anchor chunks of plain PyTorch, CPU and GPU.

Peak extra memory is one (chunk x (Nf + Nr)) float32 block on top of the O((Nf + Nr) x P)
features, instead of the reference's full matrix and its autograd graph.
"""
from clreg_fast.backends.torch_chunked.ops import TorchChunkedKernels

__all__ = ["TorchChunkedKernels"]
