"""Stage 5, streamed: fuse two checkpoints on disk without holding either model in memory.

The models are built and traced on the meta device (shapes only); the map graph is evaluated as in ``fuse``,
reading each tensor from the checkpoints' safetensors when it is needed, and every fused tensor is blended and
handed to the output shard at once. The output is an HF folder (sharded safetensors with mergekit's and
``save_pretrained``'s index, config and tokenizer files copied from the anchor), written atomically.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from otfx.align.config import FusionConfig, FusionError
from otfx.align.maps import TransportMaps
from otfx.align.match import check_same_architecture
from otfx.align.orthogonal import StreamFallbackWarning
from otfx.align.rewrite import rewrite_params
from otfx.api import analyse
from otfx.conventions import tied_groups
from otfx.fuse import _blend_into
from otfx.io.output import atomic_dir
from otfx.io.report import write_report
from otfx.trace import trace

INDEX = "model.safetensors.index.json"
_FROM_NAME = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}  # safetensors' dtype names
_DTYPES = {dtype: name for name, dtype in _FROM_NAME.items()}
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.index\.json$")


class Checkpoint(Mapping):
    """The tensors of an HF folder's safetensors (one file or shards with an index), each read on its own with
    one read at the offset its header gives; ``aliases`` maps a parameter name to the stored name of its
    tied group. Not memory-mapped: pages of a mapped file count in the process's resident set, so reading
    through two mapped checkpoints grows it by their whole size (measured: 3.2x one checkpoint's size at 0.85B
    parameters), while read pages stay in the kernel's cache."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            files = sorted({self.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (self.folder / "model.safetensors").is_file():
            files = [self.folder / "model.safetensors"]
        else:
            raise FusionError(f"{self.folder}: no model.safetensors or {INDEX}; streaming fusion reads safetensors "
                              "checkpoints (save the model with save_pretrained)")
        #: stored name -> (file, absolute byte offset, bytes, shape, safetensors dtype)
        self.entries: dict[str, tuple[Path, int, int, tuple[int, ...], str]] = {}
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self.entries[name] = (path, 8 + size + start, end - start, tuple(info["shape"]), info["dtype"])
        self.files = {name: entry[0] for name, entry in self.entries.items()}
        self.aliases: dict[str, str] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.aliases.get(name, name)
        if stored not in self.entries:
            raise KeyError(name)
        path, offset, nbytes, shape, dtype = self.entries[stored]
        if dtype not in _FROM_NAME:
            raise FusionError(f"{path.name}: tensor {stored} has dtype {dtype}, which streaming fusion does not read")
        buffer = bytearray(nbytes)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            f.readinto(buffer)
        if not nbytes:
            return torch.empty(shape, dtype=_FROM_NAME[dtype])
        return torch.frombuffer(buffer, dtype=_FROM_NAME[dtype]).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype) of every stored tensor, from the headers."""
        return {name: (entry[3], entry[4]) for name, entry in self.entries.items()}

    def resolve_tied(self, groups: list[list[str]]) -> None:
        """Let every name of a tied group read the one the checkpoint stores."""
        for group in groups:
            stored = [n for n in group if n in self.files]
            for name in group:
                if name not in self.files and stored:
                    self.aliases[name] = stored[0]


class ShardWriter:
    """Safetensors shards laid out in advance from the names, shapes and dtypes of the output (the anchor's
    checkpoint), so that each tensor is written to its place in its shard as soon as it is known and nothing
    is held back; at most ``shard_bytes`` of data per shard (a larger tensor gets a shard of its own)."""

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], str]], shard_bytes: int):
        self.folder = folder
        groups: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in specs.items():
            nbytes = _nbytes(shape, dtype)
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        n = len(groups)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                            for i in range(n)]
        self.where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, byte offset, bytes)
        self.total = 0
        for file_name, names in zip(self.names, groups):
            header, offset = {}, 0
            for name in names:
                shape, dtype = specs[name]
                nbytes = _nbytes(shape, dtype)
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = folder / file_name
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(8 + len(raw) + offset)
            for name in names:
                start, end = header[name]["data_offsets"]
                self.where[name] = (path, 8 + len(raw) + start, end - start)
            self.total += offset
        self.specs, self.written = specs, set()
        self._files: dict[Path, object] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or _DTYPES.get(tensor.dtype) != dtype:
            raise FusionError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}, the output expects "
                              f"{tuple(shape)} {dtype}")
        path, offset, nbytes = self.where[name]
        handle = self._files.get(path) or self._files.setdefault(path, open(path, "r+b"))  # noqa: SIM115
        handle.seek(offset)
        handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.written.add(name)

    def close(self) -> list[Path]:
        for handle in self._files.values():
            handle.close()
        missing = [n for n in self.specs if n not in self.written]
        if missing:
            raise FusionError(f"internal: {len(missing)} tensors were never written, e.g. {missing[:3]}")
        if len(self.names) > 1:
            weight_map = {name: where[0].name for name, where in self.where.items()}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                         "weight_map": weight_map}, indent=2) + "\n")
        return [self.folder / n for n in self.names]


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _FROM_NAME[dtype].itemsize


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
    given = FusionConfig.make(weights=weights, **options)
    config = given.resolved(has_data=False)
    if config.needs_data():
        raise FusionError("streaming fusion reads no activations: use cost='weights' and a residual policy other "
                          "than the weighted ones, or fuse the loaded models with otfx.fuse")
    config.validate(2, has_data=False)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    readers = [Checkpoint(anchor), Checkpoint(other)]
    models = [meta_model(anchor), meta_model(other)]
    args = example_inputs or _example(models[0])
    inferences = [analyse(trace(m, args, name=f"{Path(f).name} (meta)", meta=True))
                  for m, f in zip(models, (anchor, other))]
    check_same_architecture(*inferences)
    for reader, model in zip(readers, models):
        reader.resolve_tied(tied_groups(model))
    timings["trace_and_infer"] = time.perf_counter() - start
    w = config.model_weights(2)
    groups = {name: g for g in tied_groups(models[0]) for name in g}
    with atomic_dir(out, overwrite, inputs=[anchor, other], command="otfx.stream.fuse_checkpoints") as tmp:
        writer = ShardWriter(tmp, readers[0].specs(), parse_size(shard_size))
        with warnings.catch_warnings():
            if given.residual is None:  # the automatic choice: a stream that cannot rotate is not news
                warnings.simplefilter("ignore", StreamFallbackWarning)
            maps = TransportMaps(*inferences, config, params_anchor=readers[0], params_other=readers[1],
                                 fallback="mean" if given.residual is None else None)
        maps.release = True

        def sink(fqn: str, value: torch.Tensor) -> None:
            base = maps.params_anchor[fqn]  # the anchor as the maps see it (gains folded for orthogonal maps)
            dest = torch.empty_like(base)
            _blend_into(dest, None, base, w[0], value, w[1])
            for name in groups.get(fqn, [fqn]):
                if name in readers[0].files:
                    writer.add(name, dest)

        with torch.no_grad():
            rewrite_params(maps, sink)
        for name in readers[0].files:  # buffers and anything else the anchor stores, as it is
            if name not in writer.written:
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
