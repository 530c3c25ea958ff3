"""Seeded, reusable training of the parent models: small HF ViTs on images, a tiny BERT masked LM on text.

Builders take a ``seed`` that fixes the initialisation; the training loops take a ``seed`` that fixes the
batch order (and masks), so two parents that differ only in their seeds differ in both, as in the paper.
:func:`cached_parent` trains a parent once and reloads it from ``save_pretrained`` safetensors afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from otfx.io import quiet_hf_progress

from .data import Split, cache_root

__all__ = [
    "IMAGE_GEOMETRY", "Curve", "vit_config", "build_vit", "bert_mlm_config", "build_bert_mlm",
    "warmup_cosine", "train_classifier", "Plateau", "train_to_plateau", "finetune", "evaluate_accuracy", "mlm_loss",
    "train_mlm", "evaluate_mlm_loss", "parent_key", "cached_parent",
]

# data set -> (image size, patch size, channels)
IMAGE_GEOMETRY: dict[str, tuple[int, int, int]] = {
    "digits": (8, 2, 1),
    "fashion-mnist": (28, 7, 1),
}
_ALIASES = {"fashion": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}


# ----------------------------------------------------------------------------------------------- models


def vit_config(dataset: str = "digits", *, hidden: int = 64, mlp: int = 128, layers: int = 4, heads: int = 4,
               num_labels: int = 10, **overrides: Any):
    """``ViTConfig`` of the small parents: digits (8x8, patch 2) or Fashion-MNIST (28x28, patch 7).

    No dropout; 1 channel; 10 labels; ``overrides`` go to ``ViTConfig``.

    The heterogeneous experiment: defaults for the anchor, ``hidden=128, mlp=256`` for the partner.
    """
    from transformers import ViTConfig

    image, patch, channels = IMAGE_GEOMETRY[_ALIASES.get(dataset, dataset)]
    kw: dict[str, Any] = dict(image_size=image, patch_size=patch, num_channels=channels, hidden_size=hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                              num_labels=num_labels, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return ViTConfig(**kw)


def build_vit(config, seed: int) -> nn.Module:
    """A freshly initialised ``ViTForImageClassification`` (initialisation fixed by ``seed``)."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def bert_mlm_config(vocab_size: int, *, hidden: int = 128, layers: int = 2, heads: int = 4, mlp: int = 512,
                    max_positions: int = 128, dropout: float = 0.0, **overrides: Any):
    """``BertConfig`` of the tiny masked-LM parents (no dropout by default; pad id 0 as in our tokenizer)."""
    from transformers import BertConfig

    kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=mlp,
                              max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
                              attention_probs_dropout_prob=dropout, pad_token_id=0)
    kw.update(overrides)
    return BertConfig(**kw)


def build_bert_mlm(config, seed: int) -> nn.Module:
    """A freshly initialised ``BertForMaskedLM`` (initialisation fixed by ``seed``)."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(config)


# ----------------------------------------------------------------------------------------------- classifiers


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  final_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay to ``final_fraction`` of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _adamw(model: nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and 1-d parameters (position / cls embeddings decay)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` (an HF image classifier or a plain module returning logits)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((_logits(model, x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def _batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batch indices; each epoch is a fresh permutation, the last partial batch kept."""
    while True:
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(batch)


@dataclass
class Curve:
    """Accuracy at the checkpoints of a fine-tuning run (step 0 is before any update)."""

    steps: list[int] = field(default_factory=list)
    acc: dict[str, list[float]] = field(default_factory=dict)


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched, loss: torch.Tensor, clip: float | None,
          log: list[float] | None) -> None:
    """One optimiser step with optional gradient-norm clipping and loss logging."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    if log is not None:
        log.append(loss.detach().item())


def _fit(model: nn.Module, split: Split, *, steps: int, lr: float, wd: float, batch: int, seed: int,
         warmup: float, clip: float | None, eval_at: Sequence[int], eval_parts: Sequence[str],
         progress: bool | str, log: list[float] | None) -> Curve:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # for any dropout in the model
    opt = _adamw(model, lr, wd)
    sched = warmup_cosine(opt, steps, max(1, round(warmup * steps)))
    curve = Curve(acc={p: [] for p in eval_parts})
    checkpoints = set(eval_at)

    def checkpoint(step: int) -> None:
        if step in checkpoints:
            curve.steps.append(step)
            for p in eval_parts:
                curve.acc[p].append(evaluate_accuracy(model, *split.part(p)))

    checkpoint(0)
    model.train()
    bar = tqdm(total=steps, disable=not progress, desc=progress if isinstance(progress, str) else "train",
               leave=False, mininterval=2.0)
    idx = _batches(len(split.y_train), batch, gen)
    for step in range(1, steps + 1):
        b = next(idx)
        loss = F.cross_entropy(_logits(model, split.x_train[b]), split.y_train[b])
        _step(model, opt, sched, loss, clip, log)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.detach().item():.3f}", refresh=False)
        bar.update()
        if step in checkpoints:
            checkpoint(step)
            model.train()
    bar.close()
    model.eval()
    return curve


def train_classifier(model: nn.Module, split: Split, *, epochs: float, seed: int, lr: float = 2e-3,
                     wd: float = 0.05, batch: int = 128, warmup: float = 0.2, clip: float | None = 1.0,
                     progress: bool | str = True, log: list[float] | None = None) -> nn.Module:
    """Train on ``split``'s training set with AdamW and warm-up + cosine (``warmup``: fraction of steps).

    Defaults chosen on digits' validation set: lr 2e-3 with 5% warm-up and no clipping diverges part-way
    (val 88-90%); 20% warm-up and gradient-norm clipping at 1.0 give 96-97%.

    ``seed`` fixes the batch order. Returns ``model`` (trained in place, left in eval mode); per-step losses
    are appended to ``log`` if given. ``progress`` may be a string used as the progress bar's label.
    """
    steps = max(1, round(epochs * math.ceil(len(split.y_train) / batch)))
    _fit(model, split, steps=steps, lr=lr, wd=wd, batch=batch, seed=seed, warmup=warmup, clip=clip,
         eval_at=(), eval_parts=(), progress=progress, log=log)
    return model


@dataclass(frozen=True)
class Plateau:
    """When :func:`train_to_plateau` lowers the learning rate and when it stops (every field goes into a cache key).

    After a linear warm-up of ``warmup_epochs``, the learning rate stays at ``lr`` until the validation accuracy
    has not beaten its best by ``min_delta`` for ``patience`` epochs; it is then multiplied by ``factor``
    (reduce on plateau). The next plateau after ``reductions`` such cuts, or ``max_epochs``, ends training.
    """

    lr: float = 2e-3
    wd: float = 0.05
    batch: int = 128
    warmup_epochs: float = 1.0
    patience: int = 2
    min_delta: float = 0.001
    factor: float = 0.3
    reductions: int = 3
    max_epochs: int = 40
    clip: float | None = 1.0


def train_to_plateau(model: nn.Module, split: Split, *, seed: int, plateau: Plateau | None = None,
                     progress: bool | str = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train until the validation accuracy stops improving (see :class:`Plateau`); keep the best-on-validation
    weights. ``seed`` fixes the batch order.

    Returns ``(model, history)``: per epoch the validation accuracy, mean training loss and learning rate, the
    best epoch and the optimiser steps up to it (``best_steps``: the parent's training length) and in all.
    """
    import copy

    p = plateau or Plateau()
    per_epoch = math.ceil(len(split.y_train) / p.batch)
    warmup = max(1, round(p.warmup_epochs * per_epoch))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = _adamw(model, p.lr, p.wd)
    idx = _batches(len(split.y_train), p.batch, gen)
    history: dict[str, Any] = {"epoch": [], "val": [], "train_loss": [], "lr": [], "cuts": []}
    best, best_state, best_epoch, stale, cuts, scale, step = -1.0, None, 0, 0, 0, 1.0, 0
    bar = tqdm(total=p.max_epochs * per_epoch, disable=not progress,
               desc=progress if isinstance(progress, str) else "train", leave=False, mininterval=2.0)
    for epoch in range(1, p.max_epochs + 1):
        model.train()
        losses = []
        for _ in range(per_epoch):
            step += 1
            lr = p.lr * scale * min(1.0, step / warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            b = next(idx)
            loss = F.cross_entropy(_logits(model, split.x_train[b]), split.y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), p.clip)
            opt.step()
            losses.append(loss.detach().item())
            bar.update()
        val = evaluate_accuracy(model, split.x_val, split.y_val)
        for key, value in (("epoch", epoch), ("val", val), ("train_loss", sum(losses) / len(losses)), ("lr", lr)):
            history[key].append(value)
        bar.set_postfix(val=f"{100 * val:.2f}", lr=f"{lr:.1e}", refresh=False)
        if val > best + p.min_delta:
            best, best_epoch, stale = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if stale >= p.patience:
            if cuts == p.reductions:
                break
            cuts, scale, stale = cuts + 1, scale * p.factor, 0
            history["cuts"].append(epoch)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history.update(best_epoch=best_epoch, best_val=best, best_steps=best_epoch * per_epoch, total_steps=step,
                   steps_per_epoch=per_epoch, stopped="plateau" if len(history["epoch"]) < p.max_epochs or
                   stale >= p.patience else "max_epochs")
    model.eval()
    return model, history


def finetune(model: nn.Module, split: Split, *, steps: int, seed: int, lr: float = 1e-3, wd: float = 0.05,
             batch: int = 128, warmup: float = 0.1, clip: float | None = 1.0, eval_at: Sequence[int] = (),
             eval_parts: Sequence[str] = ("val", "test"), progress: bool | str = True,
             log: list[float] | None = None) -> tuple[nn.Module, Curve]:
    """The training loop of :func:`train_classifier` for ``steps`` steps; accuracy on ``eval_parts`` at each
    step in ``eval_at`` (0 = before training). Choose hyper-parameters on ``"val"``, report ``"test"``."""
    curve = _fit(model, split, steps=steps, lr=lr, wd=wd, batch=batch, seed=seed, warmup=warmup, clip=clip,
                 eval_at=eval_at, eval_parts=eval_parts, progress=progress, log=log)
    return model, curve


# ----------------------------------------------------------------------------------------------- masked LM


def mlm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean masked-LM cross-entropy of a stock ``BertForMaskedLM``, and the number of masked tokens.

    The vocabulary projection runs only at the masked positions (``labels != -100``): the same loss as
    ``model(**batch).loss``, several times cheaper.
    """
    labels = batch["labels"]
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]
    sel = labels != -100
    n = int(sel.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return F.cross_entropy(model.cls(hidden[sel]), labels[sel]), n


def train_mlm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, steps: int, seed: int,
              lr: float = 1e-3, wd: float = 0.01, warmup: float = 0.05, clip: float | None = 1.0,
              progress: bool | str = True, log: list[float] | None = None) -> nn.Module:
    """Train a ``BertForMaskedLM`` for ``steps`` batches from ``batches`` (e.g. :func:`~.data.mlm_batches`,
    whose own seed fixes order and masks) with AdamW, warm-up + cosine. ``seed`` seeds any dropout."""
    torch.manual_seed(seed)
    opt = _adamw(model, lr, wd)
    sched = warmup_cosine(opt, steps, max(1, round(warmup * steps)))
    model.train()
    it = iter(batches)
    bar = tqdm(total=steps, disable=not progress, desc=progress if isinstance(progress, str) else "mlm",
               leave=False, mininterval=2.0)
    for step in range(1, steps + 1):
        try:
            batch = next(it)
        except StopIteration as e:
            raise ValueError(f"batches ran out after {step - 1} of {steps} steps: too few batches") from e
        loss, _ = mlm_loss(model, batch)
        _step(model, opt, sched, loss, clip, log)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.detach().item():.3f}", refresh=False)
        bar.update()
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def evaluate_mlm_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Masked-token-weighted mean MLM loss over a finite iterable of batches (use fixed masks to compare)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = mlm_loss(model, batch)
        total += float(loss) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("no masked tokens in the evaluation batches")
    return total / count


# ----------------------------------------------------------------------------------------------- caching



def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("cached_parent needs a Hugging Face PreTrainedModel (.config, save_pretrained)")
    d = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        d.pop(k, None)
    return d


def parent_key(name: str, model: nn.Module, seed: int | None = None,
               extra: Mapping[str, Any] | None = None) -> str:
    """Cache folder name of a parent: its name and a hash of class, config, seed and ``extra``."""
    payload = json.dumps({"name": name, "class": type(model).__name__, "config": _config_dict(model),
                          "seed": seed, "extra": extra or {}}, sort_keys=True, default=str)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    return f"{safe}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def cached_parent(name: str, build_fn: Callable[[], nn.Module],
                  train_fn: Callable[[nn.Module], nn.Module | None], cache_dir: str | Path | None = None, *,
                  seed: int | None = None,
                  extra: Mapping[str, Any] | None = None) -> nn.Module:
    """Build, train once and cache a parent (``save_pretrained``, safetensors); reload it on later calls.

    The cache key is ``name`` plus a hash of the model class, its config, ``seed`` and ``extra``: put every
    training hyper-parameter that is not in ``name`` (epochs, lr, data, tokenizer hash...) in ``extra``.
    ``build_fn()`` must return the untrained model (it is called on cache hits too, to know the config);
    ``train_fn(model)`` trains it in place or returns the trained model, or ``(model, info)`` with a JSON-able
    ``info`` kept in ``meta.json`` as ``"train_info"``. Default folder:
    ``cache_root() / "parents"``. Returns the model in eval mode.
    """
    model = build_fn()
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "parents"
    path = root / parent_key(name, model, seed, extra)
    if (path / "meta.json").is_file():
        with quiet_hf_progress():
            return type(model).from_pretrained(path).eval()
    t0 = time.perf_counter()
    trained = train_fn(model)
    info = None
    if isinstance(trained, tuple):  # (model, JSON-able training record)
        trained, info = trained
    trained = model if trained is None else trained
    seconds = time.perf_counter() - t0
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_hf_progress():
        trained.save_pretrained(tmp)  # safetensors
    meta = {"name": name, "seed": seed, "extra": dict(extra or {}), "train_seconds": round(seconds, 2),
            "class": type(trained).__name__}
    if info is not None:
        meta["train_info"] = info
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    try:
        tmp.rename(path)
    except OSError:  # a concurrent run saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return trained.eval()
