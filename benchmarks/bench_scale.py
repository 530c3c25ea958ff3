"""Streaming fusion at scale: a Llama-shaped pair written to disk as sharded bf16 safetensors (a model and a
permuted noisy copy), fused by ``otfx.stream.fuse_checkpoints``; wall time, peak RSS of the fusing process
(from the OS: ``resource.getrusage`` of the child) and per-stage seconds; the output must load with
``from_pretrained``; on a small shape, fusing the model with its exact permuted copy by EMD must return it.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --work DIR`` (default shape:
hidden 3072, 28 layers, MLP 8192, 24 heads / 8 kv heads: ~3B parameters per model); ``--shape small`` for a
quick run. Results: ``benchmarks/results/bench_scale[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "3b": {"hidden": 3072, "layers": 28, "mlp": 8192, "heads": 24, "kv_heads": 8, "vocab": 32000},
    "1b": {"hidden": 2048, "layers": 16, "mlp": 5632, "heads": 16, "kv_heads": 4, "vocab": 32000},
    "small": {"hidden": 512, "layers": 4, "mlp": 1408, "heads": 8, "kv_heads": 2, "vocab": 4096},
}


def _config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=256,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")


def make_pair(shape: dict, work: Path, noise: float, shard: str) -> None:
    """Model A (random init, bf16) and B = a random symmetry of A plus noise, both saved sharded. B is made
    tensor by tensor from A's checkpoint with the permutations otfx infers, so A is never copied in memory."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    import otfx
    from otfx.stream import INDEX, meta_model
    from otfx.symmetry import space_permutations

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: no float32 copy of the whole model
    model = LlamaForCausalLM(_config(shape))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(work / "a", max_shard_size=shard)
    del model
    meta = meta_model(work / "a")
    inference = otfx.analyse(otfx.trace(meta, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), meta=True))
    perms = space_permutations(inference, seed=1)
    index_file = work / "a" / INDEX
    index = json.loads(index_file.read_text())["weight_map"] if index_file.is_file() else {"": "model.safetensors"}
    (work / "b").mkdir()
    g = torch.Generator().manual_seed(2)
    from safetensors.torch import save_file

    for file in sorted(set(index.values())):
        out = {}
        with safe_open(work / "a" / file, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                for axis, sid in enumerate(inference.param_axes.get(name, [])):
                    p = perms.get(inference.coarse(sid))
                    if p is not None:
                        t = t.index_select(axis, p)
                if noise and t.is_floating_point() and t.numel() > 1:
                    t = (t.float() + torch.randn(t.shape, generator=g) * noise * t.float().std()).to(t.dtype)
                out[name] = t.contiguous()
        save_file(out, work / "b" / file, metadata={"format": "pt"})
    for item in (work / "a").iterdir():
        if not (work / "b" / item.name).exists():
            shutil.copy2(item, work / "b" / item.name)


def fuse_pair(work: Path, solver: str, shard: str) -> dict:
    from otfx.stream import fuse_checkpoints

    start = time.perf_counter()
    out = fuse_checkpoints(work / "a", work / "b", work / "fused", solver=solver, overwrite=True, shard_size=shard)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "timings": report["timings"]}


def check_output(work: Path, exact: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(work / "fused", torch_dtype=torch.bfloat16)
    result = {"loads": True, "params": sum(p.numel() for p in fused.parameters())}
    if exact:
        a = AutoModelForCausalLM.from_pretrained(work / "a", torch_dtype=torch.bfloat16)
        diff = max(float((p.float() - q.float()).abs().max()) for p, q in zip(fused.parameters(), a.parameters()))
        result["max_param_diff_vs_a"] = diff
    return result


def child(step: str, args: argparse.Namespace) -> dict:
    """Run one step in a fresh process; its peak RSS comes from the OS (the child's own getrusage, read as it
    ends: the maximum over children would be the largest step's)."""
    cmd = [sys.executable, __file__, "--worker", step, "--work", str(args.work), "--shape", args.shape,
           "--solver", args.solver, "--noise", str(args.noise), "--shard", args.shard]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["step_wall_s"] = time.perf_counter() - start
    return result


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("bench_scale_work"), help="scratch folder (large)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--solver", default="sinkhorn_torch")
    parser.add_argument("--noise", type=float, default=0.5, help="noise of B, x each tensor's std (0: exact copy)")
    parser.add_argument("--shard", default="2GB", help="shard size of inputs and output")
    parser.add_argument("--tag", default="")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        shape = SHAPES[args.shape]
        result = {"make": lambda: make_pair(shape, args.work, args.noise, args.shard) or {},
                  "fuse": lambda: fuse_pair(args.work, args.solver, args.shard),
                  "check": lambda: check_output(args.work, exact=args.noise == 0 and args.solver in ("emd", "lsa"))
                  }[args.worker]()
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps(result))
        return
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    record = {"shape": args.shape, **SHAPES[args.shape], "solver": args.solver, "noise": args.noise,
              "shard": args.shard, "threads": os.environ.get("OMP_NUM_THREADS")}
    record["make"] = child("make", args)
    record["checkpoint_mb"] = _bytes(args.work / "a") / 2**20
    record["fuse"] = child("fuse", args)
    record["fuse"]["peak_rss_x_checkpoint"] = record["fuse"]["peak_rss_mb"] / record["checkpoint_mb"]
    record["check"] = child("check", args)
    out = Path(__file__).parent / "results" / f"bench_scale{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
