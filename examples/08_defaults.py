"""Experiment 8: what ``otfx.fuse`` gives a user who changes nothing.

Every row is one call with otfx's defaults, no choice made on any split: ``otfx.fuse(*parents)`` (no data),
``otfx.fuse(*parents, data=calibration)`` (256 unlabelled training images, or 64 training blocks for BERT), and
for comparison the paper's policy at the same reg (``residual="mean"``) and ``residual="shared"`` without data,
vanilla averaging and the ensemble. Digits and Fashion-MNIST ViT parents (the ladder's, cached) with 2 and 4
models in both anchor orders, and examples/05's BERT masked-LM pair. Validation and test are both reported; the
test split decides nothing. Writes docs/results/08_defaults/{README.md,results.json}.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common, however this file is loaded

from common import runner as R  # noqa: E402

import otfx  # noqa: E402

NAME = "08_defaults"
TITLE = "One-shot fusion with otfx's defaults"
SAMPLES = 256
EXAMPLE_BATCH = 64
#: row name -> (fuse options, whether the row is given the calibration data)
ROWS = {
    "otfx.fuse(data=...)": ({}, True),
    "select='off', with data": ({"select": "off"}, True),
    "select='off', refit=False, with data": ({"select": "off", "refit": False}, True),
    "the paper's policy + refit, with data": ({"select": "off", "residual": "mean", "repair": False, "refit": True},
                                               True),
    "otfx.fuse()": ({}, False),
    "residual='shared', no data": ({"residual": "shared"}, False),
    "residual='mean' (the paper's policy), no data": ({"residual": "mean"}, False),
}


def _fused(traced: Sequence, options: dict, data) -> tuple[torch.nn.Module, float, dict]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = otfx.fuse(*traced, data=data, **options).eval()
    return model, time.perf_counter() - t0, model.otfx_report["config"]


def image_entry(split, spec, seeds: Sequence[int]) -> dict:
    parents = {s: R.vit_parent(split, spec, s, progress=False) for s in seeds}
    val, test = R.accuracy_of(split, "val"), R.accuracy_of(split, "test")
    data = R.activation_data(split.x_train, SAMPLES)
    entry: dict = {"parents_test": {s: test(m) for s, m in parents.items()},
                   "parents_val": {s: val(m) for s, m in parents.items()}, "n_test": len(split.y_test), "runs": {}}
    for n in (2, 4):
        chosen = list(seeds[:n])
        for order in (chosen, chosen[::-1]):
            models = [parents[s] for s in order]
            traced = [otfx.trace(m, (split.x_train[:EXAMPLE_BATCH],)) for m in models]
            run: dict = {"mean_parent_test": sum(test(m) for m in models) / n,
                         "vanilla": {"val": val(otfx.vanilla_fuse(*models)), "test": test(otfx.vanilla_fuse(*models))},
                         "ensemble": {"val": val(otfx.ensemble(*models)), "test": test(otfx.ensemble(*models))}}
            for row, (options, with_data) in ROWS.items():
                model, seconds, config = _fused(traced, options, data if with_data else None)
                run[row] = {"val": val(model), "test": test(model), "seconds": seconds,
                            "config": {k: config[k] for k in ("cost", "solver", "residual", "reg", "repair", "refit")}}
                if "selection" in model.otfx_report:
                    run[row]["selection"] = model.otfx_report["selection"]["rows"]
                print(f"  {order} {row}: val {100 * run[row]['val']:.2f} test {100 * run[row]['test']:.2f} "
                      f"({seconds:.1f} s; {run[row]['config']})", flush=True)
            entry["runs"][str(order)] = run
    return entry


def bert_entry() -> dict:
    from common import train as T

    ex, dev, test, parents, traced, data = R.load_example("06_quality_ladder.py").bert_pair()
    losses: Callable = lambda m: {"val": T.evaluate_mlm_loss(m, dev), "test": T.evaluate_mlm_loss(m, test)}  # noqa: E731
    entry: dict = {"parents": [losses(m) for m in parents], "vanilla": losses(otfx.vanilla_fuse(*parents).eval()),
                   "ensemble_test": ex.ensemble_loss(parents, test)}
    for row, (options, with_data) in ROWS.items():
        model, seconds, config = _fused(traced, options, data if with_data else None)
        entry[row] = {**losses(model), "seconds": seconds,
                      "config": {k: config[k] for k in ("cost", "solver", "residual", "reg", "repair", "refit")}}
        print(f"  bert {row}: val {entry[row]['val']:.3f} test {entry[row]['test']:.3f} ({seconds:.1f} s)", flush=True)
    return entry


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def page(results: dict) -> str:
    lines = [
        "Every row is a single `otfx.fuse` call with the defaults (no reg, cost or policy chosen on any labelled "
        f"split), with {SAMPLES} unlabelled training images as `data` where the row says so. With `data`, "
        "`otfx.fuse` itself chooses among 6 alignments (weights or activations cost, Sinkhorn reg 0.1 or 0.5 or EMD), "
        "each with and without the least-squares refit, "
        "by how well each fused model agrees with the "
        "parents' mean prediction on those images (no labels); `select='off'` is the fixed default it replaced. "
        "Cells: test accuracy % "
        "(validation in brackets; then % of the mean parent's test accuracy). The configuration each default "
        "resolved to is listed below each table.", ""]
    for ds in ("digits", "fashion-mnist"):
        if ds not in results:
            continue
        entry = results[ds]
        runs = entry["runs"]
        orders = list(runs)
        header = ["row", *[f"{ds} {o}" for o in orders]]
        body = []
        for row in (*ROWS, "vanilla", "ensemble"):
            cells = []
            for o in orders:
                r, mean = runs[o][row], runs[o]["mean_parent_test"]
                cells.append(f"{_pct(r['test'])} ({_pct(r['val'])}; {100 * r['test'] / mean:.0f}%)")
            body.append([row, *cells])
        body.append(["mean parent (test)", *[_pct(runs[o]["mean_parent_test"]) for o in orders]])
        lines += [f"## {ds}", "", R.markdown_table(header, body), ""]
        configs = {row: runs[orders[-1]][row]["config"] for row in ROWS}
        configs2 = {row: runs[orders[0]][row]["config"] for row in ROWS}
        lines += ["Resolved configurations (2 models / 4 models):", ""]
        lines += [f"- {row}: {configs2[row]} / {configs[row]}" for row in ROWS]
        lines += [""]
    if "bert" in results:
        b = results["bert"]
        mean = sum(p["test"] for p in b["parents"]) / len(b["parents"])
        gap = b["vanilla"]["test"] - mean

        def closed(loss: float) -> str:
            return f"{100 * (b['vanilla']['test'] - loss) / gap:.0f}%"

        body = [[row, f"{b[row]['test']:.3f}", f"{b[row]['val']:.3f}", closed(b[row]["test"]), b[row]["config"]]
                for row in ROWS]
        body += [["vanilla", f"{b['vanilla']['test']:.3f}", f"{b['vanilla']['val']:.3f}", "0%", ""],
                 ["parents", " / ".join(f"{p['test']:.3f}" for p in b["parents"]),
                  " / ".join(f"{p['val']:.3f}" for p in b["parents"]), "100%", ""],
                 ["ensemble", f"{b['ensemble_test']:.3f}", "", closed(b["ensemble_test"]), "2 models at inference"]]
        lines += ["## BERT masked LM (examples/05's pair, 2 models)", "",
                  R.markdown_table(["row", "test loss", "val loss", "gap closed", "resolved to"], body), "",
                  "Gap closed: the share of the test-loss gap between vanilla averaging and the mean parent.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return R.datasets_main(argv, __doc__, NAME, TITLE, {"samples": SAMPLES}, image_entry, bert_entry, page)

if __name__ == "__main__":
    raise SystemExit(main())
