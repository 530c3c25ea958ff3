"""Typed vocabularies of inference: how two axes are linked, and what a flow-graph record is.

Both are ``str`` enums whose member names equal their values, so ``LinkKind.residual == "residual"`` and
``"residual" in {LinkKind.residual}`` hold: code that compares with plain strings keeps working.
"""

from __future__ import annotations

from enum import Enum


class _StrKind(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | _StrKind) -> _StrKind:
        """The member for ``value``, or a ValueError that lists the valid ones."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls.__name__} {value!r}; expected one of: {valid}") from None


class LinkKind(_StrKind):
    """How ``link(a, b, kind)`` relates two axes.

    ``exact`` makes them one space in both partitions; the other kinds merge them in the coarse partition only
    (one symmetry) and leave two fine classes (two transport maps) joined by a flow-graph node.
    """

    exact = "exact"          # the same space (an element-wise op, a weight's input axis)
    heads = "heads"          # the same head axis seen by q, k and v (exact, named for readability)
    residual = "residual"    # two input-dependent tensors added (a residual add)
    concat = "concat"        # tensors laid side by side along another axis
    contract = "contract"    # the query-key contraction of attention
    tied = "tied"            # one tensor used twice (a tied LM head)

    @property
    def soft(self) -> bool:
        return self in SOFT_KINDS


SOFT_KINDS = frozenset({LinkKind.residual, LinkKind.concat, LinkKind.contract, LinkKind.tied})


class RecordKind(_StrKind):
    """What a flow-graph record describes (``Record.kind``)."""

    layer = "layer"          # a parameter contraction creating a new space (info: weight)
    norm = "norm"            # a normalisation (info: form, "layer_norm" or "rms")
    residual = "residual"    # a residual add joining fine classes (inputs -> output)
    concat = "concat"        # a concatenation joining fine classes
    attention = "attention"  # sdpa or matmul -> softmax -> matmul (info: heads, form, q/k/v or matmuls)
    matmul = "matmul"        # a product of two tensors (info: a, b, a_heads, b_heads)
