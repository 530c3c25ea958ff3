"""``otfx demo``: train two small ViTs on scikit-learn's digits, fuse them every way, print one table.

Parents are cached (first run trains them, about 25 s each on one thread); Sinkhorn's reg is chosen on the
validation split, never on the test split; the fused model that is best on validation is saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import cache_root, load_digits_split
from .runner import (
    Timer,
    Variant,
    ViTSpec,
    accuracy_of,
    activation_data,
    best_row,
    fmt_acc,
    reg_sweep,
    run_variant,
    vit_parent,
    vit_parent_dir,
)

WEIGHT_REGS = (0.01, 0.03, 0.06, 0.1, 0.3)
ACT_REGS = (0.01, 0.03, 0.1)
ACT_TOKENS: tuple[Any, ...] = ("all", ("window", 2))  # the 2x2 centre patches of the 4x4 grid (+ class token)
EXAMPLE_BATCH = 64  # activations are collected in batches of the traced example's size: larger is faster


def _tokens(tokens: Any) -> str:
    return tokens if isinstance(tokens, str) else f"{tokens[0]}_{tokens[1]}"


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults are the README's ``otfx demo``."""

    seed: int = 0
    spec: ViTSpec = field(default_factory=lambda: ViTSpec("digits", epochs=30))
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


def _row(name: str, model: torch.nn.Module, val, test, seconds: float, note: str = "") -> dict[str, Any]:
    return {"model": name, "val": val(model), "test": test(model), "seconds": seconds, "note": note}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the demo rows (accuracy in %, one-shot: no training after fusion)."""
    head = f"{'model':<28} {'val acc':>8} {'test acc':>9} {'time (s)':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<28} {fmt_acc(r['val']):>8} {fmt_acc(r['test']):>9} {r['seconds']:>9.2f}  "
                     f"{r['note']}".rstrip())
    return "\n".join(lines)


def run_demo(config: DemoConfig) -> DemoResult:
    """Train (or load) the parents, build every variant, save the best fused model; returns the rows."""
    from tqdm.auto import tqdm

    import otfx
    from otfx.io import atomic_dir, check_output_dir

    total_steps = 10 + len(config.weight_regs) + len(config.act_regs) * len(config.act_tokens)
    bar = tqdm(total=total_steps, desc="otfx demo", disable=config.quiet, file=sys.stderr, leave=False)

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=True)

    out = Path(config.out) if config.out is not None else cache_root() / "demo" / "fused"
    overwrite = config.overwrite or config.out is None
    check_output_dir(out, overwrite)  # refuse a used --out before any training
    timer = Timer()
    t_start = time.perf_counter()
    with timer("load digits"):
        split = load_digits_split()
    bar.update()
    val, test = accuracy_of(split, "val"), accuracy_of(split, "test")
    rows: list[dict[str, Any]] = []
    parents = []
    for k, seed in enumerate((config.seed, config.seed + 1)):
        label = f"parent {'AB'[k]} (seed {seed})"
        step(f"{label}: training or loading")
        cached = (vit_parent_dir(split, config.spec, seed) / "meta.json").is_file()
        with timer(label):
            model = vit_parent(split, config.spec, seed, progress=False if config.quiet else f"train {label}")
        parents.append(model)
        note = "loaded from cache" if cached else f"trained {config.spec.epochs:g} epochs"
        if cached:
            meta = json.loads((vit_parent_dir(split, config.spec, seed) / "meta.json").read_text())
            note += f" (trained in {meta.get('train_seconds', float('nan')):.0f} s)"
        rows.append(_row(label, model, val, test, timer.steps[label], note))
        bar.update()

    step("tracing")
    with timer("trace"):
        example = (split.x_train[:EXAMPLE_BATCH],)
        traced = [otfx.trace(m, example) for m in parents]
    bar.update()
    data = activation_data(split.x_train, config.act_samples, seed=config.seed)

    def simple(variant: Variant, note: str) -> torch.nn.Module:
        step(variant.name)
        model, seconds = run_variant(variant, parents, traced, data)
        rows.append(_row(variant.name, model, val, test, seconds, note))
        bar.update()
        return model

    simple(Variant("ensemble", "ensemble"), "averages the logits: 2 models at inference")
    simple(Variant("vanilla fusion", "vanilla"), "plain weight averaging")
    fused: dict[str, torch.nn.Module] = {}
    fused["OT weights, EMD"] = simple(Variant("OT weights, EMD", options={"solver": "emd"}), "hard alignment")

    def swept(name: str, variants: Sequence[Variant], regs: Sequence[float], what: str) -> None:
        """Sinkhorn over ``regs`` for each variant; keep the best on val."""
        def progress(label: str) -> None:
            step(label)
            bar.update()

        rows_all = []
        with timer(f"{name}: choice on val"):
            for variant in variants:
                rows_all += [{**r, "variant": variant} for r in reg_sweep(variant, parents, traced, val, regs, data,
                                                                          progress)]
        best = best_row(rows_all)
        step(name)
        chosen = best["variant"].with_options(solver="sinkhorn", reg=best["reg"])
        model, seconds = run_variant(chosen, parents, traced, data)
        tokens = chosen.options.get("tokens")
        choice = f"reg {best['reg']:g}" + (f", tokens {_tokens(tokens)}" if tokens is not None else "")
        note = (f"{choice}: best on val of {len(rows_all)} tried "
                f"({timer.steps[f'{name}: choice on val']:.1f} s){what}")
        rows.append(_row(name, model, val, test, seconds, note))
        fused[name] = model
        bar.update()

    swept("OT weights, Sinkhorn", [Variant("OT weights", options={"cost": "weights"})], config.weight_regs, "")
    swept("OT activations, Sinkhorn",
          [Variant(f"OT acts {_tokens(t)}", options={"cost": "activations", "tokens": t}) for t in config.act_tokens],
          config.act_regs, f"; {config.act_samples} training images")

    # the fused model to keep: the best OT variant on validation
    by_name = {r["model"]: r for r in rows}
    keep = max(fused, key=lambda n: by_name[n]["val"])
    step(f"saving {keep}")
    with timer("save"), atomic_dir(out, overwrite=overwrite) as tmp:
        fused[keep].save_pretrained(tmp)
        info = {"variant": keep, "rows": rows, "seed": config.seed, "parents": config.spec.name,
                "report": getattr(fused[keep], "otfx_report", {}).get("timings")}
        (tmp / "otfx-demo.json").write_text(json.dumps(info, indent=1, default=str))
    bar.update()
    bar.close()
    timer.steps["total"] = time.perf_counter() - t_start
    return DemoResult(rows, timer.steps, out, keep, format_table(rows))


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
    spec = ViTSpec("digits", hidden=args.hidden, mlp=args.mlp, layers=args.layers, heads=args.heads,
                   epochs=args.epochs, train_limit=args.train_limit)
    config = DemoConfig(seed=args.seed, spec=spec, weight_regs=regs, act_regs=act_regs, out=args.out,
                        overwrite=args.overwrite, quiet=args.quiet)
    result = run_demo(config)
    print(f"Two ViTs ({spec.hidden}/{spec.mlp}/{spec.layers}, {spec.heads} heads) on scikit-learn digits, fused "
          "one-shot (no training after fusion). Accuracy in %; reg chosen on the validation split.")
    print(result.table)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.steps.items())
    print(f"steps: {steps}")
    print(f"saved the fused model ({result.saved_variant}, best OT variant on val) to {result.saved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
