"""Experiment 3: finetuning fused ViTs on Fashion-MNIST (the paper's Table 2 and Fig. 12).

The seed-0 and seed-1 parents of experiment 1 are fused (vanilla, OT-wts EMD, OT-wts Sinkhorn, OT-acts Sinkhorn;
reg and token filter chosen on the validation split) and every model, the two parents included, is trained for
the same number of further steps: at most 10% of a parent's training. Each one's learning rate is chosen on the
validation split; test accuracy is reported along the way. Writes docs/results/03_finetune/.
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

import otfx  # noqa: E402

NAME = "03_finetune"
REGS = (0.01, 0.02, 0.04, 0.06, 0.1, 0.2)
LRS = (5e-4, 1e-3, 2e-3)
BUDGET = 0.10  # of a parent's training steps
EXAMPLE_BATCH = 64


def main(argv: Sequence[str] | None = None) -> int:
    args = R.example_parser(__doc__, NAME).parse_args(argv)
    t_start = time.perf_counter()
    command = R.command_line()
    out = R.output_dir(args, NAME)
    split, spec = R.image_setup(args.smoke)
    regs, lrs = ((0.05,), (1e-3,)) if args.smoke else (REGS, LRS)
    parent_steps, steps, eval_at = R.finetune_schedule(split, spec, BUDGET, args.smoke)
    parents = [R.vit_parent(split, spec, s) for s in (0, 1)]
    traced = [otfx.trace(m, (split.x_train[:EXAMPLE_BATCH],)) for m in parents]
    data = R.activation_data(split.x_train, 256, seed=0)
    val, test = R.accuracy_of(split, "val"), R.accuracy_of(split, "test")

    starts: dict[str, torch.nn.Module] = {}
    choices: dict[str, str] = {}
    starts["vanilla"], _ = R.run_variant(R.Variant("vanilla", "vanilla"), parents)
    starts["OT-wts EMD"], _ = R.run_variant(R.Variant("OT-wts EMD", options={"solver": "emd"}), parents, traced)
    for name, variants in (
            ("OT-wts Sinkhorn", [R.Variant("OT-wts", options={"cost": "weights"})]),
            ("OT-acts Sinkhorn", [R.Variant("OT-acts", options={"cost": "activations", "tokens": t})
                                  for t in ("all", ("window", 2))])):
        chosen, _ = R.choose_sinkhorn(variants, parents, traced, val, regs, data)
        starts[name], _ = R.run_variant(chosen, parents, traced, data)
        choices[name] = ", ".join(f"{k} {v if isinstance(v, str) else v}" for k, v in chosen.options.items()
                                  if k in ("reg", "tokens"))
        print(name, choices[name], flush=True)
    starts["parent A (seed 0), continued"] = parents[0]
    starts["parent B (seed 1), continued"] = parents[1]
    ensemble = otfx.ensemble(*parents)

    runs = {}
    for name, model in starts.items():
        runs[name] = R.finetune_best_lr(model, split, steps=steps, lrs=lrs, eval_at=eval_at,
                                        progress=f"finetune {name}")
        print(name, "lr", runs[name]["lr"], "test", runs[name]["test"][-1], flush=True)

    # ---- report
    parents_test = [test(m) for m in parents]
    ens_test = test(ensemble)
    fused = [n for n in runs if not n.startswith("parent")]
    best_parent = max(parents_test)
    best_continued = max(runs[n]["test"][-1] for n in runs if n.startswith("parent"))
    table2 = R.markdown_table(
        ["individual (as trained)", "ensemble", *(f"Ft. {n}" for n in fused), "Ft. parents (continued)"],
        [[R.fmt_list(parents_test), R.fmt_acc(ens_test),
          *(f"{R.fmt_acc(runs[n]['test'][-1])} ({100 * (runs[n]['test'][-1] - best_parent):+.2f})" for n in fused),
          R.fmt_list([runs[n]["test"][-1] for n in runs if n.startswith("parent")])]])
    detail = R.markdown_table(
        ["model", "choice (val)", "lr (val)", "one-shot val", "one-shot test", f"val after {steps}",
         f"test after {steps}", "best test on the way (step)"],
        [[n, choices.get(n, "-"), f"{r['lr']:g}", R.fmt_acc(r["val"][0]), R.fmt_acc(r["test"][0]),
          R.fmt_acc(r["val"][-1]), R.fmt_acc(r["test"][-1]),
          f"{R.fmt_acc(max(r['test']))} ({r['steps'][r['test'].index(max(r['test']))]})"] for n, r in runs.items()])
    curve = R.markdown_table(["step", *runs], [[s, *(R.fmt_acc(runs[n]["test"][i]) for n in runs)]
                                               for i, s in enumerate(runs[next(iter(runs))]["steps"])])
    R.line_plot(out / "finetune_curves.png", {n: (r["steps"], [100 * a for a in r["test"]]) for n, r in runs.items()},
                refs={"ensemble": 100 * ens_test, "best parent (as trained)": 100 * best_parent},
                xlabel="finetuning steps", ylabel="test accuracy (%)",
                title=f"Finetuning for {steps} steps ({100 * steps / parent_steps:.1f}% of a parent's training; "
                      "cf. Fig. 12)")
    R.line_plot(out / "finetune_curves_zoom.png",
                {n: (r["steps"][1:], [100 * a for a in r["test"][1:]]) for n, r in runs.items()},
                refs={"ensemble": 100 * ens_test, "best parent (as trained)": 100 * best_parent},
                xlabel="finetuning steps", ylabel="test accuracy (%)", title="The same, from the first checkpoint on")

    best_fused = max(fused, key=lambda n: runs[n]["val"][-1])
    ot = [n for n in fused if n.startswith("OT")]
    best_ot = max(ot, key=lambda n: runs[n]["val"][-1])
    claims = [
        (f"finetuned OT fusion (best on val: {best_ot}) beats the parents as trained (Table 2)",
         runs[best_ot]["test"][-1] > best_parent),
        ("finetuned OT fusion beats the parents continued for the same steps",
         runs[best_ot]["test"][-1] > best_continued),
        ("finetuned OT fusion beats finetuned vanilla fusion", runs[best_ot]["test"][-1] > runs["vanilla"]["test"][-1]),
        ("the ensemble stays ahead of finetuned fusion", ens_test > runs[best_ot]["test"][-1]),
        ("OT fusion recovers faster than vanilla fusion (higher test accuracy at the first checkpoint)",
         runs[best_ot]["test"][1] > runs["vanilla"]["test"][1]),
    ]
    body = "\n".join([
        f"Parents: seeds 0 and 1 of experiment 1 ({split.name}, {spec.hidden}/{spec.mlp}/{spec.layers}, "
        f"{spec.epochs:g} epochs = {parent_steps} steps of batch 128). Finetuning: {steps} steps "
        f"({100 * steps / parent_steps:.1f}% of a parent's training) of AdamW with 10% warm-up and cosine decay, "
        f"lr from {', '.join(f'{x:g}' for x in lrs)} chosen per model on the final validation accuracy; every model "
        "sees the same batches. The parents are continued with the same recipe from where they stopped. "
        f"Fusion choices on validation: Sinkhorn reg from {', '.join(f'{r:g}' for r in regs)}, token filter "
        "(activations) from all / window_2. Accuracy in %.", "",
        "## Table 2 (test accuracy; in brackets: the gain over the best parent as trained)", "", table2, "",
        "![finetuning curves](finetune_curves.png)", "", "![zoom](finetune_curves_zoom.png)", "",
        "## Details", "", detail, "", "## Test accuracy along the way", "", curve, "",
        "## What reproduces", "",
        *(f"- {'reproduces' if ok else '**does not reproduce**'}: {text}" for text, ok in claims), "",
        f"Best fused model on validation after finetuning: {best_fused}. Paper, Table 2 (CIFAR-100, 2 models): parents "
        "64.94 / 64.66, ensemble 68.04, Ft. VF 64.91, Ft. OT-wts 65.80, Ft. OT-acts 65.35; there the parents are "
        "*not* trained further, here they are also shown continued for the same steps.",
    ])
    seconds = time.perf_counter() - t_start
    R.write_markdown(out / "README.md", "Finetuning fused ViTs (Table 2, Fig. 12)", command, body, seconds)
    R.write_json(out / "results.json", {"runs": runs, "choices": choices, "parents_test": parents_test,
                                        "ensemble_test": ens_test, "steps": steps, "parent_steps": parent_steps,
                                        "seconds": seconds})
    print(f"wrote {out / 'README.md'} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
