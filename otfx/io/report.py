"""The JSON report written next to a fused model: configuration, package versions, per-space transport
statistics (as given by the fusion code) and stage timings."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from otfx.io.output import atomic_file

#: distributions whose versions go into every report
PACKAGES = ("otfx", "torch", "transformers", "POT", "onnx", "onnxruntime", "timm", "numpy")
#: per-space keys the fusion code gives (others are kept as they are)
SPACE_KEYS = ("space", "kind", "width_anchor", "width_other", "method", "cost_range", "sharpness", "iterations",
              "converged", "fallback", "marginal_error")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for those not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class FusionReport:
    """What one ``otfx fuse`` run did; ``to_dict`` gives the JSON written to ``report.json``."""

    config: dict = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    spaces: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # fusion extras, ONNX check, evaluation

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; repeated stages add up."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)

    def add_fusion(self, stats: dict | list | None) -> None:
        """Take the fused model's ``otfx_report``: a list of per-space dicts, or a dict whose ``spaces`` (or
        ``maps``) list holds them; everything else goes under ``fusion``."""
        if not stats:
            return
        if isinstance(stats, list):
            stats = {"spaces": stats}
        stats = dict(stats)
        for key in ("spaces", "maps"):
            self.spaces.extend(s if isinstance(s, dict) else vars(s) for s in stats.pop(key, None) or [])
        if stats:
            self.results.setdefault("fusion", {}).update(stats)

    def to_dict(self) -> dict:
        return {
            "otfx_report": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "versions": package_versions(),
            "config": self.config,
            "models": self.models,
            "spaces": self.spaces,
            "space_summary": summarise_spaces(self.spaces),
            "timings_s": self.timings,
            **self.results,
        }

    def write(self, path: str | Path) -> Path:
        return write_report(self.to_dict(), path)


def _numbers(spaces: list[dict], *keys: str) -> list[float]:
    """The finite numbers under ``keys`` in every space (a pair such as ``cost_range`` gives both ends)."""
    values: list[float] = []
    for s in spaces:
        for key in keys:
            value = s.get(key)
            items = value if isinstance(value, (list, tuple)) else [value]
            values += [float(v) for v in items if isinstance(v, (int, float)) and math.isfinite(v)]
    return values


def summarise_spaces(spaces: list[dict]) -> dict:
    """Counts by role (or kind) and the range of each numeric per-space statistic."""
    summary: dict[str, Any] = {"count": len(spaces)}
    roles: dict[str, int] = {}
    for s in spaces:
        role = str(s.get("role", s.get("kind", "?")))
        roles[role] = roles.get(role, 0) + 1
    if roles:
        summary["by_role"] = roles
    if any("converged" in s for s in spaces):  # the solver's verdicts (PlanInfo.converged / .fallback)
        summary["not_converged"] = sum(1 for s in spaces if s.get("converged") is False)
    if any("fallback" in s for s in spaces):
        summary["fallbacks"] = sum(1 for s in spaces if s.get("fallback"))
    for name, keys in (("width", ("width", "width_anchor")), ("sharpness", ("sharpness",)),
                       ("iterations", ("iterations",)), ("cost", ("cost_range", "cost_min", "cost_max"))):
        values = _numbers(spaces, *keys)
        if values:
            summary[name] = {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}
    return summary


def jsonable(value: Any) -> Any:
    """Plain JSON values for tensors, arrays, numpy scalars, paths, dataclasses and non-finite floats."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(vars(value))
    return str(value)


def write_report(report: dict, path: str | Path) -> Path:
    """Write a report dict as indented JSON, atomically."""
    path = Path(path)
    with atomic_file(path) as handle:
        json.dump(jsonable(report), handle, indent=2)
        handle.write("\n")
    return path
