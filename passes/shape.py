"""Shape ops: reshape-like ops split an axis into a product of spaces (heads x head_dim) or merge axes into
one; transposes reorder axes; expand adds broadcast axes that nothing constrains."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index
from otfx.passes.concat import sum_as_outer_factor
from torch import fx

from otfx.infer.context import InferContext
from otfx.infer.spaces import align_groups

aten = torch.ops.aten


def _empty_reshape(ctx: InferContext, node: fx.Node, in_axes, in_shape, out_shape) -> None:
    """A reshape where a size is 0 (rows picked by a mask, known only at run time): axes equal from the right
    keep their spaces (features); the rest are positions, fixed."""
    out: list[int] = []
    k = 1
    while k <= min(len(in_shape), len(out_shape)) and in_shape[-k] == out_shape[-k] and in_shape[-k] > 0:
        out.insert(0, in_axes[-k])
        k += 1
    rest = len(in_shape) - (k - 1)
    ctx.freeze(node, list(in_axes[:rest]), "reshaped with a size known only at run time")
    ctx.set_axes(node, ctx.fresh(out_shape[:len(out_shape) - len(out)], "positions of input-dependent size") + out)


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.view_as.default, aten.reshape_as.default, view=True)
def reshape(ctx: InferContext, node: fx.Node) -> None:
    """Both shapes are cut into their common refinement (atoms): an axis spanning several atoms is their
    product, e.g. [seq, batch, heads*dim] -> [seq, batch*heads, dim] gives atoms batch, heads, dim.

    The shapes are first cut where both have a boundary (equal running products); a block whose axes mix
    without a common refinement ([i, j] -> [j', i'], a relative-position shift) is fixed on its own, and the
    blocks around it (batch, heads) pass."""
    x = node.args[0]
    in_axes, in_shape, out_shape = ctx.axes_of(x), ctx.shape(x), ctx.shape(node)
    if 0 in in_shape or 0 in out_shape:  # an input-dependent (or empty) size: trailing axes that agree pass
        _empty_reshape(ctx, node, in_axes, in_shape, out_shape)
        return
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [j for j, s in enumerate(out_shape) if s != 1]
    # runs of axes of equal product on both sides
    blocks = align_groups([in_shape[i] for i in ins], [out_shape[j] for j in outs], "prod")
    if blocks is None:
        ctx.fix_node(node, f"reshape {in_shape} -> {out_shape} mixes axes", unknown=False)
        return
    spaces = ctx.spaces
    out_axes = [spaces.new(s) for s in out_shape]
    mixed: list[int] = []
    for block_in, block_out in blocks:
        bin_, bout = [ins[k] for k in block_in], [outs[k] for k in block_out]
        runs_in, runs_out, atoms = _refinement([in_shape[i] for i in bin_], [out_shape[j] for j in bout])
        if atoms is None:
            mixed += [in_axes[i] for i in bin_]
            for j in bout:
                out_axes[j] = spaces.new(out_shape[j], f"reshape {in_shape} -> {out_shape} mixes axes")
            continue
        atom_space: list[int | None] = [None] * len(atoms)
        for i, run in zip(bin_, runs_in):
            if len(run) == 1:
                atom_space[run[0]] = in_axes[i]
            else:
                parts = [spaces.new(atoms[a]) for a in run]
                if not sum_as_outer_factor(ctx, in_axes[i], parts):
                    spaces.set_structure(in_axes[i], "prod", parts)
                for a, part in zip(run, parts):
                    atom_space[a] = part
        for j, run in zip(bout, runs_out):
            out_axes[j] = atom_space[run[0]] if len(run) == 1 else spaces.product([atom_space[a] for a in run])
    if mixed:
        ctx.freeze(node, mixed, f"reshape {in_shape} -> {out_shape} mixes axes")
    ctx.set_axes(node, out_axes)


def _refinement(left: list[int], right: list[int]):
    """Atoms of two factorisations of one size: each side's axes as runs of atoms, or None if they cross."""
    def bounds(sizes: list[int]) -> list[int]:
        out, total = [], 1
        for s in sizes:
            total *= s
            out.append(total)
        return out

    if bounds(left)[-1:] != bounds(right)[-1:]:
        return None, None, None
    cuts = sorted(set(bounds(left)) | set(bounds(right)))
    atoms, prev = [], 1
    for c in cuts:
        if c % prev:
            return None, None, None
        atoms.append(c // prev)
        prev = c

    def runs(sizes: list[int]) -> list[list[int]]:
        result, a = [], 0
        for s in sizes:
            run, total = [], 1
            while total < s:
                total *= atoms[a]
                run.append(a)
                a += 1
            result.append(run)
        return result

    return runs(left), runs(right), atoms


def _reorder(ctx: InferContext, node: fx.Node, order: list[int]) -> None:
    x = node.args[0]
    axes = ctx.axes_of(x)
    ctx.set_axes(node, [axes[i] for i in order])


@register(aten.transpose.int, aten.swapaxes.default, view=True)
def transpose(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node.args[0]))
    a, b = dim_index(node.args[1], ndim), dim_index(node.args[2], ndim)
    order = list(range(ndim))
    order[a], order[b] = order[b], order[a]
    _reorder(ctx, node, order)


@register(aten.t.default, aten.numpy_T.default, view=True)
def t(ctx: InferContext, node: fx.Node) -> None:
    _reorder(ctx, node, list(range(len(ctx.shape(node.args[0]))))[::-1])


@register(aten.permute.default, view=True)
def permute(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node.args[0]))
    _reorder(ctx, node, [dim_index(d, ndim) for d in node.args[1]])


@register(aten.movedim.int, view=True)
def movedim(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node.args[0]))
    order = list(range(ndim))
    src, dst = dim_index(node.args[1], ndim), dim_index(node.args[2], ndim)
    order.insert(dst, order.pop(src))
    _reorder(ctx, node, order)


def _insert_axes(ctx: InferContext, node: fx.Node, mapping: list[int | None]) -> None:
    """Output axis j is input axis mapping[j], or a new unconstrained axis where None."""
    x = node.args[0]
    axes, shape = ctx.axes_of(x), ctx.shape(node)
    ctx.set_axes(node, [axes[m] if m is not None else ctx.spaces.new(shape[j]) for j, m in enumerate(mapping)])


@register(aten.unsqueeze.default, view=True)
def unsqueeze(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node))
    d = dim_index(node.args[1], ndim)
    mapping: list[int | None] = list(range(ndim - 1))
    mapping.insert(d, None)
    _insert_axes(ctx, node, mapping)


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, view=True)
def squeeze(ctx: InferContext, node: fx.Node) -> None:
    in_shape = ctx.shape(node.args[0])
    dims = arg(node, 1, "dim", None)
    if dims is None:
        dims = [i for i, s in enumerate(in_shape) if s == 1]
    dims = {dim_index(d, len(in_shape)) for d in ([dims] if isinstance(dims, int) else dims)}
    _insert_axes(ctx, node, [i for i in range(len(in_shape)) if not (i in dims and in_shape[i] == 1)])


@register(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default, view=True)
def expand(ctx: InferContext, node: fx.Node) -> None:
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    lead = len(out_shape) - len(in_shape)
    mapping: list[int | None] = [None] * lead
    for i, s in enumerate(in_shape):
        mapping.append(i if s == out_shape[lead + i] else None)
    _insert_axes(ctx, node, mapping)
