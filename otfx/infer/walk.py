"""Stage 2: walk the traced graph once, dispatching each op to its pass, and collect the transport spaces."""

from __future__ import annotations

import torch
from torch import fx

from otfx.infer.context import SELECTS, Conflict, InferContext, _tensor_args
from otfx.infer.result import Inference
from otfx.passes import REGISTRY, PassError, Registry, target_name
from otfx.trace import Traced

__all__ = ["PassError", "infer"]


#: ops whose second operand gives only a shape or dtype: a bias expanded as the stream is still a parameter
SHAPE_REFERENCE = {torch.ops.aten.expand_as.default, torch.ops.aten.view_as.default,
                   torch.ops.aten.reshape_as.default, torch.ops.aten.type_as.default}


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    return f" in module {path[0]!r}" if path and path[0] else ""


def _run(ctx: InferContext, handler, node: fx.Node, what: str):
    """Call a pass on a node; a pass that raises is reported with the node, the op and the pass."""
    conflicts = len(ctx.spaces.coarse.conflicts), len(ctx.spaces.fine.conflicts)
    try:
        result = handler(ctx, node)
    except Exception as exc:
        name = f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', handler)}"
        raise PassError(f"{what} {name} failed on node {node.name!r} (op {target_name(node.target)}"
                        f"{_where(node)}): {type(exc).__name__}: {exc}") from exc
    _attribute(ctx, conflicts, target_name(node.target), node.name)
    return result


def _attribute(ctx: InferContext, since: tuple[int, int], op: str, node: str) -> None:
    """Record the conflicts that appeared since ``since`` (counts in the coarse and fine partitions) at ``op``."""
    found: dict[str, set[int]] = {}
    for part, start in ((ctx.spaces.coarse, since[0]), (ctx.spaces.fine, since[1])):
        for why, spaces in zip(part.conflicts[start:], part.conflict_spaces[start:]):
            found.setdefault(why, set()).update(spaces)
    ctx.conflicts += [Conflict(op, node, why, sorted(spaces)) for why, spaces in found.items()]


def _placeholder(ctx: InferContext, traced: Traced, node: fx.Node) -> None:
    name = node.name
    shape = ctx.shape(node)
    if shape is None:
        ctx.set_axes(node, None)
        return
    if name in traced.placeholder_to_param:
        fqn = traced.placeholder_to_param[name]
        axes = ctx.fresh(shape, None if node.users else "a parameter the traced forward never reads")
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
    axes at each later use, tied to the first use, so that one use's map does not feed on the other's. Taking
    one index of it (``select``: one expert's weight from stacked experts, a different one at each use) is not a
    reuse: every expert's layer shares the parameter's spaces, so their outputs are one class where they are
    concatenated again."""
    if node.target in SELECTS:
        return {}
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


def _patterns(ctx: InferContext, graph: fx.Graph, registry: Registry) -> None:
    """Run every pattern pass at the nodes of its anchor ops, in graph order."""
    patterns = list(registry.patterns.values())
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for pattern in patterns:
            if node.target in pattern.anchors or getattr(node.target, "overloadpacket", None) in pattern.anchors:
                _run(ctx, pattern.handler, node, f"pattern {pattern.name!r}")


def infer(traced: Traced, registry: Registry | None = None) -> Inference:
    """Annotate every tensor axis of ``traced`` with its transport space and build the result.

    ``registry``: the passes to use (default: ``otfx.passes.REGISTRY``; ``Registry.with_passes`` adds per-call
    ones)."""
    registry = REGISTRY if registry is None else registry
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
        read = node.args[:1] if node.target in SHAPE_REFERENCE else _tensor_args(node)
        if any(a in ctx.dynamic for a in read):
            ctx.dynamic.add(node)
        op_pass = registry.lookup(node.target)
        val = node.meta.get("val")
        swapped = _separate_reuse(ctx, node)
        if op_pass is None:
            if isinstance(val, torch.Tensor) or isinstance(val, (tuple, list)):
                ctx.fix_node(node, f"no pass understands {node.target}", unknown=True)
            else:
                ctx.set_axes(node, None)
            continue
        _run(ctx, op_pass.handler, node, "pass")
        if op_pass.view and node.args and isinstance(node.args[0], fx.Node):
            ctx.pass_view(node, node.args[0])
            if node.args[0] in ctx.tables:
                ctx.tables.add(node)
        for param_node, axes in swapped.items():
            ctx.axes[param_node] = axes
        ctx.secondary.clear()
    _patterns(ctx, traced.graph, registry)
    _tie(ctx, traced)
    before = len(ctx.spaces.coarse.conflicts), len(ctx.spaces.fine.conflicts)
    ctx.spaces.close()
    _attribute(ctx, before, "closure", "")
    return Inference.build(traced, ctx)
