"""The pass registry: op handlers by ATen target, and pattern passes by name, with explicit override.

A built-in pass (one defined in ``otfx.passes``) is replaced only with ``replace=True``; registering the same
function again (a re-run notebook cell, a reloaded module) is allowed. Every change bumps ``version``, which
keys the inference cache, so a pass registered after a model was analysed is not ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Handler = Callable  # (ctx: InferContext, node: torch.fx.Node) -> None
PatternHandler = Callable  # (ctx: InferContext, node: torch.fx.Node) -> bool (whether it matched)


class PassRegistrationError(ValueError):
    """A registration that would silently replace a pass, or one that names nothing to register."""


class PassError(RuntimeError):
    """A pass raised while handling a node: names the pass, the node, its op and where it is in the model."""


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _is_builtin(fn: Callable) -> bool:
    return getattr(fn, "__module__", "").startswith("otfx.passes.")


def target_name(target) -> str:
    """``aten.linear.default`` for an op overload, the function name for a Python callable."""
    return str(target) if hasattr(target, "overloadpacket") or hasattr(target, "overloads") else (
        getattr(target, "__name__", None) or str(target))


@dataclass(frozen=True)
class OpPass:
    """A handler for one op target. ``view``: the op's output is a view of its first input (transpose,
    unsqueeze, clone, ...), so a parameter read through it is still that parameter (one place: the walk)."""

    target: object
    handler: Handler
    view: bool = False

    @property
    def builtin(self) -> bool:
        return _is_builtin(self.handler)

    @property
    def name(self) -> str:
        return _name(self.handler)


@dataclass(frozen=True)
class Pattern:
    """A pass over a multi-node idiom (RMSNorm, matmul+softmax attention), tried at every node whose target is
    one of ``anchors`` after the op walk, in graph order; ``handler`` returns whether it matched."""

    name: str
    anchors: frozenset
    handler: PatternHandler

    @property
    def builtin(self) -> bool:
        return _is_builtin(self.handler)


@dataclass
class Registry:
    """Op passes by target and patterns by name; ``version`` changes on every registration."""

    ops: dict[object, OpPass] = field(default_factory=dict)
    patterns: dict[str, Pattern] = field(default_factory=dict)
    version: int = 0

    # ---- registration ----------------------------------------------------------------------------------
    def register(self, *targets, replace: bool = False, view: bool = False) -> Callable[[Handler], Handler]:
        """Decorator: ``@register(torch.ops.aten.x.default, ...)`` makes the function the handler of those ops."""
        if not targets:
            raise PassRegistrationError("register() needs at least one op target, e.g. torch.ops.aten.add.Tensor")

        def wrap(fn: Handler) -> Handler:
            for target in targets:
                self._check(self.ops.get(target), fn, f"op {target_name(target)}", replace)
            for target in targets:
                self.ops[target] = OpPass(target, fn, view)
            self.version += 1
            return fn

        return wrap

    def register_pattern(self, name: str, *anchors, replace: bool = False) -> Callable[[PatternHandler],
                                                                                       PatternHandler]:
        """Decorator: a pattern pass named ``name``, tried at nodes whose target is one of ``anchors``."""
        if not anchors:
            raise PassRegistrationError(f"pattern {name!r} needs at least one anchor op")

        def wrap(fn: PatternHandler) -> PatternHandler:
            self._check(self.patterns.get(name), fn, f"pattern {name!r}", replace)
            self.patterns[name] = Pattern(name, frozenset(anchors), fn)
            self.version += 1
            return fn

        return wrap

    def unregister(self, target=None, *, pattern: str | None = None) -> None:
        """Remove the pass of an op target (or the pattern of that name); a built-in one comes back only by
        registering it again."""
        removed = self.patterns.pop(pattern, None) if pattern is not None else self.ops.pop(target, None)
        if removed is None:
            raise KeyError(f"no pass registered for {pattern if pattern is not None else target_name(target)}")
        self.version += 1

    @staticmethod
    def _check(existing, fn: Callable, what: str, replace: bool) -> None:
        if existing is None or replace or existing.handler is fn or _name(existing.handler) == _name(fn):
            return
        owner = "the built-in pass" if existing.builtin else "the pass"
        raise PassRegistrationError(f"{what} already has {owner} {_name(existing.handler)}; "
                                    f"use register(..., replace=True) to replace it with {_name(fn)}")

    # ---- reading ---------------------------------------------------------------------------------------
    def lookup(self, target) -> OpPass | None:
        """The pass of an op: by exact overload first, then by its overload packet, then by its name (a custom
        op of a library that may not be imported when the pass is registered, e.g.
        ``"transformers.grouped_mm_fallback.default"``)."""
        found = self.ops.get(target)
        if found is None:
            packet = getattr(target, "overloadpacket", None)
            found = self.ops.get(packet) if packet is not None else None
        if found is None and hasattr(target, "overloadpacket"):  # a library's custom op, registered by name
            found = self.ops.get(target_name(target))
        return found

    def key(self) -> tuple:
        """The registry's state, for caches: changes whenever a pass is registered or removed."""
        return (id(self), self.version)

    def with_passes(self, passes: PassesArg) -> Registry:
        """A copy with per-call passes on top (they override any pass of the same target or name)."""
        if passes is None:
            return self
        out = Registry(dict(self.ops), dict(self.patterns), 0)
        items = passes.items() if isinstance(passes, Mapping) else passes
        for item in items:
            if isinstance(item, OpPass):
                out.ops[item.target] = item
            elif isinstance(item, Pattern):
                out.patterns[item.name] = item
            elif isinstance(item, tuple) and len(item) == 2 and callable(item[1]):
                out.ops[item[0]] = OpPass(item[0], item[1])
            else:
                raise PassRegistrationError(f"passes= takes a mapping {{op: handler}} or OpPass/Pattern items, "
                                            f"not {item!r}")
        return out


#: what ``passes=`` accepts: ``{op target: handler}``, or an iterable of ``OpPass`` / ``Pattern`` / pairs
PassesArg = Mapping | Iterable | None


def passes_key(passes: PassesArg) -> tuple:
    """A hashable key for per-call passes (the handler objects themselves, so equal calls share a cache)."""
    if passes is None:
        return ()
    items = passes.items() if isinstance(passes, Mapping) else passes
    out = []
    for item in items:
        if isinstance(item, OpPass):
            out.append(("op", item.target, item.handler, item.view))
        elif isinstance(item, Pattern):
            out.append(("pattern", item.name, item.anchors, item.handler))
        else:
            out.append(("op", *item))
    return tuple(out)
