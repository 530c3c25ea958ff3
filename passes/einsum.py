"""einsum with one or two operands: letters shared by operands are one space; a letter an activation
contracts with a parameter is a layer's input side, and a letter only the parameter brings to the output is
the layer's new space (einsum projections); two activations contracted are linked as matmul's are."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import is_dynamic
from torch import fx

from otfx.infer.context import InferContext
from otfx.infer.kinds import LinkKind, RecordKind

aten = torch.ops.aten


def parse(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """Operand subscripts and output subscripts, ``...`` expanded to upper-case letters; None if malformed."""
    equation = equation.replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    width = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ell = "".join(spare[:width])
    expanded = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            n = r - len(t.replace("...", ""))
            t = t.replace("...", ell[width - n:])
        if len(t) != r:
            return None
        expanded.append(t)
    if not arrow:
        letters = "".join(expanded)
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    else:
        out = out.replace("...", ell)
    return expanded, out


@register(aten.einsum.default)
def einsum(ctx: InferContext, node: fx.Node) -> None:
    equation, operands = node.args[0], list(node.args[1])
    axes = [ctx.axes_of(t) for t in operands]
    parsed = parse(equation, [len(a) for a in axes if a is not None]) if None not in axes else None
    if parsed is None or len(operands) > 2:
        ctx.fix_node(node, f"einsum {equation!r} with {len(operands)} operands", unknown=True)
        return
    terms, out = parsed
    where = [{c: i for i, c in enumerate(t)} for t in terms]
    dynamic = [is_dynamic(ctx, t) for t in operands]
    layer = len(operands) == 2 and dynamic.count(True) == 1 and not dynamic[1 - dynamic.index(True)] \
        and ctx.is_param_derived(operands[1 - dynamic.index(True)])
    both = len(operands) == 2 and all(dynamic)
    for t, term in enumerate(terms):  # a letter repeated within one operand (a diagonal) is one space
        for i, c in enumerate(term):
            if where[t][c] != i:
                ctx.link(axes[t][where[t][c]], axes[t][i])
    result: dict[str, int] = {}
    if len(operands) == 2:
        x, w = (dynamic.index(True), 1 - dynamic.index(True)) if layer else (0, 1)
        for c in set(terms[0]) & set(terms[1]):
            kind = LinkKind.exact if not both else (LinkKind.heads if c in out else LinkKind.contract)
            ctx.link(axes[x][where[x][c]], axes[w][where[w][c]], kind)
            if layer and c not in out:
                ctx.consume(operands[w], where[w][c])
        if layer:
            for c in out:
                if c in where[w] and c not in where[x]:
                    result[c] = ctx.spaces.new(ctx.spaces.size(axes[w][where[w][c]]))
                    ctx.link(axes[w][where[w][c]], result[c])
                    ctx.produce(result[c], operands[w], where[w][c], node)
        if both:
            _record_product(ctx, node, terms, out, axes, where)
    for c in out:
        if c not in result:
            t = 0 if c in where[0] else 1
            result[c] = axes[t][where[t][c]]
    ctx.set_axes(node, [result[c] for c in out])


def _record_product(ctx: InferContext, node: fx.Node, terms, out: str, axes, where) -> None:
    """A product of two activations, recorded as matmul records it (attention scores, attention x values)."""
    contracted = [c for c in terms[0] if c in where[1] and c not in out]
    shared = [c for c in out if c in where[0] and c in where[1]]
    free_b = [c for c in out if c in where[1] and c not in where[0]]
    if not contracted or not free_b:
        return
    c, f = contracted[-1], free_b[-1]
    heads = shared[-1] if shared else None
    ctx.record(RecordKind.matmul, node, [axes[0][where[0][c]], axes[1][where[1][c]]], axes[1][where[1][f]],
               a=node.args[1][0].name, b=node.args[1][1].name,
               a_heads=axes[0][where[0][heads]] if heads else None,
               b_heads=axes[1][where[1][heads]] if heads else None)
