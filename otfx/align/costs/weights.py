"""Weights-based cost (the paper's): a neuron is the rows of the parameters that produce it, with their input
side already aligned; each producer's rows are scaled to unit norm (rows of one value, a per-channel scale or
a per-head sink, all by one factor to unit mean square: each row's own norm would leave only its sign), and the
cost is the Euclidean distance between the concatenated rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otfx.align.costs import register_cost

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps


@register_cost("weights")
class WeightsCost:
    needs_data = False
    reads_rows = True

    def wanted(self, maps: TransportMaps, roots: list[int]) -> list[tuple[str, tuple[int, ...]]]:
        return []

    def blocks(self, maps: TransportMaps, root: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
        """The rows of each producer the map graph kept for a class (anchor, other with its input side
        aligned), unscaled."""
        blocks, used = [], []
        n_a, n_b = maps.width(root)
        for p in maps.graph.nodes[root]["producers"]:
            wb = maps.rewriter.partial(p.fqn, p.axis)
            wa = maps.params_anchor[p.fqn].to(wb.dtype)
            rows_a = wa.movedim(p.axis, 0).narrow(0, p.offset_anchor, n_a).reshape(n_a, -1)
            rows_b = wb.movedim(p.axis, 0).narrow(0, p.offset_other, n_b).reshape(n_b, -1)
            blocks.append((rows_a, rows_b))
            used.append(p.fqn)
        return blocks, used

    def features(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        blocks, used = self.blocks(maps, root)
        with maps.timed("rows"):
            return (torch.cat([unit_rows(a) for a, _ in blocks], 1), torch.cat([unit_rows(b) for _, b in blocks], 1),
                    used)

    def cost(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, list[str]]:
        """The cost of ``features``, one producer at a time, without concatenating the rows: the producers'
        unit rows (n x features, small next to the n x n cost) accumulate one gram matrix in place, so the
        cost takes five passes over an n x n matrix whatever the number of producers (a bias is a rank-1
        update)."""
        blocks, used = self.blocks(maps, root)
        with maps.timed("cost"):
            gram, sq_a, sq_b = None, 0.0, 0.0
            for rows_a, rows_b in blocks:
                dtype = torch.promote_types(rows_a.dtype, rows_b.dtype)
                unit_a, unit_b = unit_rows(rows_a.to(dtype)), unit_rows(rows_b.to(dtype))
                gram = unit_b @ unit_a.T if gram is None else gram.addmm_(unit_b, unit_a.T)
                sq_a, sq_b = sq_a + unit_a.square().sum(1), sq_b + unit_b.square().sum(1)
            d2 = gram.mul_(-2).add_(sq_b[:, None]).add_(sq_a[None])
            return d2.clamp_min_(0).sqrt_(), used


def sq_dists(rows_b: torch.Tensor, rows_a: torch.Tensor, unit: bool) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``rows_b`` and ``rows_a`` (n_b x n_a) by one matmul, as
    ``torch.cdist`` computes them for many rows; ``unit``: of the rows scaled as ``unit_rows`` scales them.
    The rows may be strided views (transposed activations): nothing is copied but the result."""
    dtype = torch.promote_types(rows_a.dtype, rows_b.dtype)
    rows_a, rows_b = rows_a.to(dtype), rows_b.to(dtype)
    norm_a, norm_b = rows_a.norm(dim=1), rows_b.norm(dim=1)
    gram = rows_b @ rows_a.T
    if unit:
        scale_a, scale_b = unit_scale(rows_a, norm_a), unit_scale(rows_b, norm_b)
        gram.mul_(scale_b[:, None]).mul_(scale_a[None])
        norm_a, norm_b = norm_a * scale_a, norm_b * scale_b
    return gram.mul_(-2).add_(norm_b.square()[:, None]).add_(norm_a.square()[None])


def unit_scale(x: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """The factor of each row of ``x`` that ``unit_rows`` applies: one over its norm, or for rows of one value
    one common factor that gives them unit mean square (scaled one by one they would all be +-1, and neurons of
    the same sign would look the same)."""
    norms = x.norm(dim=1) if norms is None else norms
    if x.shape[1] == 1:
        return (norms.square().mean().sqrt() + 1e-9).reciprocal().expand_as(norms)
    return 1 / (norms + 1e-9)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x * unit_scale(x)[:, None]


def distances(rows_b: torch.Tensor, rows_a: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows, without copying the features."""
    return sq_dists(rows_b, rows_a, unit=False).clamp_min_(0).sqrt_()
