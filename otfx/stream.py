"""Stage 5, streamed: fuse two checkpoints on disk without holding either model in memory.

The models are built and traced on the meta device (shapes only); the map graph is evaluated as in ``fuse``,
reading each tensor from the checkpoints' safetensors when it is needed, and every fused tensor is blended and
handed to the output shard at once. The output is an HF folder (sharded safetensors with mergekit's and
``save_pretrained``'s index, config and tokenizer files copied from the anchor), written atomically.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from otfx.align.config import FusionConfig, FusionError
from otfx.align.maps import TransportMaps
from otfx.align.match import check_same_architecture
from otfx.align.rewrite import rewrite_params
from otfx.api import analyse
from otfx.conventions import tied_groups
from otfx.fuse import _blend_into
from otfx.io.output import atomic_dir
from otfx.io.report import write_report
from otfx.trace import trace

INDEX = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.index\.json$")


class Checkpoint(Mapping):
    """The tensors of an HF folder's safetensors (one file or shards with an index), read one at a time from
    memory-mapped files; ``aliases`` maps a parameter name to the stored name of its tied group."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
        else:
            raise FusionError(f"{self.folder}: no model.safetensors or {INDEX}; streaming fusion reads safetensors "
                              "checkpoints (save the model with save_pretrained)")
        self.aliases: dict[str, str] = {}
        self._open: dict[Path, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.aliases.get(name, name)
        if stored not in self.files:
            raise KeyError(name)
        path = self.files[stored]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def resolve_tied(self, groups: list[list[str]]) -> None:
        """Let every name of a tied group read the one the checkpoint stores."""
        for group in groups:
            stored = [n for n in group if n in self.files]
            for name in group:
                if name not in self.files and stored:
                    self.aliases[name] = stored[0]


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``shard_bytes`` (a tensor larger than that gets a
    shard of its own) and writes the index, as ``save_pretrained`` names them."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[dict[str, int]] = []  # per written shard: name -> bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append({k: v.numel() * v.element_size() for k, v in self.pending.items()})
        self.pending, self.size = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / "shard-00000.tmp").rename(self.folder / "model.safetensors")
            return [self.folder / "model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map, total = {}, 0
        for i, (shard, name) in enumerate(zip(self.shards, names)):
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / name)
            weight_map.update(dict.fromkeys(shard, name))
            total += sum(shard.values())
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2) + "\n")
        return [self.folder / name for name in names]


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not match:
        raise FusionError(f"shard size {text!r}: use e.g. 5GB, 500MB or a number of bytes")
    value, unit = float(match.group(1)), match.group(2).rstrip("b")
    factor = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    if unit not in factor or value <= 0:
        raise FusionError(f"shard size {text!r}: use e.g. 5GB, 500MB or a number of bytes")
    return int(value * factor[unit])


def meta_model(folder: str | Path) -> torch.nn.Module:
    """The model class an HF folder's config names, built on the meta device (no weights in memory)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FusionError(f"{folder} is not a Hugging Face model folder: {str(err).splitlines()[0]}") from err
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise FusionError(f"{folder}: config.json names no transformers model class (architectures={names})")
    with torch.device("meta"):
        model = cls(config)
    return model.eval()


def _example(model: torch.nn.Module) -> tuple:
    config = model.config
    if getattr(config, "vocab_size", None):
        return (torch.zeros(1, 8, dtype=torch.long, device="meta"),)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", 3)
    if size:
        return (torch.zeros(1, channels, size, size, device="meta"),)
    raise FusionError(f"{type(model).__name__}: pass example_inputs=(...) (meta-device tensors) for streaming fusion")


def fuse_checkpoints(anchor: str | Path, other: str | Path, out: str | Path, *, weights=None,
                     shard_size: str | int = "5GB", overwrite: bool = False, example_inputs: tuple | None = None,
                     **options) -> Path:
    """Fuse two HF checkpoint folders into ``out`` by streaming (``otfx.fuse``'s weights-based fusion, the same
    numbers: the result equals ``fuse`` on the loaded models bit for bit). ``options``: those of ``fuse``."""
    config = FusionConfig(weights=tuple(weights) if weights is not None else None, **options)
    if config.cost != "weights" or config.residual.startswith("weighted"):
        raise FusionError("streaming fusion reads no activations: use cost='weights' and a residual policy other "
                          "than the weighted ones, or fuse the loaded models with otfx.fuse")
    config.validate(2, has_data=False)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    readers = [Checkpoint(anchor), Checkpoint(other)]
    models = [meta_model(anchor), meta_model(other)]
    args = example_inputs or _example(models[0])
    inferences = [analyse(trace(m, args, name=f"{Path(f).name} (meta)")) for m, f in zip(models, (anchor, other))]
    check_same_architecture(*inferences)
    for reader, model in zip(readers, models):
        reader.resolve_tied(tied_groups(model))
    timings["trace_and_infer"] = time.perf_counter() - start
    w = config.model_weights(2)
    groups = {name: g for g in tied_groups(models[0]) for name in g}
    with atomic_dir(out, overwrite, inputs=[anchor, other], command="otfx.stream.fuse_checkpoints") as tmp:
        writer = ShardWriter(tmp, parse_size(shard_size))
        written: set[str] = set()
        maps = TransportMaps(*inferences, config, params_anchor=readers[0], params_other=readers[1])
        maps.release = True

        def sink(fqn: str, value: torch.Tensor) -> None:
            base = readers[0][fqn]
            dest = torch.empty_like(base)
            _blend_into(dest, None, base, w[0], value, w[1])
            for name in groups.get(fqn, [fqn]):
                if name in readers[0].files:
                    writer.add(name, dest)
                    written.add(name)

        with torch.no_grad():
            rewrite_params(maps, sink)
        for name in readers[0].files:  # buffers and anything else the anchor stores, as it is
            if name not in written:
                writer.add(name, readers[0][name])
        writer.close()
        for item in Path(anchor).iterdir():
            if item.is_file() and not _WEIGHT_FILE.match(item.name) and item.name not in ("report.json",) \
                    and not item.name.startswith(".otfx"):
                shutil.copy2(item, tmp / item.name)
        timings.update({k: round(v, 4) for k, v in maps.timings.items()})
        timings["total"] = time.perf_counter() - start
        write_report({"config": vars(config), "streamed": True, "models": [str(anchor), str(other)],
                      "maps": [vars(s) for s in maps.stats], "timings": timings}, tmp / "report.json")
    return Path(out)
