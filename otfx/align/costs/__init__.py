"""Cost providers: how the neurons of a class are compared across models. One module per provider, registered
by name (``FusionConfig.cost``); the map-graph evaluator only calls the provider's methods.

A provider gives, for a class ``root``, the features of each neuron in both models (``features``: anchor rows,
other rows, names of what was read) and the (n_other x n_anchor) cost between them (``cost``).
``reads_rows``: its features are producers' weight rows, whose input side must be aligned first (the map
graph then has a ``rows`` edge from every class on that input side). ``wanted`` names the activation nodes it
needs collected (empty for a weights-only provider).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps


class CostProvider(Protocol):
    reads_rows: bool

    def wanted(self, maps: TransportMaps, roots: list[int]) -> list[tuple[str, tuple[int, ...]]]: ...

    def features(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]: ...

    def cost(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, list[str]]: ...


COSTS: dict[str, type] = {}


def register_cost(name: str):
    """Class decorator: make a provider available as ``cost=name``."""

    def deco(cls: type) -> type:
        if name in COSTS and COSTS[name] is not cls:
            raise ValueError(f"a cost provider named {name!r} is already registered ({COSTS[name].__name__})")
        COSTS[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    """Import every module of this package: the built-in providers register themselves."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def cost_provider(name: str) -> CostProvider:
    _load_builtin()
    return COSTS[name]()


def cost_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(COSTS)
