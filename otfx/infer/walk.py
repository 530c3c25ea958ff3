"""Stage 2: walk the traced graph once, dispatching each op to its pass, and collect the transport spaces."""

from __future__ import annotations

import torch
from torch import fx

from otfx.infer.context import InferContext, _tensor_args
from otfx.infer.result import Inference
from otfx.passes import lookup
from otfx.trace import Traced


def _placeholder(ctx: InferContext, traced: Traced, node: fx.Node) -> None:
    name = node.name
    shape = ctx.shape(node)
    if shape is None:
        ctx.set_axes(node, None)
        return
    if name in traced.placeholder_to_param:
        fqn = traced.placeholder_to_param[name]
        axes = ctx.fresh(shape)
        ctx.param_axes[fqn] = axes
        ctx.param_view[node] = (fqn, list(range(len(shape))))
    elif name in traced.placeholder_to_buffer or name in traced.placeholder_to_constant:
        fqn = traced.placeholder_to_buffer.get(name) or traced.placeholder_to_constant[name]
        axes = ctx.fresh(shape, f"buffer or constant {fqn}")
        ctx.buffer_axes[fqn] = axes
    else:
        axes = ctx.fresh(shape, "model input")
        ctx.dynamic.add(node)
    ctx.set_axes(node, axes)


def _fix_output(ctx: InferContext, node: fx.Node) -> None:
    for out in _tensor_args(node):
        for sid in ctx.axes_of(out) or []:
            ctx.spaces.fix(sid, "model output")


def _tie(ctx: InferContext, traced: Traced) -> None:
    """Tied parameters are one tensor: drop names the graph never reads, link the axes of the rest."""
    unused = {traced.placeholder_to_param[n.name] for n in traced.graph.nodes
              if n.op == "placeholder" and n.name in traced.placeholder_to_param and not n.users}
    for group in traced.tied:
        present = [name for name in group if name in ctx.param_axes and name not in unused]
        for name in group:
            if name in unused and present:
                ctx.param_axes.pop(name, None)
        for other in present[1:]:
            for a, b in zip(ctx.param_axes[present[0]], ctx.param_axes[other]):
                ctx.link(a, b, "tied")


def _separate_reuse(ctx: InferContext, node: fx.Node) -> dict[fx.Node, list[int]]:
    """A parameter read by several ops (an embedding matrix reused as the output projection) gets its own
    axes at each later use, tied to the first use, so that one use's map does not feed on the other's."""
    swapped = {}
    for a in _tensor_args(node):
        if a.op != "placeholder" or a not in ctx.param_view or a in swapped:
            continue
        if a in ctx.used_params:
            original = ctx.axes[a]
            copies = ctx.fresh([ctx.spaces.size(s) for s in original])
            for s, c in zip(original, copies):
                ctx.link(s, c, "tied")
            swapped[a] = original
            ctx.axes[a] = copies
            ctx.secondary.add(a)
        ctx.used_params.add(a)
    return swapped


def infer(traced: Traced) -> Inference:
    """Annotate every tensor axis of ``traced`` with its transport space and build the result."""
    ctx = InferContext()
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            _placeholder(ctx, traced, node)
            continue
        if node.op == "output":
            _fix_output(ctx, node)
            continue
        if node.op != "call_function":
            ctx.fix_node(node, f"{node.op} {node.target}", unknown=True)
            continue
        if any(a in ctx.dynamic for a in _tensor_args(node)):
            ctx.dynamic.add(node)
        handler = lookup(node.target)
        val = node.meta.get("val")
        swapped = _separate_reuse(ctx, node)
        if handler is None:
            if isinstance(val, torch.Tensor) or isinstance(val, (tuple, list)):
                ctx.fix_node(node, f"no pass understands {node.target}", unknown=True)
            else:
                ctx.set_axes(node, None)
            continue
        handler(ctx, node)
        for param_node, axes in swapped.items():
            ctx.axes[param_node] = axes
        ctx.secondary.clear()
    _tie(ctx, traced)
    ctx.spaces.close()
    return Inference.build(traced, ctx)
