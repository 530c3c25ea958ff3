"""Reductions over an axis that do not depend on the order of its entries (mean, sum, max, var, norm)."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
          aten.std.correction, aten.logsumexp.default, aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim,
          aten.var.dim, aten.std.dim)
def reduce(ctx: InferContext, node: fx.Node) -> None:
    x = node.args[0]
    x_axes = ctx.axes_of(x)
    dims_arg = 2 if node.target == aten.linalg_vector_norm.default else 1
    dims = arg(node, dims_arg, "dim")
    keepdim = arg(node, dims_arg + 1, "keepdim", False)
    if node.target in (aten.var.correction, aten.std.correction):
        keepdim = node.kwargs.get("keepdim", False)
    ndim = len(x_axes)
    if dims is None or dims == []:
        dims = list(range(ndim))
    dims = {dim_index(d, ndim) for d in ([dims] if isinstance(dims, int) else dims)}
    out = []
    for d, sid in enumerate(x_axes):
        if d not in dims:
            out.append(sid)
        elif keepdim:
            out.append(ctx.spaces.new(1))
    ctx.set_axes(node, out)


@register(aten.mean.default, aten.sum.default, aten.max.default, aten.min.default)
def reduce_all(ctx: InferContext, node: fx.Node) -> None:
    ctx.set_axes(node, [])
