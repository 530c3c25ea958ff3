"""Sweep otfx over the model classes transformers (and timm) can build from a config, with tiny configs.

For each architecture: build two seeds, trace, inference coverage, random_symmetry (outputs within 1e-5 and
the weight matrices really moved), recovery of A from a symmetry of A by EMD, align of B to A by EMD keeps B's
function, fuse of two seeds runs, and (with ``--onnx``) ONNX export and onnxruntime parity. Writes a JSON file
and a markdown table (architecture x stage, each failure with its reason in one line).

    OMP_NUM_THREADS=1 python benchmarks/zoo_sweep.py --out docs/zoo.md --json benchmarks/results/zoo_sweep.json
    python benchmarks/zoo_sweep.py --only bert,llama,roberta --onnx     # a few, with ONNX
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import otfx  # noqa: E402
from otfx.trace import main_output  # noqa: E402

torch.set_num_threads(1)

STAGES = ["build", "trace", "coverage", "symmetry", "recovery", "align", "fuse", "onnx"]
VOCAB, SEQ, IMAGE = 97, 8, 32
#: config fields shrunk wherever a config has them (generic, never per model)
TINY = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32, "embedding_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "ffn_dim": 64,
    "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "n_inner": 64, "hidden_dim": 64, "d_ff": 64, "d_kv": 8,
    "head_dim": 8, "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "image_size": IMAGE,
    "patch_size": 8, "num_labels": 3, "type_vocab_size": 2, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "sep_token_id": 2, "cls_token_id": 1, "num_channels": 3, "max_window_layers": 2,
}
#: why a row still fails, where the cause was traced to the model's own code (shown under its reason)
WHY = {
    "mra": "without its CUDA kernel, transformers' MRA attention returns `torch.zeros_like(query)` "
           "(`mra2_attention`), so the attention output projection reads zeros: nothing ties its input order to "
           "the heads, and no weight or activation can recover it (the model's function does not depend on it)",
    "hrm_text": "HRM runs the same H and L layers several times in one forward (`H_cycles` x `L_cycles`), so each "
                "layer reads a stream that it also writes: no producer's input side can be aligned before its "
                "output, the cycle that `FusionError` names",
    "prophetnet": "its predict-stream relative positions (`get_predict_relative_pos_embeddings`) gather from rows "
                  "ordered (batch, seq, ngram, heads) and view them as (batch, ngram, heads, seq): the view mixes "
                  "the heads with the positions, so no permutation of the heads commutes with it and otfx keeps "
                  "those heads fixed (a correct refusal: symmetry, recovery, align and fuse pass)",
    "xlnet": "XLNet's q, k, v, o and r are [d_model, heads, head_dim] parameters read by einsum, so one parameter "
             "produces the heads and the head dim as two axes, with no flattened heads x head_dim axis between "
             "them: each class's rows span the other's axis (read from the inferred parameter axes), a loop no "
             "producer can break. A heads x head_dim product made of two parameter axes is not yet a heads node of "
             "the map graph (not fixed)",
}
MAX_PARAMS = 1_500_000  # a config that stays larger than this could not be shrunk generically
HEADS = ["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
         "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"]
#: timm families, tiny widths (keyword names are timm's own)
TIMM = {
    "timm:vit": ("vit_tiny_patch16_224", {}), "timm:deit": ("deit_tiny_patch16_224", {}),
    "timm:beit": ("beit_base_patch16_224", {}), "timm:eva": ("eva02_tiny_patch14_224", {"patch_size": 8}),
    "timm:cait": ("cait_xxs24_224", {}), "timm:xcit": ("xcit_nano_12_p16_224", {}),
    "timm:pit": ("pit_ti_224", {}), "timm:swin": ("swin_tiny_patch4_window7_224", {}),
}


@dataclass
class Row:
    arch: str
    model_class: str = ""
    params: int = 0
    stages: dict = field(default_factory=dict)  # stage -> "ok" | "fail: reason" | "skip: reason"
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("time limit")


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:160]


def _outputs(model, args) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*args)).float()


# ---- building --------------------------------------------------------------------------------------------
def hf_candidates() -> dict[str, tuple[str, str]]:
    """model_type -> (head mapping, class name): a head model where one exists (logits, not the stream)."""
    from transformers.models.auto import modeling_auto as auto

    found: dict[str, tuple[str, str]] = {}
    for mapping in HEADS:
        for model_type, cls in getattr(auto, mapping).items():
            if isinstance(cls, str):
                found.setdefault(model_type, (mapping, cls))
    return dict(sorted(found.items()))


def _shrink(config) -> None:
    for key, value in TINY.items():
        if hasattr(config, key) and isinstance(getattr(config, key), int | type(None)):
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 - a read-only or derived field stays as it is
                pass
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            _shrink(getattr(config, sub))
    if hasattr(config, "use_cache"):
        config.use_cache = False


def _import(class_name: str) -> str | None:
    """Import a transformers class now; the reason it cannot be, else None."""
    import transformers

    try:
        getattr(transformers, class_name)
        return None
    except Exception as exc:  # noqa: BLE001 - recorded as the build failure
        return _reason(exc)


def build_hf(model_type: str, class_name: str, seed: int):
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    _shrink(config)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(100 + seed)
    if name == "pixel_values":
        size = getattr(config, "image_size", IMAGE)
        size = size if isinstance(size, int) else IMAGE
        args = (torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=g),)
    elif name == "input_ids":
        ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int) and 0 <= eos < VOCAB:  # sequence classifiers pool at the end-of-sequence token
            ids[:, -1] = eos
        args = (ids,)
    else:
        raise ValueError(f"main input {name!r} (not token ids or an image)")
    return model, args


def build_timm(name: str, extra: dict, seed: int):
    import timm

    torch.manual_seed(seed)
    kwargs = dict(pretrained=False, num_classes=3, img_size=IMAGE, embed_dim=32, depth=2, num_heads=4, **extra)
    if "patch_size" not in extra:
        kwargs["patch_size"] = 8
    if "swin" in name:
        kwargs.update(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=4)
        kwargs.pop("depth")
    if "pit" in name:
        kwargs = dict(pretrained=False, num_classes=3, img_size=IMAGE, patch_size=8, stride=4, base_dims=[8, 8],
                      depth=[1, 1], heads=[2, 4])
    model = timm.create_model(name, **kwargs).eval()
    return model, (torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(100 + seed)),)


# ---- one architecture ----------------------------------------------------------------------------------------
def run_one(arch: str, build, onnx: bool, timeout: int) -> Row:
    row = Row(arch)
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    stage = "build"
    try:
        a, args = build(0)
        b, _ = build(1)
        row.model_class, row.params = type(a).__name__, sum(p.numel() for p in a.parameters())
        if row.params > MAX_PARAMS:
            row.stages["build"] = f"skip: {row.params:,} parameters after shrinking the config"
            return row
        try:  # both, so that a model that changes itself on its first call (RWKV rescales) traces alike
            _outputs(a, args), _outputs(b, args)
        except Exception as exc:  # noqa: BLE001 - the tiny config itself cannot run (not otfx's doing)
            row.stages["build"] = f"skip: the model does not run at the tiny config: {_reason(exc)}"[:200]
            return row
        row.stages["build"] = "ok"
        stage = "trace"
        ta = otfx.trace(a, args)
        row.stages["trace"] = "ok"
        stage = "coverage"
        inference = otfx.analyse(ta)
        report = inference.coverage()
        row.notes["free_spaces"] = len(inference.free_spaces())
        row.stages["coverage"] = "ok" if not report else "fail: " + ", ".join(
            f"{op}{' (unknown)' if e['unknown'] else ''}{' conflicts' if e.get('conflicts') else ''}"
            for op, e in sorted(report.items()))[:160]
        stage = "symmetry"
        sym = otfx.random_symmetry(ta, seed=1)
        diff = float((_outputs(sym, args) - _outputs(a, args)).abs().max())
        state, moved_state = a.state_dict(), sym.state_dict()
        free = {k for k, axes in inference.param_axes.items()
                if any(not inference.is_fixed(leaf) for sid in axes for leaf in inference.leaves(sid))}
        mats = [k for k, v in state.items() if v.ndim >= 2 and min(v.shape) > 1 and k in free]
        row.notes["frozen_matrices"] = sum(1 for k, v in state.items() if v.ndim >= 2 and k not in free)
        moved = [k for k in mats if not torch.equal(moved_state[k], state[k])]
        row.notes["moved"] = f"{len(moved)}/{len(mats)}"
        ok = diff <= 1e-5 and len(moved) == len(mats)
        row.stages["symmetry"] = "ok" if ok else f"fail: output diff {diff:.1e}, moved {len(moved)}/{len(mats)}" + (
            f" (still: {', '.join(k for k in mats if k not in moved)[:80]})" if len(moved) < len(mats) else "")
        stage = "recovery"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = otfx.fuse(ta, otfx.trace(sym, args), solver="emd")
        err = max(float((fused.state_dict()[k].float() - v.float()).abs().max()) for k, v in state.items()
                  if v.is_floating_point() and v.numel())
        row.stages["recovery"] = "ok" if err <= 1e-4 else f"fail: parameters off by {err:.2e}"
        stage = "align"
        tb = otfx.trace(b, args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aligned = otfx.align(tb, to=ta, solver="emd")
        diff = float((_outputs(aligned, args) - _outputs(b, args)).abs().max())
        row.stages["align"] = "ok" if diff <= 1e-4 else f"fail: output diff {diff:.1e}"
        stage = "fuse"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            two = otfx.fuse(ta, tb)
        row.stages["fuse"] = "ok" if torch.isfinite(_outputs(two, args)).all() else "fail: non-finite outputs"
        stage = "onnx"
        if onnx:
            with tempfile.TemporaryDirectory() as tmp:
                path = otfx.export_onnx(a, args, Path(tmp) / "m.onnx")
                check = otfx.check_onnx(path, a, args)
            row.stages["onnx"] = "ok" if check.passed else (
                f"skip: {check.note}" if check.skipped else f"fail: max diff {check.max_abs_diff:.1e}")
        else:
            row.stages["onnx"] = "skip: not run (--onnx)"
    except Timeout:
        row.stages[stage] = f"fail: over the {timeout} s limit"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        row.stages[stage] = f"fail: {_reason(exc)}"
        if os.environ.get("ZOO_DEBUG"):
            traceback.print_exc()
    finally:
        signal.alarm(0)
        row.seconds = round(time.perf_counter() - start, 1)
    return row


# ---- report ----------------------------------------------------------------------------------------------
def _cell(value: str | None) -> str:
    if value is None:
        return ""
    return {"ok": "ok"}.get(value, "fail" if value.startswith("fail") else "skip")


def _passed(row: Row) -> bool:
    return all(row.stages.get(s) == "ok" for s in STAGES[:-1])


def _settled(row: Row) -> bool:
    """A build or trace failure (not a time limit): otfx's passes cannot change it, so a rerun keeps it."""
    return any(row.stages.get(s, "ok") != "ok" and "limit" not in row.stages[s] for s in ("build", "trace"))


def markdown(rows: list[Row], command: str) -> str:
    traced = [r for r in rows if r.stages.get("trace") == "ok"]
    full = [r for r in traced if all(r.stages.get(s) == "ok" for s in STAGES if not
                                     (s == "onnx" and r.stages.get(s, "").startswith("skip")))]
    lines = [
        "# The zoo sweep: otfx over transformers' and timm's config-instantiable architectures", "",
        f"Produced by `{command}` (tiny configs: hidden 32, 2 layers, 4 heads, vocab {VOCAB}; "
        "one CPU thread). Stages: trace, coverage (no op unknown or in conflict), symmetry (random_symmetry keeps "
        "outputs within 1e-5 and moves every weight matrix with a free space), recovery (fuse(A, symmetry of A, "
        "EMD) = A within 1e-4), align (align(B, to=A, EMD) keeps B's outputs within 1e-4), fuse (two seeds, "
        "finite), onnx (export + onnxruntime parity).", "",
        f"**{len(rows)} architectures tried; {len(traced)} trace; {len(full)} of those pass every stage run "
        f"({100 * len(full) / max(len(traced), 1):.0f}%).**", "",
        "| architecture | class | params | " + " | ".join(STAGES[1:]) + " | s |",
        "|---|---|---|" + "---|" * (len(STAGES) - 1) + "---|",
    ]
    for r in rows:
        cells = [_cell(r.stages.get(s)) for s in STAGES[1:]]
        if r.stages.get("build", "ok") != "ok":
            cells[0] = "skip" if r.stages["build"].startswith("skip") else "fail"
        lines.append(f"| {r.arch} | {r.model_class} | {r.params:,} | " + " | ".join(cells) + f" | {r.seconds} |")
    lines += ["", "## Reasons", ""]
    for r in rows:
        for s in STAGES:
            v = r.stages.get(s)
            if v and v != "ok" and not v.startswith("skip: not run"):
                lines.append(f"* **{r.arch}** {s}: {v[6:] if v.startswith('fail: ') else v}")
                if v.startswith("fail") and r.arch in WHY:
                    lines.append(f"  Why: {WHY[r.arch]}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated model types (and timm:NAME families)")
    parser.add_argument("--limit", type=int, default=0, help="first N architectures only")
    parser.add_argument("--onnx", action="store_true", help="also export to ONNX and check parity (slow)")
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per architecture")
    parser.add_argument("--rerun", help="a JSON file of an earlier sweep: rerun its rows that traced (or timed "
                        "out) but did not pass, keep the others")
    parser.add_argument("--all-traced", action="store_true", help="with --rerun: rerun every row that traced, "
                        "passing or not (after a change to the passes), and keep only the build and trace failures")
    parser.add_argument("--out", default="docs/zoo.md")
    parser.add_argument("--json", default="benchmarks/results/zoo_sweep.json")
    parser.add_argument("--max-gb", type=float, default=12.0, help="address-space limit of the sweep (GiB): an "
                        "architecture that needs more fails its stage with MemoryError instead of the machine "
                        "killing the sweep")
    opts = parser.parse_args(argv)
    if opts.max_gb:
        import resource

        limit = int(opts.max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    jobs = {t: (lambda seed, t=t, c=c: build_hf(t, c, seed)) for t, (_m, c) in hf_candidates().items()}
    imported = {}  # import every class before any time limit: an alarm inside an import breaks later imports
    for t, (_m, c) in hf_candidates().items():
        if not opts.only or t in opts.only.split(","):
            imported[t] = _import(c)
    if not opts.no_timm:
        jobs.update({k: (lambda seed, n=n, e=e: build_timm(n, e, seed)) for k, (n, e) in TIMM.items()})
    if opts.only:
        wanted = opts.only.split(",")
        jobs = {k: v for k, v in jobs.items() if k in wanted}
    if opts.limit:
        jobs = dict(list(jobs.items())[:opts.limit])
    earlier = {r["arch"]: Row(**r) for r in json.loads(Path(opts.rerun).read_text())} if opts.rerun else {}
    rows = []
    for i, (arch, build) in enumerate(jobs.items()):
        if arch in earlier and (_settled(earlier[arch]) or (_passed(earlier[arch]) and not opts.all_traced)):
            rows.append(earlier[arch])
            continue
        if imported.get(arch):
            row = Row(arch, stages={"build": f"fail: {imported[arch]}"})
        else:
            row = run_one(arch, build, opts.onnx, opts.timeout)
        rows.append(row)
        bad = {s: v for s, v in row.stages.items() if v != "ok"}
        print(f"[{i + 1}/{len(jobs)}] {arch}: {row.seconds}s {bad or 'ok'}", flush=True)
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    command = "python benchmarks/zoo_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(opts.out).write_text(markdown(rows, command.strip()))


if __name__ == "__main__":
    main()
