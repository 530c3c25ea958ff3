"""Anchor-free fusion: Git Re-Basin's MergeMany over ``otfx.align`` and averaging.

Every model is aligned (hard, function-preserving maps) to the average of all the others, already aligned,
in turn, until no model's maps change; the result is the weighted average of the aligned models. No model is
the anchor whose basis the others must fit: the fixed point is a barycentre of all of them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from otfx.align.config import FusionError
from otfx.align.config import normalised_weights as _weights
from otfx.align.execute import as_module
from otfx.infer.result import Inference
from otfx.trace import Traced


def _example(models, args, kwargs) -> tuple[tuple, dict | None]:
    for m in models:
        t = m.traced if isinstance(m, Inference) else m if isinstance(m, Traced) else None
        if t is not None and args is None:
            return t.args, t.kwargs
    if args is None:
        raise FusionError("anchor-free fusion needs args=(example inputs,) when no model is an otfx.trace result")
    return args, kwargs


def average(modules: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """A copy of ``modules[0]`` whose parameters are the ``weights``-average of the modules' (same shapes)."""
    out = copy.deepcopy(modules[0])
    states = [dict(m.named_parameters(remove_duplicate=False)) for m in modules]
    with torch.no_grad():
        for fqn, p in out.named_parameters(remove_duplicate=False):
            p.copy_(sum(w * s[fqn].detach().double() for w, s in zip(weights, states)).to(p.dtype))
    return out


def fingerprint(model: nn.Module) -> tuple[float, float]:
    """A number that depends on a model's parameters only, not on where it comes in a list: the sums of their
    squares and of their values (float64)."""
    with torch.no_grad():
        params = [p.detach().double() for p in model.parameters()]
        return float(sum(p.square().sum() for p in params)), float(sum(p.sum() for p in params))


def _same(a: nn.Module, b: nn.Module) -> bool:
    pb = dict(b.named_parameters(remove_duplicate=False))
    return all(torch.equal(p, pb[fqn]) for fqn, p in a.named_parameters(remove_duplicate=False))


def barycentre_align(*models, args: tuple | None = None, kwargs: dict | None = None, weights=None,
                     max_iter: int = 20, data=None, **align_options) -> list[nn.Module]:
    """The models rewritten into one common basis by MergeMany: each in turn (in a canonical order that does
    not depend on the order they are given in) is aligned to the weighted average of the others (already
    aligned), until a full sweep changes no model (at most ``max_iter`` sweeps). ``align_options`` go to
    ``otfx.align`` (its defaults: EMD, function-preserving). Returns new modules, one per model in the order
    given, each computing its model's function; the inputs are not modified."""
    from otfx.fuse import align

    if len(models) < 2:
        raise FusionError(f"anchor-free fusion needs at least two models, got {len(models)}")
    args, kwargs = _example(models, args, kwargs)
    w = _weights(weights, len(models))
    if data is not None:
        align_options["data"] = list(data)
    current = [copy.deepcopy(as_module(m)) for m in models]
    # a canonical order (by the parameters' fingerprint, not by position), so that the result does not depend on
    # the order in which the models are given
    order = sorted(range(len(models)), key=lambda i: fingerprint(current[i]))
    if max_iter < 1:
        raise FusionError(f"max_iter must be >= 1, got {max_iter}")
    sweeps, changed = 0, True
    while changed and sweeps < max_iter:
        sweeps += 1
        changed = False
        for i in order:
            model = models[i]
            others = [j for j in range(len(models)) if j != i]
            total = sum(w[j] for j in others)
            if total <= 0:
                continue
            target = average([current[j] for j in others], [w[j] / total for j in others])
            new = align(as_module(model), to=target, args=args, kwargs=kwargs, **align_options)
            if not _same(new, current[i]):
                changed = True
            current[i] = new
    for m in current:
        m.otfx_report = {"anchor_free": {"sweeps": sweeps, "converged": not changed}}
    return current


def anchor_free_fuse(*models, args: tuple | None = None, kwargs: dict | None = None, weights=None,
                     max_iter: int = 20, data=None, **align_options) -> nn.Module:
    """Fusion without an anchor: ``barycentre_align`` then the weighted average of the aligned models.
    ``result.otfx_aligned`` holds the aligned models (the parents in the result's spaces, e.g. for
    ``otfx.align.repair.repair(..., aligned=...)``)."""
    aligned = barycentre_align(*models, args=args, kwargs=kwargs, weights=weights, max_iter=max_iter, data=data,
                               **align_options)
    fused = average(aligned, _weights(weights, len(models)))
    fused.otfx_report = {"anchor_free": aligned[0].otfx_report["anchor_free"]}
    fused.otfx_aligned = aligned
    return fused
