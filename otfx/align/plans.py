"""Plan algebra: transport plans as (n_other x n_anchor) matrices, applied to parameter axes.

Rows a layer produces (``side="out"``) become weighted averages of the other model's rows; inputs it consumes
(``side="in"``) are summed, so merged neurons keep their total contribution. Both use the plan's true marginals.
"""

from __future__ import annotations

import torch


def apply_map(tensor: torch.Tensor, axis: int, plan: torch.Tensor, side: str) -> torch.Tensor:
    """Move ``tensor``'s ``axis`` from the other model's space to the anchor's with ``plan``.

    Rows that a layer produces (``side="out"``) become weighted averages of the other model's rows; inputs
    that a layer consumes (``side="in"``) are summed, so merged neurons keep their total contribution.
    Both use the plan's true marginals. A permutation plan (EMD, LSA) is applied as an index (the same values
    as the dense product, without the matmul); the dense product runs in ``tensor``'s dtype.
    """
    index = permutation_index(plan)
    if index is not None:
        return tensor.index_select(axis, index)
    return dense_apply(tensor, axis, plan_weights(plan, side).to(tensor.dtype))


def plan_weights(plan: torch.Tensor, side: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (n_other x n_anchor) weights that ``apply_map`` contracts an axis with: the plan over its column
    sums (``side="out"``) or its row sums (``side="in"``), computed in ``dtype``."""
    sums = plan.sum(0, keepdim=True) if side == "out" else plan.sum(1, keepdim=True)
    if dtype == plan.dtype:
        return plan / sums.clamp_min(1e-300)
    return plan.to(dtype).div_(sums.to(dtype).clamp_min(torch.finfo(dtype).tiny))


def dense_apply(tensor: torch.Tensor, axis: int, weights: torch.Tensor) -> torch.Tensor:
    """(n_other x n_anchor) ``weights`` contracted with ``tensor``'s ``axis``; no transposed copies for the
    last axis."""
    if tensor.ndim > 1 and axis == tensor.ndim - 1:
        return tensor @ weights
    moved = tensor.movedim(axis, 0)
    shape = moved.shape
    out = weights.T @ moved.reshape(shape[0], -1)
    return out.reshape((weights.shape[1], *shape[1:])).movedim(0, axis)


def permutation_index(plan: torch.Tensor) -> torch.Tensor | None:
    """For a plan that is a (scaled) permutation matrix, the other model's row feeding each anchor column;
    None for any other plan. ``apply_map`` with such a plan is exactly ``index_select`` with this index."""
    n_b, n_a = plan.shape if plan.ndim == 2 else (0, -1)
    if n_b != n_a or int(torch.count_nonzero(plan[:, 0])) != 1 or int(torch.count_nonzero(plan)) != n_a:
        return None
    cols = plan.max(1).indices  # row-wise: contiguous, unlike a column-wise argmax
    if not bool((plan.gather(1, cols[:, None]) > 0).all()):  # a row without mass
        return None
    if bool((torch.bincount(cols, minlength=n_a) != 1).any()):  # two rows into one column
        return None
    index = torch.empty_like(cols)
    index[cols] = torch.arange(n_a)
    return index


class Mover:
    """A plan prepared for repeated use on one side in one dtype: an index (a permutation; nothing at all for
    the identity) or dense (n_other x n_anchor) weights."""

    __slots__ = ("identity", "index", "weights")

    def __init__(self, plan: torch.Tensor, side: str, dtype: torch.dtype, index: torch.Tensor | None,
                 linear: bool = False):
        """``index``: ``permutation_index(plan)``, found once for both sides. ``linear``: ``plan`` is an
        orthogonal map, applied as it is on both sides (no marginals)."""
        self.index = index
        self.identity = self.index is not None and bool((self.index == torch.arange(len(self.index))).all())
        if self.index is not None:
            self.weights = None
        else:
            self.weights = plan.to(dtype) if linear else plan_weights(plan, side, dtype)

    def __call__(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        if self.identity:
            return tensor
        if self.index is not None:
            return tensor.index_select(axis, self.index)
        return dense_apply(tensor, axis, self.weights.to(tensor.dtype))


def identity_plan(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) / n


def factor_marginal(plan: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """The (b_i x a_i) marginal of a plan reshaped to (b_1..b_k, a_1..a_k)."""
    others = [d for d in range(2 * k) if d not in (i, k + i)]
    return plan.sum(dim=others) if others else plan
