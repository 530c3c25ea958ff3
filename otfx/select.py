"""Choose fusion options without labels: fuse a few candidate configurations and keep the one whose predictions
on the calibration inputs agree best with the parents' mean prediction.

The score is the divergence between the weighted mean of the parents' outputs and the fused model's, on ``data``
(the inputs ``fuse`` already reads for activations and REPAIR): ``"kl"`` reads the main output as logits,
KL(mean of the parents' softmax || fused softmax) over the last axis; ``"mse"`` is the mean squared difference
from the parents' mean output, for outputs that are not logits (embeddings). Over 20 configurations its Spearman
correlation with the labelled validation metric was 0.91 on the BERT masked-LM pair (against loss) and -0.63 to
-0.96 on 8 ViT settings (against accuracy); what it picks beat the fixed default on validation by 1.0 points on
the ViT settings: docs/results/09_selection.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from otfx.align.activations import batches_like
from otfx.align.config import SELECT, FusionConfig, FusionError
from otfx.align.orthogonal import StreamFallbackWarning
from otfx.align.repair import shared_targets
from otfx.trace import Traced, eval_mode

SCORES = tuple(s for s in SELECT if s != "off")
#: the candidate values of each option the caller left to otfx (None): both costs, a sharp and a smooth Sinkhorn
#: plan (images choose 0.5, the BERT pair 0.1; no single reg serves both), rotated residual streams, and each
#: with and without the least-squares refit (it lifts a weak alignment to near the parents but can cost a good one
#: a little: docs/results/08_defaults); refit varies fastest, so its twin's fusion is reused
CANDIDATES: dict[str, tuple] = {"cost": ("weights", "activations"), "reg": (0.1, 0.5), "residual": ("orthogonal",),
                                "refit": (False, True)}
#: the exact solver offered beside Sinkhorn when the caller fixed neither solver nor reg
EMD = "emd"
#: parents' outputs kept between candidates up to this many bytes; beyond it they are recomputed per candidate
TARGET_CACHE_BYTES = 1 << 28


def candidate_grid(given: FusionConfig) -> dict[str, tuple]:
    """The axes to choose over: each of ``CANDIDATES`` that ``given`` leaves None (a solver without ``reg``, such
    as EMD, has no reg axis), and EMD beside the default solver when neither solver nor reg was given. Empty
    when the caller fixed them all."""
    from otfx.sweep import uses_reg

    grid = {axis: values for axis, values in CANDIDATES.items() if getattr(given, axis) is None}
    if not uses_reg(given.solver):
        grid.pop("reg", None)
    elif "reg" in grid and given.solver == FusionConfig().solver:
        # the default solver and no reg: hard maps are a candidate too (on the BERT pair, activations + EMD +
        # refit closes 72% of the vanilla-to-parents gap, the best Sinkhorn candidate 52%: 08_defaults)
        grid = {"solver": (given.solver, EMD), **grid}
    return grid


def should_select(given: FusionConfig, has_data: bool) -> bool:
    """Whether ``fuse`` chooses among candidates: with data, unless ``select="off"``, when some axis is open (a
    grid of one combination is fused once, as given)."""
    if given.select == "off" or not has_data:
        return False
    grid = candidate_grid(given)
    return any(len(values) > 1 for values in grid.values())


class Agreement:
    """``score(model)``: how far ``model``'s outputs on ``data`` are from the weighted mean of the parents'
    (lower is better). The parents' mean is computed once and kept when it is small enough."""

    def __init__(self, parents: Sequence[Traced], data, weights: Sequence[float], kind: str = "kl"):
        if kind not in SCORES:
            raise FusionError(f"select={kind!r} is not one of {', '.join(SCORES)} or 'off'")
        self.parents, self.weights, self.kind = list(parents), list(weights), kind
        self.anchor = self.parents[0]
        self.batches = _batches(self.anchor, data)
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def _outputs(self, model: nn.Module, inputs: tuple, real: int) -> torch.Tensor:
        out = self.anchor.main_output(model(*inputs, **self.anchor.kwargs))[:real]
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise FusionError(f"{self.anchor.name}: label-free selection reads the main output as floats, got "
                              f"{type(out).__name__}; pass select='off' or choose cost and reg yourself")
        out = out.double()
        return torch.log_softmax(out, dim=-1) if self.kind == "kl" else out

    def _target(self, index: int) -> torch.Tensor:
        """The parents' mean for batch ``index``: probabilities (kl) or outputs (mse)."""
        if index in self._cache:
            return self._cache[index]
        inputs, real = self.batches[index]
        total = None
        for parent, w in zip(self.parents, self.weights):
            with eval_mode(parent.model) as model:
                value = self._outputs(model, inputs, real)
            value = value.exp() if self.kind == "kl" else value
            total = value.mul_(w) if total is None else total.add_(value, alpha=w)
        size = total.numel() * total.element_size()
        if self._cached_bytes + size <= TARGET_CACHE_BYTES:
            self._cache[index] = total
            self._cached_bytes += size
        return total

    def __call__(self, model: nn.Module) -> float:
        total, rows = 0.0, 0
        with torch.no_grad(), eval_mode(model) as m:
            for index, (inputs, real) in enumerate(self.batches):
                target = self._target(index)
                out = self._outputs(m, inputs, real)
                if out.shape != target.shape:
                    raise FusionError(f"label-free selection: the fused model outputs {tuple(out.shape)}, the "
                                      f"parents {tuple(target.shape)}; pass select='off'")
                if self.kind == "kl":
                    terms = torch.xlogy(target, target) - target * out  # p log p - p log q, 0 log 0 = 0
                    total += float(terms.sum())
                    rows += target.numel() // max(target.shape[-1], 1)
                else:
                    total += float((out - target).pow(2).sum())
                    rows += target.numel()
        return total / max(rows, 1)


def _batches(traced: Traced, data) -> list[tuple[tuple, int]]:
    """(inputs, real rows) per batch: the caller's batches as given (the modules run eagerly, any batch size), or
    re-cut to the traced batch when tensors in the traced kwargs fix it (an attention mask)."""
    recut = batches_like(traced, data)  # also names a batch of the wrong shape
    if any(isinstance(v, torch.Tensor) for v in pytree.tree_flatten(traced.kwargs)[0]):
        return recut
    chunks = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
    return [(inputs, inputs[0].shape[0]) for inputs in chunks]


def select_and_fuse(traced: Sequence[Traced], data, given: FusionConfig, fuse: Callable[..., nn.Module],
                    progress: Callable[[list], Iterable] | None = None):
    """Fuse each candidate of ``candidate_grid(given)`` and return the sweep over them, scored by agreement with
    the parents (its ``best_model`` is the fused model); ``progress`` wraps the candidates, as in ``sweep``."""
    from otfx.sweep import sweep

    n = len(traced)
    score = Agreement(traced, data, given.model_weights(n), given.select or "kl")
    fixed = {k: v for k, v in vars(given).items() if v is not None and k != "select"}

    last: dict[str, tuple] = {}  # the last fusion without refit, for its refitted twin
    targets: dict = {}  # the refit's aligned parents, shared by the candidates with the same cost and stream maps

    def fixed_fuse(*models, **options) -> nn.Module:
        key = repr(sorted((k, v) for k, v in options.items() if k not in ("refit", "data")))
        if options.get("refit") and last.get("unrefitted", (None,))[0] == key:
            return _refitted(last["unrefitted"][1], models, options, targets)
        with warnings.catch_warnings():  # the rotated streams are otfx's candidate, not the caller's request
            warnings.simplefilter("ignore", StreamFallbackWarning)
            model = fuse(*models, select="off", **options)
        if options.get("refit") is False:
            last["unrefitted"] = (key, model)
        return model

    with shared_targets():  # every candidate is repaired towards the same parents' statistics: computed once
        return sweep(*traced, data=data, evaluate=score, metric="kl" if score.kind == "kl" else "mse",
                     higher_is_better=False, grid=candidate_grid(given), fuse=fixed_fuse, baselines=False,
                     progress=progress, **fixed)


def _refitted(model: nn.Module, models: Sequence[Traced], options: dict, targets: dict) -> nn.Module:
    """``model`` (fused with ``refit=False``) refitted as ``fuse(..., refit=True)`` would have refitted it."""
    import time

    from otfx.fuse import refit_fused

    t0 = time.perf_counter()
    data = options["data"]
    config = FusionConfig.make(**{k: v for k, v in options.items() if k != "data"}).resolved(True, len(models))
    result = refit_fused(model, list(models), config, data, getattr(model, "otfx_aligned", None), targets)
    report = getattr(model, "otfx_report", {})
    result.otfx_report = {**report, "config": vars(config),
                          "timings": {**report.get("timings", {}), "refit": time.perf_counter() - t0}}
    return result


__all__ = ["CANDIDATES", "SCORES", "Agreement", "candidate_grid", "select_and_fuse", "should_select"]
