"""Grouped matmuls (mixture-of-experts layers): ``out[s] = x[s] @ w[group(s)]`` for tokens sorted by group.

``torch._grouped_mm`` and transformers' fallback op take x (tokens, in), w (groups, in, out) and the group
offsets. The input axis is contracted with w's ``in`` axis; the output is a new space made by w's ``out`` axis,
one permutation for every group (each expert's units move together with the same units of the others); the
group axis is the expert ids the router chose, so it keeps its order.
"""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes.contraction import layer_output
from torch import fx

from otfx.infer.context import InferContext

GROUPED_MM = [torch.ops.aten._grouped_mm.default, "transformers.grouped_mm_fallback.default"]


@register(*GROUPED_MM)
def grouped_mm(ctx: InferContext, node: fx.Node) -> None:
    x, weight = node.args[:2]
    x_axes, w_axes = ctx.axes_of(x), ctx.axes_of(weight)
    if x_axes is None or w_axes is None or len(x_axes) != 2 or len(w_axes) != 3:
        ctx.fix_node(node, f"{node.target} with operands other than (tokens, in) x (groups, in, out)",
                     unknown=True)
        return
    ctx.freeze(node, [w_axes[0]], "expert ids chosen by the router", ordered=True)
    out = layer_output(ctx, node, x_axes[1], weight, 1, 2)
    ctx.set_axes(node, [x_axes[0], out])
