"""Transport spaces: a union-find over tensor axes, with product (head x head_dim) and direct-sum (q|k|v)
structure, kept at two granularities.

* ``coarse``: every function-preserving equality. Its classes are the model's permutation symmetries.
* ``fine``: the same, except that residual adds, concatenations, attention's query-key contraction and tied
  weights only *link* spaces instead of merging them. Its classes are the nodes
  that carry one transport map each in the paper's TM flow graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otfx.infer.kinds import SOFT_KINDS, LinkKind

__all__ = ["SOFT_KINDS", "Partition", "Spaces", "align_groups", "merged"]


@dataclass
class Partition:
    """Union-find over space ids, each class with a size, an optional structure and reasons to be fixed."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    structure: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    fixed: dict[int, list[str]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    #: the spaces involved in each conflict (parallel to ``conflicts``)
    conflict_spaces: list[list[int]] = field(default_factory=list)

    def add(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def is_fixed(self, x: int) -> bool:
        return self.find(x) in self.fixed

    def fix(self, x: int, reason: str) -> None:
        reasons = self.fixed.setdefault(self.find(x), [])
        if reason not in reasons and len(reasons) < 8:
            reasons.append(reason)

    def children(self, x: int) -> tuple[str, list[int]] | None:
        return self.structure.get(self.find(x))

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            self.conflicts.append(f"size mismatch {self.size[ra]} vs {self.size[rb]}")
            self.conflict_spaces.append([ra, rb])
            self.fix(ra, "axes of different sizes meet")
            self.fix(rb, "axes of different sizes meet")
            return ra
        self.parent[rb] = ra
        if rb in self.fixed:
            for reason in self.fixed.pop(rb):
                self.fix(ra, reason)
        sa, sb = self.structure.pop(ra, None), self.structure.pop(rb, None)
        if sa:
            self.structure[ra] = sa
        if sb:
            self.set_structure(ra, *sb)
        return ra

    def set_structure(self, x: int, kind: str, children: list[int]) -> None:
        """Declare ``x`` a product (mixed radix, outer first) or direct sum of ``children``."""
        root = self.find(x)
        old = self.structure.get(root)
        if old is None:
            self.structure[root] = (kind, list(children))
            return
        old_kind, old_children = old
        if old_kind != kind:
            self._conflict(root, f"{old_kind} meets {kind}", old_children + list(children))
            return
        children = list(children)
        groups = self._align(old_children, children, kind)
        if groups is None or any(len(left) > 1 and len(right) > 1 for left, right in groups):
            # nested structures of the same kind are one structure: q | (k | v) and (q | k) | v, cut by
            # successive slices, align once both are flattened to q | k | v
            flat_old, flat_new = self._flatten(old_children, kind), self._flatten(children, kind)
            flat = self._align(flat_old, flat_new, kind)
            if flat is not None:
                old_children, children, groups = flat_old, flat_new, flat
        if groups is None:
            self._conflict(root, f"{kind} structures do not align", old_children + children)
            return
        for left, right in groups:
            lhs = [old_children[i] for i in left]
            rhs = [children[i] for i in right]
            if len(lhs) == 1 and len(rhs) == 1:
                self.union(lhs[0], rhs[0])
            elif len(lhs) == 1:
                self.set_structure(lhs[0], kind, rhs)
            elif len(rhs) == 1:
                self.set_structure(rhs[0], kind, lhs)
            else:
                self._conflict(root, f"{kind} structures do not align", lhs + rhs)

    def _align(self, left: list[int], right: list[int], kind: str):
        return align_groups([self.size[self.find(c)] for c in left], [self.size[self.find(c)] for c in right], kind)

    def _flatten(self, children: list[int], kind: str, depth: int = 0) -> list[int]:
        """``children`` with every child that is itself a ``kind`` structure replaced by its parts."""
        out: list[int] = []
        for c in children:
            inner = self.structure.get(self.find(c))
            if inner is not None and inner[0] == kind and depth < 32:
                out += self._flatten(inner[1], kind, depth + 1)
            else:
                out.append(c)
        return out

    def replace_structure(self, x: int, kind: str, children: list[int]) -> None:
        self.structure[self.find(x)] = (kind, list(children))

    def _conflict(self, root: int, why: str, involved: list[int]) -> None:
        if root in self.fixed:  # a fixed space (positions cut into windows, then into 2x2 patches) admits only
            for c in involved:  # the identity whatever its structures: its parts are fixed, nothing is lost
                self.fix(c, "part of a fixed space whose structures do not align")
            return
        self.conflicts.append(why)
        self.conflict_spaces.append([root, *involved])
        self.fix(root, why)
        for c in involved:
            self.fix(c, why)

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self.parent))})

    def close(self) -> None:
        """Merge equal structures (congruence closure) and fix every part of a fixed space."""
        changed = True
        while changed:
            changed = False
            seen: dict[tuple, int] = {}
            for root in list(self.structure):
                if self.find(root) != root or root not in self.structure:
                    continue
                kind, children = self.structure[root]
                key = (kind, tuple(self.find(c) for c in children))
                if key in seen and self.find(seen[key]) != root:
                    self.union(seen[key], root)
                    changed = True
                else:
                    seen[key] = root
            for root, (kind, children) in list(self.structure.items()):
                # a map of a sum is block-diagonal: parts of width 1 (one kv head each) are fixed too
                if self.find(root) == root and root not in self.fixed and all(
                        self.is_fixed(c) or (kind == "sum" and self.size[self.find(c)] <= 1) for c in children):
                    self.fix(root, "every part is fixed")
                    changed = True
            for root in list(self.fixed):
                if self.find(root) != root:
                    continue
                for child in self.structure.get(root, ("", []))[1]:
                    if not self.is_fixed(child):
                        self.fix(child, "part of a fixed space")
                        changed = True


def align_groups(left: list[int], right: list[int], kind: str) -> list[tuple[list[int], list[int]]] | None:
    """Group two factor (or summand) size lists into runs of equal product (or sum); None if they cross."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    combine = (lambda x, y: x * y) if kind == "prod" else (lambda x, y: x + y)
    while i < len(left) and j < len(right):
        li, rj = [i], [j]
        lv, rv = left[i], right[j]
        i, j = i + 1, j + 1
        while lv != rv:
            if lv < rv and i < len(left):
                lv = combine(lv, left[i])
                li.append(i)
                i += 1
            elif rv < lv and j < len(right):
                rv = combine(rv, right[j])
                rj.append(j)
                j += 1
            else:
                return None
        groups.append((li, rj))
    if i != len(left) or j != len(right):
        return None
    return groups


@dataclass
class Spaces:
    """The two partitions over one set of space ids; passes call ``new``, ``link`` and ``structure``."""

    coarse: Partition = field(default_factory=Partition)
    fine: Partition = field(default_factory=Partition)
    #: groups of spaces that are fixed together (the parts of a sliced axis: a position table is sliced to
    #: the traced length, and the rest is used at other lengths)
    together: list[list[int]] = field(default_factory=list)
    #: the parts of sliced axes that some slice reads (complementary slices, partial rotary: all are used)
    kept: list[int] = field(default_factory=list)
    #: the links that merged coarse classes only: (a, b, kind)
    soft_links: list[tuple[int, int, LinkKind]] = field(default_factory=list)

    def new(self, size: int, fixed: str | None = None) -> int:
        sid = self.coarse.add(size)
        self.fine.add(size)
        if fixed:
            self.fix(sid, fixed)
        return sid

    def size(self, sid: int) -> int:
        return self.coarse.size[sid]

    def fix(self, sid: int, reason: str) -> None:
        self.coarse.fix(sid, reason)
        self.fine.fix(sid, reason)

    def is_fixed(self, sid: int) -> bool:
        return self.coarse.is_fixed(sid)

    def link(self, a: int, b: int, kind: LinkKind | str = LinkKind.exact) -> None:
        """Declare two axes the same space (``exact``) or coupled through a flow-graph node (soft kinds)."""
        kind = LinkKind.parse(kind)
        self.coarse.union(a, b)
        if kind.soft:
            self.soft_links.append((a, b, kind))
        else:
            self.fine.union(a, b)

    def same_fine(self, a: int, b: int) -> bool:
        return self.fine.find(a) == self.fine.find(b)

    def set_structure(self, sid: int, kind: str, children: list[int]) -> None:
        if self._sum_of_products(sid, kind, list(children)):
            return
        self.coarse.set_structure(sid, kind, children)
        self.fine.set_structure(sid, kind, children)

    def _sum_of_products(self, sid: int, kind: str, children: list[int]) -> bool:
        """A product F x R (heads x head_dim) that is also a direct sum cut at multiples of R's size (a chunk
        of the heads axis, a slice of whole heads): a sum of products, not a conflict. The outer factor F
        becomes the sum of parts F_i and summand i the product F_i x R, with R shared by all summands (the
        product said one map of R for every index of F); the space keeps the structure it had first. False where the two
        are not of this form (they then conflict as before)."""
        coarse = self.coarse
        old = coarse.structure.get(coarse.find(sid))
        if old is None or {old[0], kind} != {"sum", "prod"}:
            return False
        prod_children, sum_children = (old[1], children) if old[0] == "prod" else (children, old[1])
        factors = coarse._flatten(prod_children, "prod")
        summands = coarse._flatten(sum_children, "sum")
        outer, rest = factors[0], factors[1:]
        width = 1
        for r in rest:
            width *= self.size(r)
        if not rest or width <= 1 or any(self.size(s) % width for s in summands):
            return False
        counts = [self.size(s) // width for s in summands]
        if sum(counts) != self.size(outer):
            return False
        parts = [self.new(n) for n in counts]
        for part, summand, n in zip(parts, summands, counts):
            if n > 1:
                self.set_structure(summand, "prod", [part, *rest])
            elif len(rest) == 1:
                self.link(summand, rest[0])
            else:
                self.set_structure(summand, "prod", list(rest))
        if len(parts) > 1:
            self.set_structure(outer, "sum", parts)
        for partition in (self.coarse, self.fine):  # the space keeps the structure it had first
            if partition.structure.get(partition.find(sid)) is None:
                partition.set_structure(sid, *old)
        return True

    def product(self, children: list[int]) -> int:
        """A new space that is the product of ``children`` (outer first)."""
        size = 1
        for c in children:
            size *= self.size(c)
        sid = self.new(size)
        self.set_structure(sid, "prod", children)
        return sid

    def direct_sum(self, children: list[int]) -> int:
        sid = self.new(sum(self.size(c) for c in children))
        self.set_structure(sid, "sum", children)
        return sid

    def close(self) -> None:
        changed = True
        while changed:
            self.fine.close()
            self.coarse.close()
            changed = False
            used = self._read_parts()
            for group in self.together:
                if any(self.coarse.is_fixed(s) for s in group):
                    for s in group:  # only an unread part is fixed with it: another length reads it
                        if not self.coarse.is_fixed(s) and self.coarse.find(s) not in used:
                            self.fix(s, "part of a sliced axis whose kept part is fixed")
                            changed = True
            # a space fixed in the coarse partition is fixed in every fine class inside it
            for sid in range(len(self.fine.parent)):
                if self.coarse.is_fixed(sid) and not self.fine.is_fixed(sid):
                    self.fine.fix(sid, "coupled to a fixed space")
                    changed = True


    def _read_parts(self) -> set[int]:
        """Coarse roots of the parts some slice reads, and of the sums whose parts are all read (the rest
        after q of a fused q | k | v is read, as k and v)."""
        coarse = self.coarse
        used = {coarse.find(k) for k in self.kept}
        changed = True
        while changed:
            changed = False
            for root, (kind, children) in coarse.structure.items():
                if (kind == "sum" and coarse.find(root) == root and root not in used
                        and all(coarse.find(c) in used for c in children)):
                    used.add(root)
                    changed = True
        return used


def merged(spaces: Spaces, kinds: set[str]) -> Partition:
    """A copy of the fine partition with the soft links of ``kinds`` merged (e.g. one map per residual stream)."""
    import copy

    part = copy.deepcopy(spaces.fine)
    for a, b, kind in spaces.soft_links:
        if kind in kinds:
            part.union(a, b)
    part.close()
    return part
