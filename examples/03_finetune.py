"""Experiment 3: does a finetuned fused ViT beat its parents continued for the same steps? (Fashion-MNIST)

Two ViT parents (seeds 0 and 1) are trained until their validation accuracy plateaus (reduce-on-plateau, best
validation weights kept). They are fused three ways: vanilla averaging, the paper's method (weights cost,
Sinkhorn, no repair, reg chosen on validation) and otfx's default with calibration data (``fuse(data=...)``).
Every fused model and both parents are then trained for the same number of further steps, at most 10% of a
parent's training, on the same batches; each model's learning rate is chosen on validation with the first
finetune seed, then rerun with further seeds (a seed fixes the batch order; the models have no dropout).
Validation is used for every choice, test accuracy is only reported. Writes docs/results/03_finetune/.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common, however this file is loaded

from common import runner as R  # noqa: E402
from common.finetune import finetune_grid, plateau_parent  # noqa: E402
from common.train import Plateau  # noqa: E402

import otfx  # noqa: E402

NAME = "03_finetune"
REGS = (0.01, 0.02, 0.04, 0.06, 0.1, 0.2)  # Sinkhorn reg of the paper's method, chosen on validation
LRS = (5e-5, 2e-4, 6e-4, 2e-3, 6e-3)  # finetuning peak lr, chosen per model on validation
SEEDS = (0, 1, 2)  # finetune seeds (batch order)
BUDGET = 0.10  # of a parent's training steps
EXAMPLE_BATCH = 64
CALIBRATION = 256  # unlabelled training images for otfx's default (activations, REPAIR, refit, selection)
PARENTS = ("parent A (seed 0), continued", "parent B (seed 1), continued")
FUSED = ("vanilla averaging", "paper: OT-wts Sinkhorn", "otfx default: fuse(data=...)")


def _mean_std(values: Sequence[float]) -> str:
    m, s = R.mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def _gap(values: Sequence[float]) -> str:
    m, s = R.mean_std(values)
    return f"{100 * m:+.2f} ± {100 * s:.2f} [{100 * min(values):+.2f}, {100 * max(values):+.2f}]"


def _verdict(name: str, gaps: Sequence[float], bar: str) -> str:
    """"Beats" only when every seed agrees and the mean gap exceeds the seed-to-seed std."""
    m, s = R.mean_std(gaps)
    if min(gaps) > 0 and m > s:
        word = "beats"
    elif max(gaps) < 0 and -m > s:
        word = "**does not beat** (is below)"
    else:
        word = "is not distinguishable from"
    return (f"- {name} {word} {bar}: {100 * m:+.2f} points (std {100 * s:.2f} over "
            f"{len(gaps)} finetune seeds, range {100 * min(gaps):+.2f} to {100 * max(gaps):+.2f})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = R.example_parser(__doc__, NAME)
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help=f"finetune seeds (default {len(SEEDS)})")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    command = R.command_line()
    out = R.output_dir(args, NAME)
    split, spec = R.image_setup(args.smoke)
    if args.smoke:
        plateau, regs, lrs = Plateau(max_epochs=3, patience=1, reductions=1), (0.05,), (1e-3, 2e-3)
    else:
        plateau, regs, lrs = Plateau(), REGS, LRS
    seeds = tuple(range(args.seeds))
    timer = R.Timer()

    with timer("parents"):
        trained = [plateau_parent(split, spec, s, plateau) for s in (0, 1)]
    parents, histories = [m for m, _ in trained], [h for _, h in trained]
    parent_steps = min(h["best_steps"] for h in histories)
    steps = 4 if args.smoke else max(10, int(BUDGET * parent_steps) // 10 * 10)
    eval_at = sorted({0, *(round(steps * f) for f in (0.0625, 0.125, 0.25, 0.5, 0.75)), steps})
    val, test = R.accuracy_of(split, "val"), R.accuracy_of(split, "test")
    print("parents:", ", ".join(f"best epoch {h['best_epoch']} ({h['best_steps']} steps), val "
                                f"{100 * h['best_val']:.2f}" for h in histories), f"; finetune {steps} steps",
          flush=True)

    with timer("fusion"):
        traced = [otfx.trace(m, (split.x_train[:EXAMPLE_BATCH],)) for m in parents]
        calibration = R.activation_data(split.x_train, CALIBRATION, seed=0)
        starts: dict[str, torch.nn.Module] = {}
        starts[FUSED[0]] = otfx.vanilla_fuse(*parents).eval()
        paper, sweep = R.choose_sinkhorn([R.Variant("OT-wts", options={"cost": "weights", "repair": False})],
                                         parents, traced, val, regs)
        starts[FUSED[1]], _ = R.run_variant(paper, parents, traced)
        starts[FUSED[2]] = otfx.fuse(*traced, data=calibration).eval()
        chosen = starts[FUSED[2]].otfx_report["config"]
        resolved = (f"{chosen['cost']} cost, reg {chosen['reg']:g}, residual {chosen['residual']}, REPAIR "
                    f"{'on' if chosen['repair'] else 'off'}, refit {'on' if chosen['refit'] else 'off'}, chosen "
                    "without labels")
        starts[PARENTS[0]], starts[PARENTS[1]] = parents
        ensemble = otfx.ensemble(*parents)
    paper_reg = paper.options["reg"]
    print("paper reg", paper_reg, "one-shot test", {n: round(100 * test(m), 2) for n, m in starts.items()}, flush=True)

    with timer("finetuning"):
        runs = finetune_grid(starts, split, steps=steps, lrs=lrs, seeds=seeds, eval_at=eval_at,
                             progress=not args.smoke)

    # ---- report
    parents_test = [test(m) for m in parents]
    parents_val = [h["best_val"] for h in histories]
    ens_test, ens_val = test(ensemble), val(ensemble)

    def final(name: str, part: str = "test") -> list[float]:
        return [runs[name]["runs"][s][part][-1] for s in seeds]

    # per seed: the continued parent that is better on validation, and the better one on test (the harder bar)
    best_by_val = [max(PARENTS, key=lambda p: runs[p]["runs"][s]["val"][-1]) for s in seeds]
    bar_val = [runs[p]["runs"][s]["test"][-1] for p, s in zip(best_by_val, seeds)]
    bar_test = [max(runs[p]["runs"][s]["test"][-1] for p in PARENTS) for s in seeds]
    gaps_val = {n: [a - b for a, b in zip(final(n), bar_val)] for n in FUSED}
    gaps_test = {n: [a - b for a, b in zip(final(n), bar_test)] for n in FUSED}
    gaps_trained = {n: [a - max(parents_test) for a in final(n)] for n in FUSED}

    choice = {FUSED[1]: f"reg {paper_reg:g}", FUSED[2]: resolved}
    main_table = R.markdown_table(
        ["model", "one-shot test", "lr (val)", f"test after {steps} steps, mean ± std", "per seed",
         "gain over best continued parent (on val), mean ± std [min, max]",
         "gain over best continued parent (on test)"],
        [[n, R.fmt_acc(runs[n]["runs"][seeds[0]]["test"][0]), f"{runs[n]['lr']:g}", _mean_std(final(n)),
          R.fmt_list(final(n)), _gap(gaps_val[n]) if n in FUSED else "-",
          _gap(gaps_test[n]) if n in FUSED else "-"] for n in runs])
    lr_table = R.markdown_table(
        ["model", "choice (val)", "one-shot val", *(f"val after {steps}, lr {lr:g}" for lr in lrs)],
        [[n, choice.get(n, "-"), R.fmt_acc(runs[n]["runs"][seeds[0]]["val"][0]),
          *(R.fmt_acc(runs[n]["final_val_by_lr"][lr]) + (" *" if lr == runs[n]["lr"] else "") for lr in lrs)]
         for n in runs])
    ft_steps = runs[PARENTS[0]]["steps"]

    def mean_curve(name: str) -> tuple[list[float], list[float]]:
        pts = [R.mean_std([runs[name]["runs"][s]["test"][i] for s in seeds]) for i in range(len(ft_steps))]
        return [100 * m for m, _ in pts], [100 * s for _, s in pts]

    curves = {n: mean_curve(n) for n in runs}
    curve_table = R.markdown_table(
        ["step", *runs], [[s, *(f"{curves[n][0][i]:.2f} ± {curves[n][1][i]:.2f}" for n in runs)]
                          for i, s in enumerate(ft_steps)])
    refs = {"ensemble of the parents (2x inference)": 100 * ens_test,
            "best parent as trained": 100 * max(parents_test)}
    R.line_plot(out / "finetune_curves.png", {n: (ft_steps, curves[n][0]) for n in runs},
                errors={n: curves[n][1] for n in runs}, refs=refs, xlabel="finetuning steps",
                ylabel="test accuracy (%, mean ± std over seeds)",
                title=f"Finetuning for {steps} steps ({100 * steps / parent_steps:.1f}% of a parent's training)")
    R.line_plot(out / "finetune_curves_zoom.png", {n: (ft_steps[1:], curves[n][0][1:]) for n in runs},
                errors={n: curves[n][1][1:] for n in runs}, refs=refs, xlabel="finetuning steps",
                ylabel="test accuracy (%, mean ± std over seeds)", title="The same, from the first checkpoint on")
    R.line_plot(out / "parent_training.png",
                {f"parent {'AB'[i]} (seed {i})": (h["epoch"], [100 * v for v in h["val"]])
                 for i, h in enumerate(histories)},
                marks={f"best epoch, parent {'AB'[i]}": (h["best_epoch"], 100 * h["best_val"])
                       for i, h in enumerate(histories)},
                xlabel="epoch", ylabel="validation accuracy (%)",
                title="Parents trained to a validation plateau (lr x0.3 at each plateau)")
    n_epochs = max(len(h["epoch"]) for h in histories)

    def cell(h, key, i, fmt):
        return fmt(h[key][i]) if i < len(h[key]) else ""

    parent_table = R.markdown_table(
        ["epoch", "val A", "lr A", "val B", "lr B"],
        [[i + 1, *(x for h in histories for x in (cell(h, "val", i, R.fmt_acc), cell(h, "lr", i, "{:.1e}".format)))]
         for i in range(n_epochs)])

    best_fused = max(FUSED, key=lambda n: R.mean_std(final(n, "val"))[0])
    edge = [f"{n} ({runs[n]['lr']:g})" for n in runs if runs[n]["lr"] in (min(lrs), max(lrs))]
    first_run = sum(h["train_seconds"] for h in histories)
    body = "\n".join([
        f"Parents: {spec.name} on {split.name} ({len(split.y_train)} training images, {len(split.y_val)} held out "
        f"of the training set for validation, the official {len(split.y_test)} test images), AdamW lr "
        f"{plateau.lr:g}, wd {plateau.wd:g}, batch {plateau.batch}, {plateau.warmup_epochs:g} epoch of warm-up, "
        f"then the lr is multiplied by {plateau.factor:g} whenever the validation accuracy has not beaten its best "
        f"by {100 * plateau.min_delta:g} points for {plateau.patience} epochs; the next plateau after "
        f"{plateau.reductions} such cuts (or {plateau.max_epochs} epochs) stops training, and the best-validation "
        "weights are kept. "
        + "; ".join(f"parent {'AB'[i]} (seed {i}): best epoch {h['best_epoch']} of {len(h['epoch'])} "
                    f"({h['best_steps']} steps, val {R.fmt_acc(h['best_val'])}, test {R.fmt_acc(parents_test[i])}, "
                    f"stopped by {h['stopped']}, {h['train_seconds']:.0f} s)" for i, h in enumerate(histories))
        + ".", "",
        f"Finetuning: {steps} steps = {100 * steps / parent_steps:.1f}% of the shorter parent's {parent_steps} "
        f"steps (to its best epoch), batch 128, AdamW with 10% warm-up and cosine decay, gradient clipping 1.0, "
        f"peak lr from {', '.join(f'{x:g}' for x in lrs)} chosen per model on the final validation accuracy of "
        f"finetune seed {seeds[0]}, then rerun with seeds {', '.join(map(str, seeds[1:])) or '-'}. For a given seed "
        "every model sees the same batches in the same order (the seed fixes the order; there is no dropout). "
        f"The paper's Sinkhorn reg from {', '.join(f'{r:g}' for r in regs)} on validation ({paper_reg:g}); otfx's "
        f"default is `otfx.fuse(a, b, data=...)` with {CALIBRATION} unlabelled training images (resolved to "
        f"{resolved}). The anchor is parent A. Accuracy in %; *gain* = fused minus the better continued "
        "parent of the same seed, chosen on validation (or, harder, the better one on test).", "",
        "## The claim", "",
        "Against the better of the two continued parents on *test* (the best parent, the harder bar):", "",
        *(_verdict(n, gaps_test[n], "the best continued parent") for n in FUSED), "",
        "Against the continued parent that is better on *validation* (a choice one could make without test data):",
        "", *(_verdict(n, gaps_val[n], "the continued parent chosen on validation") for n in FUSED), "",
        f"Against the best parent as trained ({R.fmt_acc(max(parents_test))}, not trained further; the paper's "
        "Table 2 comparison):", "",
        *(_verdict(n, gaps_trained[n], "the best parent as trained") for n in FUSED), "",
        *([f"Chosen lr at the edge of the grid: {', '.join(edge)}."] if edge else []), "",
        f"Best fused model on validation after finetuning: {best_fused}. Parents as trained: "
        f"{R.fmt_list(parents_test)} test; their output ensemble {R.fmt_acc(ens_test)} test "
        f"({R.fmt_acc(ens_val)} val) at twice the inference cost.", "",
        f"## Test accuracy after {steps} steps", "", main_table, "",
        "![finetuning curves](finetune_curves.png)", "", "![zoom](finetune_curves_zoom.png)", "",
        "## Test accuracy along the way (mean ± std over seeds)", "", curve_table, "",
        f"## Learning-rate choice (validation, seed {seeds[0]}; * = chosen)", "", lr_table, "",
        "## Parent training (validation accuracy per epoch)", "", "![parent training](parent_training.png)", "",
        parent_table, "",
        "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timer.steps.items())
        + f" (parents: near 0 when reloaded from the cache; training them took {first_run:.0f} s, which a first "
        "run adds).",
    ])
    seconds = time.perf_counter() - t_start
    R.write_markdown(out / "README.md", "Finetuning fused ViTs against parents continued for the same steps",
                     command, body, seconds)
    R.write_json(out / "results.json", {
        "runs": runs, "steps": steps, "parent_steps": parent_steps, "parent_histories": histories,
        "parents_test": parents_test, "parents_val": parents_val, "ensemble_test": ens_test, "ensemble_val": ens_val,
        "paper_reg": paper_reg, "paper_sweep": sweep, "best_continued_by_val": best_by_val,
        "gains_vs_best_by_val": gaps_val, "gains_vs_best_on_test": gaps_test, "gains_vs_best_as_trained": gaps_trained,
        "seeds": list(seeds),
        "stage_seconds": timer.steps, "seconds": seconds})
    print(f"wrote {out / 'README.md'} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
