"""Pattern: attention written as matmul(q, k^T) -> (scale, mask) -> softmax -> (dropout) -> matmul(., v)
(matmul, bmm or a two-operand einsum).

Anchored at the softmax; the two matmuls are the ones the contraction pass recorded. Records one attention
node (form ``matmul+softmax``) that owns both matmuls in the flow graph."""

from __future__ import annotations

import torch
from otfx.passes import register_pattern
from otfx.passes._match import CASTS, downstream, skip_up
from torch import fx

from otfx.infer.context import InferContext
from otfx.infer.kinds import RecordKind

aten = torch.ops.aten

#: ops allowed between the scores matmul and the softmax (scaling, masking, casts)
SCORE_OPS = CASTS | {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
                     aten.sub.Tensor, aten.where.self, aten.where.ScalarOther, aten.masked_fill.Scalar,
                     aten.masked_fill.Tensor}


@register_pattern("matmul_attention", aten.softmax.int, aten._softmax.default)
def matmul_attention(ctx: InferContext, node: fx.Node) -> bool:
    matmuls = {r.node: r for r in ctx.records if r.kind == RecordKind.matmul}
    src = skip_up(node.args[0], SCORE_OPS)
    if not isinstance(src, fx.Node) or src.name not in matmuls:
        return False
    dst = downstream(node, lambda user, via: user.name in matmuls and matmuls[user.name].info.get("a") == via.name)
    if dst is None:
        return False
    scores, mix = matmuls[src.name], matmuls[dst.name]
    ctx.record(RecordKind.attention, node, [scores.inputs[0], scores.inputs[1], mix.output], mix.output,
               heads=[scores.info["a_heads"], scores.info["b_heads"], mix.info["b_heads"]],
               form="matmul+softmax", matmuls=[src.name, dst.name])
    return True
