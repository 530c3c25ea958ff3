"""Scaled-dot-product attention: queries and keys share a space per head dim, values and the output share
one, and heads are shared across q, k and v (grouped-query attention: query heads = kv heads x group)."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


@register(aten.scaled_dot_product_attention.default)
def sdpa(ctx: InferContext, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    qa, ka, va = ctx.axes_of(q), ctx.axes_of(k), ctx.axes_of(v)
    if qa is None or ka is None or va is None or len(qa) < 3:
        ctx.fix_node(node, "attention on unexpected inputs", unknown=True)
        return
    spaces = ctx.spaces
    ctx.link(qa[-1], ka[-1], "contract")          # q . k over the head dim
    ctx.link(ka[-2], va[-2])                      # keys and values share the key sequence
    for d in range(len(qa) - 3):                  # batch dims
        ctx.link(qa[d], ka[d])
        ctx.link(ka[d], va[d])
    heads_q, heads_k = ctx.shape(q)[-3], ctx.shape(k)[-3]
    if len(qa) >= 3 and heads_q == heads_k:
        ctx.link(qa[-3], ka[-3], "heads")
        ctx.link(ka[-3], va[-3], "heads")
        out_heads = va[-3]
    else:                                         # enable_gqa: query heads = kv heads x group
        ctx.link(ka[-3], va[-3], "heads")
        group = spaces.new(heads_q // heads_k)
        ctx.link(qa[-3], spaces.product([ka[-3], group]), "heads")
        out_heads = qa[-3]
    if isinstance(mask, fx.Node) and ctx.axes_of(mask):
        mask_axes, mask_shape = ctx.axes_of(mask), ctx.shape(mask)
        for d, sid in enumerate(mask_axes):
            if len(mask_axes) - d == 3 and mask_shape[d] == heads_q > 1:  # a bias per head (T5's relative
                ctx.link(sid, qa[-3])                                     # positions): it moves with the heads
            else:
                spaces.fix(sid, "attention mask")
    ctx.record("attention", node, [qa[-1], ka[-1], va[-1]], va[-1], q=q.name, k=k.name, v=v.name,
               heads=[qa[-3], ka[-3], va[-3]])
    ctx.set_axes(node, qa[:-3] + [out_heads, qa[-2], va[-1]])
