"""Experiment 9: does the label-free score pick good fusion options?

``otfx.fuse(*models, data=calibration)`` fuses a few candidate configurations and keeps the one whose outputs on
the calibration inputs agree best with the parents' mean prediction (``otfx.select``; KL of the parents' mean
softmax to the fused model's, no labels). Here every configuration of a 20-point grid (cost weights/activations x
Sinkhorn reg 0.03/0.1/0.25/0.5 or EMD x least-squares refit off/on; residual orthogonal, REPAIR on) is fused
on each setting: digits and Fashion-MNIST ViT parents (examples/08's, cached) with 2 and 4 models in both anchor
orders, and examples/05's BERT masked-LM pair. For each, the score is set against the validation metric
(Spearman's rank correlation), and the configuration the score picks among otfx's candidates is compared with the
fixed default (``select="off"``) and with the best configuration on validation (which needs labels). The test split
decides nothing. Writes docs/results/09_selection/{README.md,results.json}.
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common, however this file is loaded

from common import runner as R  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import otfx  # noqa: E402
from otfx.align.config import FusionConfig  # noqa: E402
from otfx.select import CANDIDATES, EMD, Agreement  # noqa: E402

NAME = "09_selection"
TITLE = "Label-free choice of fusion options"
SAMPLES = 256
EXAMPLE_BATCH = 64
SINKHORN = FusionConfig().solver
#: Sinkhorn at four regs and EMD (no reg), on the rotated streams of the default; each with and without the refit
GRID = [{"cost": cost, "residual": "orthogonal", "solver": solver, "reg": reg, "refit": refit}
        for cost, (solver, reg), refit in itertools.product(
            ("weights", "activations"), [*((SINKHORN, r) for r in (0.03, 0.1, 0.25, 0.5)), (EMD, None)],
            (False, True))]


def is_candidate(options: dict) -> bool:
    """Whether ``fuse``'s selection tries this configuration (every open axis at one of its candidates; EMD has
    no reg)."""
    return all(options[k] in CANDIDATES[k] for k in ("cost", "residual", "refit")) and (
        options["solver"] == EMD or options["reg"] in CANDIDATES["reg"])


def describe(options: dict) -> str:
    solver = "EMD" if options["solver"] == EMD else f"reg {options['reg']}"
    return f"{options['cost']}, {solver}, refit {'on' if options['refit'] else 'off'}"


def setting(traced: Sequence, data, val: Callable, test: Callable, higher: bool) -> dict:
    """Every grid configuration fused, with its score, validation and test metric; then the choices."""
    score = Agreement(traced, data, [1.0 / len(traced)] * len(traced))
    rows = []
    for options in GRID:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = otfx.fuse(*traced, data=data, select="off", **options).eval()
        rows.append({**options, "score": score(model), "val": val(model), "test": test(model),
                     "seconds": time.perf_counter() - t0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = otfx.fuse(*traced, data=data, select="off").eval()
    best_val = (max if higher else min)(rows, key=lambda r: r["val"])
    picked = min((r for r in rows if is_candidate(r)), key=lambda r: r["score"])
    picked_all = min(rows, key=lambda r: r["score"])
    rho = spearmanr([r["score"] for r in rows], [r["val"] for r in rows]).statistic
    out = {"rows": rows, "spearman_score_val": float(rho),
           "default": {"val": val(default), "test": test(default), "config": {
               k: default.otfx_report["config"][k] for k in ("cost", "residual", "solver", "reg", "refit")}},
           "picked": picked, "picked_from_grid": picked_all, "best_on_val": best_val}
    print(f"  spearman {rho:+.2f}; picked {describe(picked)} val "
          f"{picked['val']:.4f} test {picked['test']:.4f}; default val {out['default']['val']:.4f} test "
          f"{out['default']['test']:.4f}; best on val {best_val['val']:.4f} test {best_val['test']:.4f}", flush=True)
    return out


def image_entry(split, spec, seeds: Sequence[int]) -> dict:
    parents = {s: R.vit_parent(split, spec, s, progress=False) for s in seeds}
    val, test = R.accuracy_of(split, "val"), R.accuracy_of(split, "test")
    data = R.activation_data(split.x_train, SAMPLES)
    entry: dict = {"parents_val": {s: val(m) for s, m in parents.items()},
                   "parents_test": {s: test(m) for s, m in parents.items()}, "settings": {}}
    for n in (2, 4):
        for order in (list(seeds[:n]), list(seeds[:n])[::-1]):
            print(f"  {order}", flush=True)
            traced = [otfx.trace(parents[s], (split.x_train[:EXAMPLE_BATCH],)) for s in order]
            entry["settings"][str(order)] = {**setting(traced, data, val, test, True),
                                             "mean_parent_test": sum(test(parents[s]) for s in order) / n}
    return entry


def bert_entry() -> dict:
    from common import train as T

    ex, dev, test, parents, traced, data = R.load_example("06_quality_ladder.py").bert_pair()
    entry = {"parents_test": [T.evaluate_mlm_loss(m, test) for m in parents],
             "vanilla_test": T.evaluate_mlm_loss(otfx.vanilla_fuse(*parents).eval(), test)}
    entry["settings"] = {"[0, 1]": setting(traced, data, lambda m: T.evaluate_mlm_loss(m, dev),
                                           lambda m: T.evaluate_mlm_loss(m, test), False)}
    return entry


def page(results: dict) -> str:
    lines = [f"Grid: {len(GRID)} configurations (cost x (Sinkhorn reg 0.03, 0.1, 0.25, 0.5 or EMD) x refit off/on; "
             f"residual orthogonal, REPAIR on), {SAMPLES} unlabelled training "
             "images (64 training blocks for BERT) as calibration data for the costs, REPAIR and the score. "
             "*Picked*: the lowest score among otfx's candidates "
             f"({', '.join(f'{k} {v}' for k, v in CANDIDATES.items())}, and EMD beside Sinkhorn), what "
             "`otfx.fuse(data=...)` returns. "
             "*Default*: `select='off'` (the fixed defaults). *Best on val*: the grid's best validation metric, "
             "which a user without labels cannot find. Cells: test (validation); accuracy % for images, MLM loss "
             "for BERT. Spearman: rank correlation of the score with the validation metric over the grid (negative "
             "is good for accuracy, positive for loss).", ""]
    body, gains = [], []
    for ds in ("digits", "fashion-mnist", "bert"):
        if ds not in results:
            continue
        for order, s in results[ds]["settings"].items():
            scale = 1.0 if ds == "bert" else 100.0

            def cell(r: dict, scale: float = scale, digits: int = 3 if ds == "bert" else 2) -> str:
                return f"{scale * r['test']:.{digits}f} ({scale * r['val']:.{digits}f})"

            p = s["picked"]
            body.append([f"{ds} {order}", f"{s['spearman_score_val']:+.2f}", cell(p),
                         describe(p), cell(s["default"]), cell(s["best_on_val"]),
                         cell(s["picked_from_grid"])])
            if ds != "bert":
                gains.append((p["val"] - s["default"]["val"], p["test"] - s["default"]["test"]))
    lines += [R.markdown_table(["setting", "Spearman", "picked", "picked config", "default (select off)",
                                "best on val", "lowest score on the whole grid"], body), ""]
    wins, settings = 0, 0
    for ds in ("digits", "fashion-mnist", "bert"):
        for s in results.get(ds, {}).get("settings", {}).values():
            best = max if ds != "bert" else min
            by_cost = {c: best(r["val"] for r in s["rows"] if r["cost"] == c) for c in ("weights", "activations")}
            settings += 1
            wins += by_cost["activations"] == best(by_cost.values())
    lines += [f"Activations against weights: the grid's best activations configuration is at least as good on "
              f"validation as its best weights configuration in {wins} of {settings} settings.", ""]
    if gains:
        lines += [f"Images, picked minus default, mean over {len(gains)} settings: validation "
                  f"{100 * sum(g[0] for g in gains) / len(gains):+.2f} points, test "
                  f"{100 * sum(g[1] for g in gains) / len(gains):+.2f} points.", ""]
    if "bert" in results:
        b = results["bert"]
        mean = sum(b["parents_test"]) / len(b["parents_test"])
        gap = b["vanilla_test"] - mean
        s = b["settings"]["[0, 1]"]
        lines += [f"BERT: vanilla averaging {b['vanilla_test']:.3f}, parents "
                  f"{' / '.join(f'{x:.3f}' for x in b['parents_test'])}; the picked configuration closes "
                  f"{100 * (b['vanilla_test'] - s['picked']['test']) / gap:.0f}% of the gap, the default "
                  f"{100 * (b['vanilla_test'] - s['default']['test']) / gap:.0f}%, the best on val "
                  f"{100 * (b['vanilla_test'] - s['best_on_val']['test']) / gap:.0f}%.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return R.datasets_main(argv, __doc__, NAME, TITLE, {"grid": GRID}, image_entry, bert_entry, page)

if __name__ == "__main__":
    raise SystemExit(main())
