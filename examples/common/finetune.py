"""Parents trained to a validation plateau (cached with their curve) and finetuning runs that give several models
the same batches, for the finetune comparison of examples/03_finetune.py."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from .data import Split, cache_root
from .runner import ViTSpec
from .train import Plateau, build_vit, cached_parent, finetune, parent_key, train_to_plateau

__all__ = ["plateau_parent", "finetune_grid"]


def _plateau_extra(split: Split, plateau: Plateau) -> dict[str, Any]:
    rows = split.indices.get("train")
    return {"recipe": "plateau", **asdict(plateau), "data": split.name, "n_train": len(split.y_train),
            "split_rows": int(rows.sum()) if rows is not None else None}


def plateau_parent(split: Split, spec: ViTSpec, seed: int, plateau: Plateau | None = None, *,
                   progress: bool | str = True) -> tuple[nn.Module, dict[str, Any]]:
    """A ViT parent (init and batch order from ``seed``) trained by :func:`~.train.train_to_plateau` once and
    cached; returns ``(model, history)``, the history (validation curve, best epoch, steps) from the cache."""
    plateau = plateau or Plateau()
    name = spec.name + "-plateau"
    extra = _plateau_extra(split, plateau)
    label = progress if isinstance(progress, str) else (f"train {name} seed {seed}" if progress else False)
    model = cached_parent(name, lambda: build_vit(spec.config(), seed),
                          lambda m: train_to_plateau(m, split, seed=seed, plateau=plateau, progress=label),
                          seed=seed, extra=extra)
    path = cache_root() / "parents" / parent_key(name, build_vit(spec.config(), seed), seed, extra)
    meta = json.loads((path / "meta.json").read_text())
    return model, {**meta["train_info"], "train_seconds": meta["train_seconds"]}


def finetune_grid(models: Mapping[str, nn.Module], split: Split, *, steps: int, lrs: Sequence[float],
                  seeds: Sequence[int], eval_at: Sequence[int], progress: bool = True) -> dict[str, Any]:
    """Finetune a copy of every model for ``steps`` steps.

    With ``seeds[0]`` every lr in ``lrs`` is run; each model keeps the lr whose final *validation* accuracy is
    best, and that lr is run again with each further seed. A seed fixes the batch order, so for one seed every
    model and lr sees the same batches. Validation and test accuracy are recorded at ``eval_at``.

    Returns ``{model: {"lr", "final_val_by_lr", "steps", "runs": {seed: {"val": [...], "test": [...]}}}}``.
    """
    out: dict[str, Any] = {}
    for name, model in models.items():
        by_lr = {}
        for lr in lrs:
            _, curve = finetune(copy.deepcopy(model), split, steps=steps, seed=seeds[0], lr=lr, eval_at=eval_at,
                                progress=f"{name} lr {lr:g} seed {seeds[0]}" if progress else False)
            by_lr[lr] = curve
        lr = max(lrs, key=lambda r: by_lr[r].acc["val"][-1])
        runs = {seeds[0]: by_lr[lr].acc}
        for seed in seeds[1:]:
            _, curve = finetune(copy.deepcopy(model), split, steps=steps, seed=seed, lr=lr, eval_at=eval_at,
                                progress=f"{name} lr {lr:g} seed {seed}" if progress else False)
            runs[seed] = curve.acc
        out[name] = {"lr": lr, "final_val_by_lr": {r: c.acc["val"][-1] for r, c in by_lr.items()},
                     "final_test_by_lr": {r: c.acc["test"][-1] for r, c in by_lr.items()},
                     "steps": by_lr[lr].steps, "runs": runs}
        if progress:
            finals = [r["test"][-1] for r in runs.values()]
            print(f"{name}: lr {lr:g}, test after {steps} steps "
                  + ", ".join(f"{100 * a:.2f}" for a in finals), flush=True)
    return out
