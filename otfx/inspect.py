"""Readable summaries and pictures of an inference result (``otfx.inspect`` / ``otfx inspect``)."""

from __future__ import annotations

from collections import Counter


def render_summary(inference) -> str:
    lines = [f"{inference.traced!r}"]
    roles = inference.roles
    counts = Counter((roles.get(s, "hidden"), inference.size(s)) for s in inference.free_spaces())
    lines.append("free spaces (role x size: count): " + ", ".join(
        f"{role} x{size}: {n}" for (role, size), n in sorted(counts.items())))
    return "\n".join(lines)
