"""The public entry points that tie the pipeline stages together."""

from __future__ import annotations

from torch import nn

from otfx.infer.result import Inference
from otfx.infer.walk import infer
from otfx.passes import REGISTRY, PassesArg, passes_key
from otfx.trace import Traced, trace

_CACHE_SIZE = 4  # inferences kept per Traced (one per registry state and per-call passes)


def analyse(model: Traced | nn.Module | Inference, args: tuple = (), kwargs: dict | None = None, *,
            passes: PassesArg = None) -> Inference:
    """Trace (if needed) and infer the transport spaces of a model.

    ``passes``: per-call op passes on top of the registered ones, ``{torch.ops.ns.op.overload: handler}`` or
    ``otfx.passes.OpPass`` / ``Pattern`` items; they win over registered passes of the same op. Results are
    cached on the Traced, keyed by the registry's state and ``passes``, so registering a pass later is seen.
    An ``Inference`` is returned as it is (pass it to ``fuse``/``random_symmetry`` to use its passes there).
    """
    if isinstance(model, Inference):
        if passes is not None:
            raise TypeError("analyse(Inference, passes=...): the passes of an Inference are fixed; "
                            "pass its Traced (inference.traced) instead")
        return model
    traced = model if isinstance(model, Traced) else trace(model, args, kwargs)
    key = (REGISTRY.key(), passes_key(passes))
    cache: dict = traced.__dict__.setdefault("_inferences", {})
    if key not in cache:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = infer(traced, REGISTRY.with_passes(passes))
    return cache[key]
