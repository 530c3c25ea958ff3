"""``otfx demo``: train two small ViTs on scikit-learn's digits, fuse them every way, print one table.

Self-contained: the digits ship with scikit-learn, so nothing is downloaded. Parents are cached under
``$OTFX_CACHE`` (default ``~/.cache/otfx``) after the first run; Sinkhorn's reg is chosen on the validation
split, never on the test split; the fused model that is best on validation is saved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from otfx.conventions import eval_mode, main_output

WEIGHT_REGS = (0.01, 0.03, 0.06, 0.1, 0.3)
ACT_REGS = (0.01, 0.03, 0.1)
ACT_TOKENS: tuple[Any, ...] = ("all", ("window", 2))  # the 2x2 centre patches of the 4x4 grid (+ class token)
EXAMPLE_BATCH = 64  # activations are collected in batches of the traced example's size: larger is faster
BATCH = 128


def cache_root() -> Path:
    """``$OTFX_CACHE`` if set, else ``~/.cache/otfx``."""
    return Path(os.environ.get("OTFX_CACHE") or Path.home() / ".cache" / "otfx").expanduser()


# ----------------------------------------------------------------------------------------------- data, parents


@dataclass(frozen=True)
class ViTSpec:
    """Architecture and training budget of one parent (all of it goes into the cache key)."""

    hidden: int = 64
    mlp: int = 128
    layers: int = 4
    heads: int = 4
    epochs: float = 30.0
    lr: float = 2e-3
    train_limit: int | None = None  # train on the first N training images only (tests)

    def build(self, seed: int) -> nn.Module:
        """A fresh ``ViTForImageClassification`` for 8x8 digits (patch 2), initialised from ``seed``."""
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=self.hidden,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           intermediate_size=self.mlp, num_labels=10, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        torch.manual_seed(seed)
        return ViTForImageClassification(config)


@dataclass
class Digits:
    """scikit-learn's 1,797 digits as ``[N, 1, 8, 8]`` floats standardised with the training set's statistics."""

    x: dict[str, torch.Tensor]  # "train", "val", "test"
    y: dict[str, torch.Tensor]


def load_digits(seed: int = 0) -> Digits:
    """A stratified 72 / 8 / 20 % train / validation / test split (``seed`` fixes the split only)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    d = sklearn_digits()
    x, y = d.images.astype(np.float64)[:, None], d.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.1, random_state=seed, stratify=y[rest])
    mean, std = float(x[train].mean()), float(x[train].std())
    rows = {"train": train, "val": val, "test": test}
    return Digits({k: torch.from_numpy(((x[r] - mean) / std).astype(np.float32)) for k, r in rows.items()},
                  {k: torch.from_numpy(y[r]) for k, r in rows.items()})


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return main_output(model(pixel_values=x) if hasattr(model, "config") else model(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, in eval mode (the model's flags are restored)."""
    with eval_mode(model):
        correct = sum(int((_logits(model, x[i:i + 512]).argmax(-1) == y[i:i + 512]).sum())
                      for i in range(0, len(x), 512))
    return correct / max(1, len(x))


def _batches(n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:  # each epoch a fresh permutation, the last partial batch kept
        yield from torch.randperm(n, generator=generator).split(BATCH)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: ViTSpec, seed: int,
          progress: str | None = None) -> nn.Module:
    """AdamW (no decay on 1-d parameters), 20% linear warm-up then cosine, gradient norm clipped at 1.

    ``seed`` fixes the batch order. 5% warm-up without clipping diverged part-way on digits' validation set.
    """
    from tqdm.auto import tqdm

    steps = max(1, round(spec.epochs * math.ceil(len(y) / BATCH)))
    warmup = max(1, round(0.2 * steps))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=spec.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) /
                                                                                  max(1, steps - warmup)))))
    model.train()
    batches = _batches(len(y), gen)
    for _ in tqdm(range(steps), disable=progress is None, desc=progress, leave=False, mininterval=2.0):
        b = next(batches)
        loss = F.cross_entropy(_logits(model, x[b]), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def parent(digits: Digits, spec: ViTSpec, seed: int, progress: str | None = None) -> tuple[nn.Module, str]:
    """The parent for ``seed`` (init and batch order), trained once and cached; returns it and a note."""
    from otfx.io import atomic_dir, quiet_hf_progress

    x, y = digits.x["train"][:spec.train_limit], digits.y["train"][:spec.train_limit]
    payload = json.dumps({"spec": asdict(spec), "seed": seed, "n_train": len(y), "n_val": len(digits.y["val"])},
                         sort_keys=True)
    path = cache_root() / "demo" / "parents" / f"vit-seed{seed}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"
    model = spec.build(seed)
    if (path / "meta.json").is_file():
        with quiet_hf_progress():
            model = type(model).from_pretrained(path).eval()
        seconds = json.loads((path / "meta.json").read_text()).get("train_seconds", float("nan"))
        return model, f"loaded from cache (trained in {seconds:.0f} s)"
    t0 = time.perf_counter()
    train(model, x, y, spec, seed, progress)
    meta = {"spec": asdict(spec), "seed": seed, "train_seconds": round(time.perf_counter() - t0, 2)}
    with atomic_dir(path, overwrite=True) as tmp, quiet_hf_progress():
        model.save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return model, f"trained {spec.epochs:g} epochs"


# ----------------------------------------------------------------------------------------------- the demo


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults are the README's ``otfx demo``."""

    seed: int = 0
    spec: ViTSpec = field(default_factory=ViTSpec)
    weight_regs: Sequence[float] = WEIGHT_REGS
    act_regs: Sequence[float] = ACT_REGS
    act_samples: int = 256
    act_tokens: Sequence[Any] = ACT_TOKENS
    out: Path | None = None
    overwrite: bool = False
    quiet: bool = False


@dataclass
class DemoResult:
    rows: list[dict[str, Any]]
    steps: dict[str, float]
    saved: Path
    saved_variant: str
    table: str


def _fmt(acc: float | None) -> str:
    return "-" if acc is None or not math.isfinite(acc) else f"{100 * acc:.2f}"


def _tokens(tokens: Any) -> str:
    return tokens if isinstance(tokens, str) else f"{tokens[0]}_{tokens[1]}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the demo rows (accuracy in %, one-shot: no training after fusion)."""
    head = f"{'model':<28} {'val acc':>8} {'test acc':>9} {'time (s)':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<28} {_fmt(r['val']):>8} {_fmt(r['test']):>9} {r['seconds']:>9.2f}  "
                     f"{r['note']}".rstrip())
    return "\n".join(lines)


def _timed(make: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> tuple[nn.Module, float]:
    t0 = time.perf_counter()
    model = make(*args, **kwargs).eval()
    return model, time.perf_counter() - t0


def run_demo(config: DemoConfig) -> DemoResult:
    """Train (or load) the parents, build every variant, save the best fused model; returns the rows."""
    from tqdm.auto import tqdm

    import otfx
    from otfx.io import atomic_dir, check_output_dir

    out = Path(config.out) if config.out is not None else cache_root() / "demo" / "fused"
    overwrite = config.overwrite or config.out is None
    check_output_dir(out, overwrite)  # refuse a used --out before any training
    n_sweeps = len(config.weight_regs) + len(config.act_regs) * len(config.act_tokens)
    bar = tqdm(total=8 + n_sweeps, desc="otfx demo", disable=config.quiet, file=sys.stderr, leave=False)
    steps: dict[str, float] = {}
    t_start = time.perf_counter()
    digits = load_digits()
    steps["load digits"] = time.perf_counter() - t_start
    x_val, y_val, x_test, y_test = digits.x["val"], digits.y["val"], digits.x["test"], digits.y["test"]
    rows: list[dict[str, Any]] = []

    def add(name: str, model: nn.Module, seconds: float, note: str) -> None:
        rows.append({"model": name, "val": accuracy(model, x_val, y_val), "test": accuracy(model, x_test, y_test),
                     "seconds": seconds, "note": note})
        bar.set_postfix_str(name, refresh=True)
        bar.update()

    parents = []
    for k, seed in enumerate((config.seed, config.seed + 1)):
        label = f"parent {'AB'[k]} (seed {seed})"
        t0 = time.perf_counter()
        model, note = parent(digits, config.spec, seed, None if config.quiet else f"train {label}")
        steps[label] = time.perf_counter() - t0
        parents.append(model)
        add(label, model, steps[label], note)

    t0 = time.perf_counter()
    traced = [otfx.trace(m, (digits.x["train"][:EXAMPLE_BATCH],)) for m in parents]
    steps["trace"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(config.seed)
    picked = digits.x["train"][torch.randperm(len(digits.y["train"]), generator=g)[:config.act_samples]]
    data = list(picked.split(EXAMPLE_BATCH))

    add("ensemble", *_timed(otfx.ensemble, *parents), "averages the logits: 2 models at inference")
    add("vanilla fusion", *_timed(otfx.vanilla_fuse, *parents), "plain weight averaging")
    paper = {"residual": "mean"}  # the paper's residual policy (otfx's default without data rotates the stream)
    fused = {"OT weights, EMD": _timed(otfx.fuse, *traced, solver="emd", **paper)}
    add("OT weights, EMD", *fused["OT weights, EMD"], "hard alignment")

    def swept(name: str, options: Sequence[dict[str, Any]], regs: Sequence[float], what: str) -> None:
        """Sinkhorn over ``options x regs``; the best on validation is the row (first on ties)."""
        best, tried, t0 = None, 0, time.perf_counter()
        for opts in options:
            extra = ({"data": data, "repair": False, "refit": False}  # the paper's
                     if opts.get("cost") == "activations" else {})
            for reg in regs:
                bar.set_postfix_str(f"{name} reg {reg:g}", refresh=True)
                bar.update()
                tried += 1
                try:
                    model, seconds = _timed(otfx.fuse, *traced, solver="sinkhorn", reg=reg, **paper, **opts,
                                            **extra)
                except (ValueError, ArithmeticError):  # a reg that fails is a choice not available
                    continue
                score = accuracy(model, x_val, y_val)
                if best is None or score > best[0]:
                    best = (score, reg, opts, model, seconds)
        if best is None:
            raise RuntimeError(f"{name}: every Sinkhorn reg in {list(regs)} failed")
        _, reg, opts, model, seconds = best
        choice = f"reg {reg:g}" + (f", tokens {_tokens(opts['tokens'])}" if "tokens" in opts else "")
        fused[name] = (model, seconds)
        add(name, model, seconds, f"{choice}: best on val of {tried} tried ({time.perf_counter() - t0:.1f} s){what}")

    swept("OT weights, Sinkhorn", [{"cost": "weights"}], config.weight_regs, "")
    swept("OT activations, Sinkhorn", [{"cost": "activations", "tokens": t} for t in config.act_tokens],
          config.act_regs, f"; {config.act_samples} training images")
    fused["otfx default, no data"] = _timed(otfx.fuse, *traced)
    add("otfx default, no data", *fused["otfx default, no data"],
        "fuse(a, b): weights, one rotation of the residual stream, Sinkhorn reg 0.06")
    fused["otfx default, with data"] = _timed(otfx.fuse, *traced, data=data)
    report = fused["otfx default, with data"][0].otfx_report
    chosen, tried = report["config"], len(report.get("selection", {}).get("rows", []))
    plans = "EMD" if chosen["solver"] == "emd" else f"reg {chosen['reg']:g}"
    add("otfx default, with data", *fused["otfx default, with data"],
        f"fuse(a, b, data=...): {chosen['cost']}, {plans} + REPAIR{' + refit' if chosen['refit'] else ''}, chosen "
        f"without labels among {tried}; {config.act_samples} unlabelled training images")

    by_name = {r["model"]: r for r in rows}
    keep = max(fused, key=lambda n: by_name[n]["val"])  # the fused model to save: best OT variant on val
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fused[keep][0].save_pretrained(tmp)
        info = {"variant": keep, "rows": rows, "seed": config.seed, "parents": asdict(config.spec),
                "report": getattr(fused[keep][0], "otfx_report", {}).get("timings")}
        (tmp / "otfx-demo.json").write_text(json.dumps(info, indent=1, default=str))
    steps["save"] = time.perf_counter() - t0
    bar.close()
    steps["total"] = time.perf_counter() - t_start
    return DemoResult(rows, steps, out, keep, format_table(rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otfx demo", description="Train two small ViTs on scikit-learn's digits (cached "
                                "after the first run), fuse them with OT and the baselines, and print one-shot "
                                "accuracies and timings.")
    p.add_argument("--out", type=Path, help="folder for the fused model (default: <cache>/demo/fused)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--seed", type=int, default=0, help="parents get seeds SEED and SEED+1 (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("smaller runs (tests)")
    g.add_argument("--epochs", type=float, default=30.0, help="training epochs per parent (default 30)")
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--mlp", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--train-limit", type=int, help="train the parents on the first N training images only")
    g.add_argument("--regs", help="Sinkhorn regs to try for the weights cost, comma-separated")
    g.add_argument("--act-regs", help="Sinkhorn regs to try for the activations cost, comma-separated")
    return p


def _regs(text: str | None, default: Sequence[float]) -> tuple[float, ...]:
    if text is None:
        return tuple(default)
    regs = tuple(float(r) for r in text.split(",") if r.strip())
    if not regs or any(not r > 0 for r in regs):
        raise ValueError(f"regs {text!r}: give positive numbers separated by commas")
    return regs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help or a usage error: report the status, do not exit the caller
        return exit_.code if isinstance(exit_.code, int) else 0
    torch.set_num_threads(1)  # a shared two-core machine runs 5x slower on two threads
    try:
        regs, act_regs = _regs(args.regs, WEIGHT_REGS), _regs(args.act_regs, ACT_REGS)
    except ValueError as err:
        parser.print_usage(sys.stderr)
        print(f"otfx demo: error: {err}", file=sys.stderr)
        return 2
    spec = ViTSpec(hidden=args.hidden, mlp=args.mlp, layers=args.layers, heads=args.heads, epochs=args.epochs,
                   train_limit=args.train_limit)
    config = DemoConfig(seed=args.seed, spec=spec, weight_regs=regs, act_regs=act_regs, out=args.out,
                        overwrite=args.overwrite, quiet=args.quiet)
    result = run_demo(config)
    print(f"Two ViTs ({spec.hidden}/{spec.mlp}/{spec.layers}, {spec.heads} heads) on scikit-learn digits, fused "
          "one-shot (no training after fusion). Accuracy in %; reg chosen on the validation split.")
    print(result.table)
    print("steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.steps.items()))
    print(f"saved the fused model ({result.saved_variant}, best OT variant on val) to {result.saved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
