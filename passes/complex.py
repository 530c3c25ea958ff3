"""Complex views (rotary embeddings written as complex products, as in Llama 4): a trailing (real, imag) pair
becomes one complex entry and back. The pair axis is fixed (real and imaginary parts never trade places); the
other axes keep their spaces, so the product with the rotary frequencies pins the pairs it rotates."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import broadcast
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


@register(aten.view_as_complex.default, view=True)
def view_as_complex(ctx: InferContext, node: fx.Node) -> None:
    axes = ctx.axes_of(node.args[0])
    if axes is None or not axes:
        ctx.fix_node(node, "view_as_complex of a non-tensor", unknown=False)
        return
    ctx.spaces.fix(axes[-1], "real and imaginary parts of a complex view")
    ctx.set_axes(node, list(axes[:-1]))


@register(aten.view_as_real.default, view=True)
def view_as_real(ctx: InferContext, node: fx.Node) -> None:
    axes = ctx.axes_of(node.args[0])
    if axes is None:
        ctx.fix_node(node, "view_as_real of a non-tensor", unknown=False)
        return
    ctx.set_axes(node, list(axes) + [ctx.spaces.new(2, "real and imaginary parts of a complex view")])


@register(aten.polar.default, aten.complex.default)
def polar(ctx: InferContext, node: fx.Node) -> None:
    """A complex number from two real tensors (magnitude and angle, or real and imaginary): element-wise."""
    operands = [a for a in node.args if isinstance(a, fx.Node) and ctx.shape(a) is not None]
    ctx.set_axes(node, broadcast(ctx, node, operands, None))


@register(aten.real.default, aten.imag.default, view=True)
def real_part(ctx: InferContext, node: fx.Node) -> None:
    ctx.set_axes(node, list(ctx.axes_of(node.args[0])))


FFTS = [aten.fft_fft.default, aten.fft_ifft.default, aten.fft_fftn.default, aten.fft_ifftn.default,
        aten.fft_fft2.default, aten.fft_ifft2.default, aten.fft_rfft.default, aten.fft_irfft.default,
        aten.fft_rfftn.default, aten.fft_irfftn.default]


@register(*FFTS)
def fft(ctx: InferContext, node: fx.Node) -> None:
    """A Fourier transform over some axes (FNet's token mixing): the result depends on their order, so they
    are fixed (the model's own order, not a gap a pass could fill); the other axes pass."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    if axes is None:
        ctx.fix_node(node, f"{node.target} of a non-tensor", unknown=False)
        return
    one_dim = node.target in (aten.fft_fft.default, aten.fft_ifft.default, aten.fft_rfft.default,
                              aten.fft_irfft.default)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1 if one_dim else None)
    if node.target in (aten.fft_fft2.default, aten.fft_ifft2.default) and dim is None:
        dim = [-2, -1]
    dims = range(len(axes)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = sorted({d + len(axes) if d < 0 else d for d in dims})
    ctx.freeze(node, [axes[d] for d in dims], f"transformed by {node.target}", ordered=True)
    shape, out = ctx.shape(node), list(axes)
    for d in dims:
        out[d] = ctx.spaces.new(shape[d], f"frequencies of {node.target}")
    ctx.set_axes(node, out)
