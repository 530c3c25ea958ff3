"""Op passes: one module per op family, each registering handlers for the ATen ops it understands, and pattern
passes for multi-node idioms (RMSNorm, matmul+softmax attention). See docs/passes.md.

A handler is ``handler(ctx: InferContext, node: torch.fx.Node) -> None``; it sets the spaces of the node's
output axes and links them to its inputs'. Support for a new op is added with ``@register(torch.ops.aten.x)``
in a new module here or from user code (``replace=True`` to override a built-in), or per call with
``otfx.analyse(model, passes={op: handler})``. An op without a handler freezes every space it touches.
"""

from __future__ import annotations

from otfx.passes.registry import (
    OpPass,
    PassError,
    PassesArg,
    PassRegistrationError,
    Pattern,
    Registry,
    passes_key,
    target_name,
)

#: the default registry, which ``otfx.analyse`` uses
REGISTRY = Registry()
register = REGISTRY.register
register_pattern = REGISTRY.register_pattern
unregister = REGISTRY.unregister
lookup = REGISTRY.lookup

from otfx.passes import (  # noqa: E402,F401  (importing registers the handlers)
    attention,
    complex,
    concat,
    contraction,
    einsum,
    elementwise,
    grouped,
    indexing,
    inplace,
    matmul_attention,
    norm,
    pooling,
    reduction,
    rms_norm,
    shape,
)

__all__ = ["REGISTRY", "OpPass", "PassError", "PassRegistrationError", "PassesArg", "Pattern", "Registry", "lookup",
           "passes_key", "register", "register_pattern", "target_name", "unregister"]
