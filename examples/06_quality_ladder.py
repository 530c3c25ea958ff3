"""Experiment 6: an ablation ladder of one-shot fusion quality on digits and Fashion-MNIST ViT pairs.

Rungs, each adding one thing to the one before: the paper's method (weights cost, and its activations cost) ->
+ fixed activations (correlation cost over every writer of the shared residual stream) -> + REPAIR (unit
statistics reset to the parents' mean, folded into the weights) -> + anchor-free (MergeMany over hard maps,
then REPAIR). Both anchor orders of one pair per dataset. Every choice (Sinkhorn reg) is made on the
validation split; the test split is only reported. A diagnosis table on digits measures what was wrong with the
activations cost (which node is read, normalisation, how the stream's writers are combined), with and
without REPAIR. Writes docs/results/06_quality/{README.md,results.json}.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common, however this file is loaded

from common import runner as R  # noqa: E402
from common.data import load_digits_split  # noqa: E402
from common.train import evaluate_accuracy  # noqa: E402

import otfx  # noqa: E402
from otfx.align import config as _config  # noqa: E402
from otfx.align.barycentre import anchor_free_fuse  # noqa: E402
from otfx.align.costs import correlation  # noqa: E402
from otfx.align.repair import repair  # noqa: E402

NAME = "06_quality"
TITLE = "One-shot fusion quality: an ablation ladder"
REGS = (0.02, 0.06, 0.12, 0.25, 0.5)
UNIFORM = 1000.0  # a Sinkhorn reg at which every plan is uniform: the uninformative limit
SAMPLES = 256  # unlabelled training images: activation costs and REPAIR's calibration set
EXAMPLE_BATCH = 64
if "correlation" not in _config.COSTS:  # until FusionConfig reads the cost registry
    _config.COSTS = (*_config.COSTS, "correlation")

PAPER_W = {"cost": "weights"}
PAPER_A = {"cost": "activations"}
FIXED = {"cost": "correlation", "residual": "shared"}
DIAGNOSIS = {  # name: (fuse options, correlation-provider settings)
    "activations (paper: Euclidean, one node per class), residual mean": ({"cost": "activations"}, {}),
    "activations (paper), residual shared: stream read at the patch embedding only": (
        {"cost": "activations", "residual": "shared"}, {}),
    "correlation, residual mean (each writer its own map, maps averaged)": ({"cost": "correlation"}, {}),
    "correlation, shared stream read before each norm": (FIXED, {"stream": "norms"}),
    "correlation, shared stream from all writers, MLP pre-GELU": (FIXED, {"post_nonlinearity": False}),
    "correlation, shared stream from all writers, MLP post-GELU (the fix)": (FIXED, {}),
    "weights (paper), residual mean": (PAPER_W, {}),
    "weights, residual shared": ({"cost": "weights", "residual": "shared"}, {}),
}


def provider(**settings) -> None:
    """Set the correlation provider's reading rules (defaults restored first)."""
    correlation.CorrelationCost.stream = settings.get("stream", "writers")
    correlation.CorrelationCost.post_nonlinearity = settings.get("post_nonlinearity", True)


class Pair:
    """Two (or more) parents in one order, with what every rung needs: traced models, data, scorers."""

    def __init__(self, models, split, data):
        self.models = models
        self.traced = [otfx.trace(m, (split.x_train[:EXAMPLE_BATCH],)) for m in models]
        self.data = data
        self.val, self.test = R.accuracy_of(split, "val"), R.accuracy_of(split, "test")
        self.x_test = split.x_test
        self.predictions = [predictions(m, split.x_test) for m in models]
        self._aligned = None

    def scores(self, model) -> dict:
        """Test accuracy and the share of test predictions equal to the anchor's and to the other parent's."""
        return {"test": self.test(model), "agree_anchor": evaluate_accuracy(model, self.x_test, self.predictions[0]),
                "agree_other": evaluate_accuracy(model, self.x_test, self.predictions[1])}

    @property
    def aligned(self):
        """The parents in the anchor's spaces (hard, function-preserving): REPAIR's statistics targets."""
        if self._aligned is None:
            self._aligned = [self.traced[0], *(otfx.align(t, to=self.traced[0]) for t in self.traced[1:])]
        return self._aligned

    def fuse(self, options: dict, reg):
        solver = {"solver": "emd"} if reg == "emd" else {"solver": "sinkhorn_torch", "reg": reg}
        data = self.data if options.get("cost", "weights") != "weights" else None
        # repair=False: the "plain" rows are the maps alone (fuse repairs by default when it is given data);
        # the "repair" rows repair the same fused model explicitly
        return otfx.fuse(*self.traced, data=data, repair=False, **solver, **options).eval()

    def choose(self, options: dict, regs: Sequence = REGS, keep: Sequence = ()) -> dict:
        """Fuse with each reg, without and with REPAIR (of the same fused model); for each, keep the reg that is
        best on validation and report the test accuracy of that one only (and of the regs in ``keep``)."""
        t0 = time.perf_counter()
        rows = {"plain": [], "repair": []}
        for reg in regs:
            model = self.fuse(options, reg)
            rows["plain"].append({"reg": reg, "val": self.val(model), "model": model})
            fixed = repair(model, self.traced, self.data, aligned=self.aligned).eval()
            rows["repair"].append({"reg": reg, "val": self.val(fixed), "model": fixed})
        out = {}
        for kind, tried in rows.items():
            best = max(tried, key=lambda r: r["val"])
            out[kind] = {"reg": best["reg"], "val": best["val"], **self.scores(best["model"]),
                         "sweep": {str(r["reg"]): r["val"] for r in tried},
                         "kept": {str(r["reg"]): self.test(r["model"]) for r in tried if r["reg"] in keep}}
        out["seconds"] = time.perf_counter() - t0
        return out

    def anchor_free(self, with_repair: bool) -> dict:
        t0 = time.perf_counter()
        model = anchor_free_fuse(*self.traced).eval()
        if with_repair:
            model = repair(model, model.otfx_aligned, self.data, args=self.traced[0].args,
                           aligned=model.otfx_aligned).eval()
        return {"reg": "emd", "val": self.val(model), **self.scores(model), "seconds": time.perf_counter() - t0,
                "sweeps": model.otfx_report["anchor_free"]["sweeps"] if hasattr(model, "otfx_report") else None}


def predictions(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        outs = [model.eval()(pixel_values=x[i:i + batch]).logits.argmax(-1) for i in range(0, len(x), batch)]
    return torch.cat(outs)


RUNGS = ("paper: weights", "paper: activations", "+ fixed activations", "+ repair", "+ anchor-free")


def ladder(pair: Pair, short: bool = False) -> dict:
    provider()
    if short:  # the main rungs only (4 models)
        weights, fixed = pair.choose(PAPER_W), pair.choose(FIXED)
        out = {"paper: weights": weights["plain"], "+ fixed activations": fixed["plain"], "+ repair": fixed["repair"],
               "+ anchor-free": pair.anchor_free(True), "weights + repair": weights["repair"]}
        for k, v in out.items():
            print(f"  {k}: val {100 * v['val']:.2f} test {100 * v['test']:.2f} (reg {v['reg']})", flush=True)
        return out
    weights, acts, fixed = pair.choose(PAPER_W), pair.choose(PAPER_A), pair.choose(FIXED)
    uniform = pair.choose(FIXED, (UNIFORM,))
    out = {
        "paper: weights": weights["plain"],
        "paper: activations": acts["plain"],
        "+ fixed activations": fixed["plain"],
        "+ repair": fixed["repair"],
        "+ anchor-free": pair.anchor_free(True),
        "weights + repair": weights["repair"],
        "paper activations + repair": acts["repair"],
        "anchor-free, no repair": pair.anchor_free(False),
        "uniform plans": uniform["plain"],
        "uniform plans + repair": uniform["repair"],
    }
    for k, v in out.items():
        print(f"  {k}: val {100 * v['val']:.2f} test {100 * v['test']:.2f} (reg {v['reg']}); agreement "
              f"{100 * v['agree_anchor']:.1f} / {100 * v['agree_other']:.1f}", flush=True)
    return out


def diagnose(pair: Pair) -> dict:
    out = {}
    for name, (options, settings) in DIAGNOSIS.items():
        provider(**settings)
        out[name] = pair.choose(options, ("emd", *REGS), keep=("emd",))
        print(f"  {name}: test {100 * out[name]['plain']['test']:.2f} / repaired "
              f"{100 * out[name]['repair']['test']:.2f}", flush=True)
    provider()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = R.example_parser(__doc__, NAME)
    p.add_argument("--pair", default="0,1", help="parent seeds, anchor first (default 0,1; e.g. 0,1,2,3: the main "
                   "rungs only, no diagnosis)")
    p.add_argument("--datasets", default="digits,fashion-mnist", help="comma-separated (default both)")
    p.add_argument("--render", action="store_true", help="only rewrite README.md from an existing results.json")
    args = p.parse_args(argv)
    if args.render:
        out = R.output_dir(args, NAME)
        results = json.loads((out / "results.json").read_text())
        seeds = [int(s) for s in args.pair.split(",")]
        R.write_markdown(out / "README.md", TITLE, results["command"], page(results, seeds), results.get("seconds"))
        return 0
    t_start = time.perf_counter()
    command = R.command_line()
    out = R.output_dir(args, NAME)
    seeds = [int(s) for s in args.pair.split(",")]
    wanted = args.datasets.split(",")
    setups = {}
    if args.smoke:
        setups["digits"] = R.image_setup(True)
    else:
        if "digits" in wanted:
            setups["digits"] = (load_digits_split(), R.ViTSpec("digits", epochs=30))
        if "fashion-mnist" in wanted:
            setups["fashion-mnist"] = R.image_setup(False)
    results: dict = {"command": command, "environment": R.environment(), "regs": REGS, "samples": SAMPLES}
    for ds, (split, spec) in setups.items():
        parents = [R.vit_parent(split, spec, s, progress=False) for s in seeds]
        accs = [R.accuracy_of(split, "test")(m) for m in parents]
        data = R.activation_data(split.x_train, SAMPLES)
        entry: dict = {"parents_test": accs, "parents_val": [R.accuracy_of(split, "val")(m) for m in parents]}
        for order in (seeds, seeds[::-1]):
            print(f"{ds}, order {order}", flush=True)
            pair = Pair([parents[seeds.index(s)] for s in order], split, data)
            entry[f"order {order}"] = ladder(pair, short=len(seeds) > 2)
            if ds == "digits" and order == seeds and not args.smoke and len(seeds) == 2:
                entry["diagnosis"] = diagnose(pair)
        vanilla = otfx.vanilla_fuse(*parents).eval()
        entry["vanilla_test"] = R.accuracy_of(split, "test")(vanilla)
        entry["ensemble_test"] = R.accuracy_of(split, "test")(otfx.ensemble(*parents).eval())
        results[ds] = entry
    seconds = results["seconds"] = time.perf_counter() - t_start
    R.write_json(out / "results.json", results)
    R.write_markdown(out / "README.md", TITLE, command, page(results, seeds), seconds)
    print(f"wrote {out / 'README.md'} in {seconds:.0f} s")
    return 0


def page(results: dict, seeds: list[int]) -> str:
    parts = []
    orders = [f"order {seeds}", f"order {seeds[::-1]}"]
    headers = ["rung", *(f"{ds} {o.removeprefix('order ')}" for ds in results if isinstance(results[ds], dict)
                         and "parents_test" in results[ds] for o in orders)]
    datasets = [ds for ds in results if isinstance(results[ds], dict) and "parents_test" in results[ds]]
    rows = []
    first = results[datasets[0]][orders[0]]
    rungs = [r for r in RUNGS if r in first]
    controls = [r for r in ("weights + repair", "paper activations + repair", "anchor-free, no repair",
                            "uniform plans", "uniform plans + repair") if r in first]
    agree = []
    for rung in (*rungs, *controls):
        cells = []
        for ds in datasets:
            for o in orders:
                r = results[ds][o][rung]
                cells.append(f"{100 * r['agree_anchor']:.1f} / {100 * r['agree_other']:.1f}")
        agree.append([rung, *cells])
    for rung in (*rungs, *controls):
        cells = []
        for ds in datasets:
            mean_parent = sum(results[ds]["parents_test"]) / len(results[ds]["parents_test"])
            for o in orders:
                r = results[ds][o][rung]
                cells.append(f"{100 * r['test']:.2f} ({100 * r['test'] / mean_parent:.0f}%; reg {r['reg']})")
        rows.append([rung, *cells])
    ref = []
    for ds in datasets:
        e = results[ds]
        ref.append([ds, R.fmt_list(e["parents_test"]), R.fmt_acc(e["ensemble_test"]), R.fmt_acc(e["vanilla_test"])])
    parts.append("Test accuracy in % (in brackets: % of the mean parent's test accuracy, and the Sinkhorn reg chosen "
                 f"on validation from {list(REGS)}; `emd`: hard maps). Parents seeds {seeds}, both anchor orders "
                 f"(anchor first). Activation costs and REPAIR read {SAMPLES} unlabelled training images.\n")
    parts.append(R.markdown_table(headers, rows))
    parts.append("\nAgreement of the fused model's test predictions with the anchor's / the other parent's (%):\n")
    parts.append(R.markdown_table(headers, agree))
    parts.append("\nReferences (test %):\n")
    parts.append(R.markdown_table(["dataset", "parents", "ensemble", "vanilla"], ref))
    parts.append("""
Rungs: **paper: weights** = `fuse(cost="weights")` (residual `mean`, cross-head, untied q/k, Sinkhorn);
**paper: activations** = `fuse(cost="activations")` (Euclidean distance of standardised activations at one node per
class); **+ fixed activations** = `fuse(cost="correlation", residual="shared")`: one map for the residual stream
from the correlations of all its writers' outputs (1 - Pearson correlation, averaged over nodes), MLP units read
after GELU; **+ repair** = that, then `otfx.align.repair.repair` with the parents hard-aligned to the anchor as
statistics targets; **+ anchor-free** = `otfx.align.barycentre.anchor_free_fuse` (MergeMany, weights cost, EMD:
hard maps) then REPAIR; **weights + repair**, **paper activations + repair** and **anchor-free, no repair** are
controls. REPAIR rows choose their reg on validation *with* REPAIR applied.
""")
    parts.append(findings(results, datasets, orders))
    diag = results.get("digits", {}).get("diagnosis")
    if diag:
        parts.append(f"\n## Diagnosis of the activations cost (digits, order {seeds})\n")
        parts.append("Test accuracy with hard maps (EMD) and at the Sinkhorn reg (or EMD) chosen on validation, "
                     "without and with REPAIR:\n")
        drows = [[name, R.fmt_acc(d["plain"]["kept"]["emd"]), R.fmt_acc(d["repair"]["kept"]["emd"]),
                  f"{100 * d['plain']['test']:.2f} ({d['plain']['reg']})",
                  f"{100 * d['repair']['test']:.2f} ({d['repair']['reg']})"] for name, d in diag.items()]
        parts.append(R.markdown_table(["variant", "EMD", "EMD + REPAIR", "best on val", "best on val + REPAIR"],
                                      drows))
    return "\n".join(parts)


def findings(results: dict, datasets: list[str], orders: list[str]) -> str:
    """What the tables say, computed from them (so the text stays true when the numbers change)."""
    lines = ["\n## Findings (computed from the tables above)\n"]

    def t(ds: str, o: str, rung: str) -> float:
        return 100 * results[ds][o][rung]["test"]

    for ds in datasets:
        mean_parent = 100 * sum(results[ds]["parents_test"]) / len(results[ds]["parents_test"])
        first = results[ds][orders[0]]
        for rung, other in (("+ fixed activations", "paper: weights"), ("+ repair", "weights + repair")):
            if rung in first and other in first:
                wins = [t(ds, o, rung) >= t(ds, o, other) for o in orders]
                lines.append(f"- {ds}: `{rung}` >= `{other}` in {sum(wins)} of {len(orders)} anchor orders ("
                             + ", ".join(f"{t(ds, o, rung):.2f} vs {t(ds, o, other):.2f}" for o in orders) + ").")
        for rung in ("paper: weights", "+ repair", "weights + repair", "+ anchor-free"):
            if rung in first:
                values = [t(ds, o, rung) for o in orders]
                keeps = ", ".join(f"{v / mean_parent * 100:.0f}%" for v in values)
                lines.append(f"- {ds}: `{rung}` spread over anchor orders {max(values) - min(values):.2f} points; "
                             f"keeps {keeps} of the mean parent.")
        if "uniform plans + repair" in first:
            gaps = [t(ds, o, "+ repair") - t(ds, o, "uniform plans + repair") for o in orders]
            verdict = ("most of REPAIR's gain is not an alignment gain here" if max(abs(g) for g in gaps) < 3
                       else "the alignment adds to what REPAIR recovers")
            lines.append(f"- {ds}: `+ repair` minus REPAIR of *uniform* plans (no alignment information at all): "
                         + ", ".join(f"{g:+.2f}" for g in gaps) + f" points: {verdict}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
