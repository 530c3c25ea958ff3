"""Op passes: one module per op family, each registering handlers for the ATen ops it understands.

A handler is ``handler(ctx: InferContext, node: torch.fx.Node) -> None``; it sets the spaces of the node's
output axes and links them to its inputs'. Support for a new op is added with ``@register(torch.ops.aten.x)``
in a new module here (or from user code); an op without a handler freezes every space it touches.
"""

from __future__ import annotations

from collections.abc import Callable

PASSES: dict[object, Callable] = {}


def register(*targets) -> Callable:
    """Register a handler for one or more op targets (``torch.ops.aten.linear.default`` or an overload packet)."""

    def wrap(fn: Callable) -> Callable:
        for target in targets:
            PASSES[target] = fn
        return fn

    return wrap


def lookup(target) -> Callable | None:
    """The handler for an op: by exact overload first, then by its overload packet."""
    if target in PASSES:
        return PASSES[target]
    packet = getattr(target, "overloadpacket", None)
    return PASSES.get(packet) if packet is not None else None


from otfx.passes import (  # noqa: E402,F401  (importing registers the handlers)
    attention,
    concat,
    contraction,
    elementwise,
    indexing,
    norm,
    reduction,
    shape,
)
