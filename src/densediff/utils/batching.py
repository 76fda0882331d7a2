"""Batch-invariant inference: a batch of images whose every output is bit-identical to the
output of each image alone.

Elementwise operations, normalisations, softmax, gathers and grid sampling compute each
image's numbers in the same order at any batch size. Convolutions and matrix products do
not: oneDNN and the BLAS choose their blocking, and with it the order of the sums, from
the problem size, so an image's result in a batch of four can differ from its result alone
in the last bits (a few 1e-6 on the models here; the same holds for cuBLAS / cuDNN on a GPU).
:func:`batch_invariant` therefore runs exactly those layers one image at a time, each call
with the shape the image alone would give, and everything else on the whole batch. The
layers whose cost is their matrix products gain nothing from a batch anyway at the sizes of
dense prediction (one 512 x 512 image is 16,384 rows per product: already at the CPU's
matrix rate; ``benchmarks/RESULTS.md`` §14h, §14j); what a batch does save, the per-call cost of
the many small elementwise operations, is kept.

Functional matrix products inside a module (attention's ``q @ k^T``) are batched over their
leading dimensions with one independent product per matrix, which is batch-invariant by
construction; the tests compare whole predictions bit for bit to make sure of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ALIGNMENT", "PER_IMAGE_LAYERS", "batch_invariant"]

PER_IMAGE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
"""The layers :func:`batch_invariant` runs one image at a time (those whose kernels sum in
an order that depends on the batch size)."""


def _per_image(forward, batch: int):
    """``forward`` applied to each of the ``batch`` equal parts of its input's leading
    dimension, the outputs concatenated; inputs whose leading dimension is not a multiple
    of ``batch`` (e.g. one time embedding shared by all images) go through whole."""

    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if batch == 1 or x.dim() == 0 or x.shape[0] % batch:
            return forward(x, *args, **kwargs)
        return torch.cat([forward(_aligned(part), *args, **kwargs) for part in x.chunk(batch)])

    return run


ALIGNMENT = 64
"""Bytes: PyTorch's CPU allocator aligns every new tensor to 64; the matrix kernels take
another code path (another rounding) for data that is not."""


def _aligned(part: torch.Tensor) -> torch.Tensor:
    """``part``, copied where its data does not start on an :data:`ALIGNMENT` boundary, as
    the freshly allocated tensor of a batch of one does (an image's part of a batch starts
    where the previous image's ends)."""
    return part if part.data_ptr() % ALIGNMENT == 0 else part.clone()


@contextmanager
def batch_invariant(model: nn.Module, batch: int) -> Iterator[nn.Module]:
    """Within the block, every :data:`PER_IMAGE_LAYERS` layer of ``model`` runs on one
    image's part of its input at a time: the leading dimension split into ``batch`` equal,
    image-major parts (the layout of a batch, of windows per image, of noise starts per
    image). Leaving the block (also on an error) restores the layers.

    Args:
        model: the network; its layers are patched on the instances, so other models are
            unaffected (a model that is not an ``nn.Module``, e.g. an onnxruntime session
            wrapper, is left as it is).
        batch: images in the batch about to run (1: nothing changes).
    """
    layers = model.modules() if isinstance(model, nn.Module) and batch > 1 else ()
    patched = [(m, m.__dict__.get("forward")) for m in layers if isinstance(m, PER_IMAGE_LAYERS)]
    for m, _ in patched:
        m.forward = _per_image(m.forward, batch)
    try:
        yield model
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own
