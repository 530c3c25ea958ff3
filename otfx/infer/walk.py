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
    for group in traced.tied:
        present = [name for name in group if name in ctx.param_axes]
        for other in present[1:]:
            for a, b in zip(ctx.param_axes[present[0]], ctx.param_axes[other]):
                ctx.link(a, b, "tied")


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
        if handler is None:
            if isinstance(val, torch.Tensor) or isinstance(val, (tuple, list)):
                ctx.fix_node(node, f"no pass understands {node.target}", unknown=True)
            else:
                ctx.set_axes(node, None)
            continue
        handler(ctx, node)
    _tie(ctx, traced)
    ctx.spaces.close()
    return Inference.build(traced, ctx)
