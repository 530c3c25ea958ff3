"""Random symmetries: permute every free transport space of a model; its function must not change."""

from __future__ import annotations

import copy

import torch
from torch import nn

from otfx.conventions import tensor_identity
from otfx.infer.result import Inference


def space_permutations(inference: Inference, seed: int = 0) -> dict[int, torch.Tensor]:
    """A random permutation for every free coarse space (structured spaces get the induced permutation)."""
    g = torch.Generator().manual_seed(seed)
    coarse = inference.spaces.coarse
    cache: dict[int, torch.Tensor] = {}

    def perm(sid: int) -> torch.Tensor:
        root = coarse.find(sid)
        if root in cache:
            return cache[root]
        size = coarse.size[root]
        structure = coarse.structure.get(root)
        if coarse.is_fixed(root):
            result = torch.arange(size)
        elif structure is None:
            result = torch.randperm(size, generator=g)
            while size > 1 and bool((result == torch.arange(size)).all()):
                result = torch.randperm(size, generator=g)
        elif structure[0] == "sum":
            parts, offset = [], 0
            for child in structure[1]:
                parts.append(perm(child) + offset)
                offset += coarse.size[coarse.find(child)]
            result = torch.cat(parts)
        else:
            result = torch.zeros(1, dtype=torch.long)
            for child in structure[1]:
                p = perm(child)
                result = (result[:, None] * len(p) + p[None, :]).reshape(-1)
        cache[root] = result
        return result

    for axes in inference.param_axes.values():
        for sid in axes:
            perm(sid)
    return cache


def permute_model(inference: Inference, perms: dict[int, torch.Tensor],
                  only: set[str] | None = None) -> nn.Module:
    """A deep copy of the model with ``perms`` (coarse space -> index permutation) applied to its parameters.

    ``only`` restricts the change to some parameters (a negative control that must change the function).
    """
    model = copy.deepcopy(inference.traced.model)
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[tuple] = set()
    with torch.no_grad():
        for fqn, axes in inference.param_axes.items():
            if fqn not in params or (only is not None and fqn not in only):
                continue
            p = params[fqn]
            if tensor_identity(p) in done:
                continue
            done.add(tensor_identity(p))
            value = p.detach().clone()
            for axis, sid in enumerate(axes):
                index = perms.get(inference.coarse(sid))
                if index is not None:
                    value = value.index_select(axis, index)
            p.copy_(value)
    return model


def random_symmetry(traced, seed: int = 0) -> nn.Module:
    """A deep copy of the model with a random permutation applied to every free space.

    Residual stream, MLP hidden units, heads and within-head dims move together as the inferred spaces
    require, so the copy computes the same function: a self-test for a new architecture.
    """
    from otfx.api import analyse

    inference = analyse(traced)
    return permute_model(inference, space_permutations(inference, seed))


def noisy_copy(traced, seed: int = 3, noise: float = 0.5) -> nn.Module:
    """A random symmetry of the model plus Gaussian noise of ``noise`` x each tensor's std: a stand-in for a
    second training run of one initialisation (benchmarks and tests of solvers on structured costs)."""
    model = random_symmetry(traced, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return model
