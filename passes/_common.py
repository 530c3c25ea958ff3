"""Helpers shared by the op passes: argument access and broadcasting."""

from __future__ import annotations

from torch import fx

from otfx.infer.context import Axes, InferContext


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of an ATen call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def dim_index(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def is_dynamic(ctx: InferContext, node) -> bool:
    """Whether a tensor depends on the model's inputs (not only on parameters, buffers and constants)."""
    return isinstance(node, fx.Node) and node in ctx.dynamic


def depends_on(ctx: InferContext, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is computed from ``source`` (a backward search, stopped at nodes before ``source``)."""
    order = ctx.order(node)
    start = order[source]
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current is source:
            return True
        if current in seen or order.get(current, -1) <= start:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return False


def is_table_term(ctx: InferContext, op, others: list) -> bool:
    """A table read (parameter rows looked up by ids, e.g. position embeddings at positions computed from the
    token ids) added to tensors not computed from it: a parameter added as it is, not a residual branch."""
    return (isinstance(op, fx.Node) and op in ctx.tables
            and not any(isinstance(o, fx.Node) and o is not op and depends_on(ctx, o, op) for o in others))


def broadcast(ctx: InferContext, node: fx.Node, operands: list[fx.Node], combine: str | None) -> Axes:
    """Link the broadcast-aligned axes of element-wise operands and return the output axes.

    ``combine`` names the flow-graph node ("residual" for add) created where two activations (input-dependent,
    not table reads) with different transport spaces meet; otherwise they are the same space.
    """
    shapes = [ctx.shape(op) for op in operands]
    axes = [ctx.axes_of(op) for op in operands]
    out_shape = ctx.shape(node)
    out: Axes = []
    for d in range(len(out_shape)):
        offset = len(out_shape) - d
        present = [(op, ax[len(ax) - offset]) for op, ax, sh in zip(operands, axes, shapes)
                   if ax is not None and len(ax) >= offset and sh[len(sh) - offset] == out_shape[d]]
        if not present:
            out.append(ctx.spaces.new(out_shape[d]))
            continue
        spaces = ctx.spaces
        distinct = {spaces.fine.find(s) for _, s in present}
        dynamic = [s for op, s in present if is_dynamic(ctx, op) and not is_table_term(ctx, op, operands)]
        if (combine and len(distinct) > 1 and len(dynamic) == len(present)
                and not any(spaces.fine.is_fixed(s) for _, s in present)):
            joined = spaces.new(out_shape[d])
            for _, s in present:
                ctx.link(s, joined, combine)
            ctx.record(combine, node, [s for _, s in present], joined)
            out.append(joined)
        else:
            first = present[0][1]
            for _, s in present[1:]:
                ctx.link(first, s)
            out.append(first)
            # parameters added as they are to an input-dependent tensor (position tables) describe the space
            # they write; a parameter offset by a constant (a norm's 1 + w) does not
            # parameters that only meet each other (diffllama's lambda_q1 * lambda_k1, summed): their values are
            # all that tells the space's indices apart
            params = [op for op, _ in present if ctx.is_param_derived(op)]
            if not combine and len(params) > 1 and not any(is_dynamic(ctx, op) for op in operands):
                for op, ax in zip(operands, axes):
                    if op in params:
                        ctx.write(first, op, len(ax) - offset, node)
            if combine and any(is_dynamic(ctx, op) for op in operands):
                for op, ax, sh in zip(operands, axes, shapes):
                    if ax is not None and len(ax) >= offset and sh[len(sh) - offset] == out_shape[d]:
                        ctx.write(first, op, len(ax) - offset, node)
    return out
