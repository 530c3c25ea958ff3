"""Direct sums: cat along an axis makes it the sum of the inputs' spaces (and, along the sequence, a concat
node where two input-dependent tensors meet); split/chunk cut an axis into summands (GPT-2's fused qkv);
unbind/select over the outer factor of a product turn it into a sum (timm and nn.MultiheadAttention qkv)."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index, is_dynamic, is_table_term
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


def _join_other_axes(ctx: InferContext, node: fx.Node, tensors: list[fx.Node], skip: int | None) -> list[int]:
    """Link the axes (other than ``skip``) of tensors that are laid side by side; returns the output's."""
    spaces = ctx.spaces
    all_axes = [ctx.axes_of(t) for t in tensors]
    out = []
    for d in range(len(all_axes[0])):
        if d == skip:
            out.append(-1)
            continue
        column = [ax[d] for ax in all_axes]
        distinct = {spaces.fine.find(s) for s in column}
        if (len(distinct) > 1 and all(is_dynamic(ctx, t) and not is_table_term(ctx, t, tensors) for t in tensors)
                and not any(spaces.fine.is_fixed(s) for s in column)):
            joined = spaces.new(spaces.size(column[0]))
            for s in column:
                ctx.link(s, joined, "concat")
            ctx.record("concat", node, column, joined)
            out.append(joined)
        else:
            for s in column[1:]:
                ctx.link(column[0], s)
            out.append(column[0])
            if any(is_dynamic(ctx, t) for t in tensors):  # a class token put next to patches describes them
                for t in tensors:
                    ctx.write(column[0], t, d, node)
    return out


@register(aten.cat.default, aten.concat.default, aten.concatenate.default)
def cat(ctx: InferContext, node: fx.Node) -> None:
    tensors = [t for t in node.args[0] if ctx.shape(t) is not None and 0 not in ctx.shape(t)]
    ndim = len(ctx.shape(node))
    dim = dim_index(arg(node, 1, "dim", 0), ndim)
    if len(tensors) == 1:
        ctx.set_axes(node, list(ctx.axes_of(tensors[0])))
        return
    if not tensors:  # parts whose sizes are known only at run time (tokens routed to each expert)
        parts = [t for t in node.args[0] if ctx.axes_of(t) is not None]
        out = _join_other_axes(ctx, node, parts, dim)
        out[dim] = ctx.spaces.new(ctx.shape(node)[dim], "concatenation of parts of input-dependent size")
        ctx.set_axes(node, out)
        return
    out = _join_other_axes(ctx, node, tensors, dim)
    out[dim] = ctx.spaces.direct_sum([ctx.axes_of(t)[dim] for t in tensors])
    ctx.set_axes(node, out)


@register(aten.stack.default)
def stack(ctx: InferContext, node: fx.Node) -> None:
    tensors = list(node.args[0])
    ndim = len(ctx.shape(node))
    dim = dim_index(arg(node, 1, "dim", 0), ndim)
    out = _join_other_axes(ctx, node, tensors, None)
    out.insert(dim, ctx.spaces.new(len(tensors), "stacked tensors are told apart by position"))
    ctx.set_axes(node, out)


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
          aten.tensor_split.indices)
def split(ctx: InferContext, node: fx.Node) -> None:
    x = node.args[0]
    axes = ctx.axes_of(x)
    vals = node.meta["val"]
    ndim = len(axes)
    dim = dim_index(arg(node, 2, "dim", 0), ndim)
    if not all(isinstance(v.shape[dim], int) for v in vals):  # sizes known only at run time (tokens per expert)
        ctx.freeze(node, [axes[dim]], "split into parts whose sizes depend on the input", ordered=True)
        ctx.set_axes(node, [axes[:dim] + [ctx.spaces.new(0, "a part of input-dependent size")] + axes[dim + 1:]
                            for _ in vals])
        return
    sizes = [int(v.shape[dim]) for v in vals]
    filled = [n for n in sizes if n]
    if len(filled) == 1:  # the whole and empty rest (tensor_split at or past the end): the same space
        ctx.set_axes(node, [list(axes) if n else axes[:dim] + [ctx.spaces.new(0, "an empty part")] + axes[dim + 1:]
                            for n in sizes])
        return
    parts = [ctx.spaces.new(n) for n in sizes]
    ctx.spaces.set_structure(axes[dim], "sum", [p for p, n in zip(parts, sizes) if n])
    ctx.set_axes(node, [axes[:dim] + [p] + axes[dim + 1:] for p in parts])


def _outer_factor_copies(ctx: InferContext, factor: int) -> list[dict[int, int]] | None:
    """If ``factor`` is the outer factor of a product P = factor x R, rewrite P as a sum of copies of R (one
    per index) and return, per index, the map from R's spaces to the copy's."""
    coarse = ctx.spaces.coarse
    key = coarse.find(factor)
    if key in ctx.factor_splits:
        return ctx.factor_splits[key][1]
    parents = [root for root, (kind, children) in coarse.structure.items()
               if kind == "prod" and coarse.find(root) == root and coarse.find(children[0]) == key]
    if len(parents) != 1:
        return None
    parent = parents[0]
    rest = coarse.structure[parent][1][1:]
    copies, summands = [], []
    for _ in range(coarse.size[key]):
        mapping = {coarse.find(r): ctx.spaces.new(coarse.size[coarse.find(r)]) for r in rest}
        copies.append(mapping)
        parts = [mapping[coarse.find(r)] for r in rest]
        summands.append(parts[0] if len(parts) == 1 else ctx.spaces.product(parts))
    for partition in (ctx.spaces.coarse, ctx.spaces.fine):
        partition.replace_structure(parent, "sum", summands)
    ctx.spaces.fix(factor, "selected by index")
    ctx.factor_splits[key] = (parent, copies)
    return copies


def sum_as_outer_factor(ctx: InferContext, sid: int, parts: list[int]) -> bool:
    """A space that is already a direct sum of F equal summands (q | k | v, each of its own bias) reshaped
    into the product F x R (timm's ``reshape(B, N, 3, H, -1)``): a sum of products, not a conflict. Each
    summand becomes the product of its own copy of R, the factor F only tells the summands apart (fixed),
    and a later unbind or select along F reads summand i's copy (as ``_outer_factor_copies``). False where
    the sum does not cut at multiples of R's size this way (the caller then declares the product)."""
    spaces, coarse = ctx.spaces, ctx.spaces.coarse
    structure = coarse.structure.get(coarse.find(sid))
    if structure is None or structure[0] != "sum" or len(parts) < 2:
        return False
    summands = coarse._flatten(structure[1], "sum")
    rest = parts[1:]
    width = 1
    for r in rest:
        width *= spaces.size(r)
    if len(summands) != spaces.size(parts[0]) or any(spaces.size(c) != width for c in summands):
        return False
    copies = []
    for c in summands:
        if len(rest) == 1:
            copies.append({coarse.find(rest[0]): c})
            continue
        mapping = {coarse.find(r): spaces.new(spaces.size(r)) for r in rest}
        spaces.set_structure(c, "prod", [mapping[coarse.find(r)] for r in rest])
        copies.append(mapping)
    spaces.fix(parts[0], "selected by index")
    ctx.factor_splits[coarse.find(parts[0])] = (coarse.find(sid), copies)
    return True


def _take(ctx: InferContext, axes: list[int], dim: int, index: int) -> list[int] | None:
    copies = _outer_factor_copies(ctx, axes[dim])
    if copies is None:
        ctx.spaces.fix(axes[dim], "selected by index")
        return axes[:dim] + axes[dim + 1:]
    find = ctx.spaces.coarse.find
    mapping = {find(k): v for k, v in copies[index].items()}  # roots may have moved since the split
    return [mapping.get(find(a), a) for i, a in enumerate(axes) if i != dim]


@register(aten.unbind.int)
def unbind(ctx: InferContext, node: fx.Node) -> None:
    x = node.args[0]
    axes = ctx.axes_of(x)
    dim = dim_index(arg(node, 1, "dim", 0), len(axes))
    ctx.set_axes(node, [_take(ctx, axes, dim, i) for i in range(ctx.shape(x)[dim])])


@register(aten.select.int)
def select(ctx: InferContext, node: fx.Node) -> None:
    x, dim, index = node.args[:3]
    axes = ctx.axes_of(x)
    dim = dim_index(dim, len(axes))
    index = index + ctx.shape(x)[dim] if index < 0 else index
    ctx.set_axes(node, _take(ctx, axes, dim, index))
