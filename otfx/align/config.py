"""The one configuration object of a fusion, with validation that names what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

HEADS = ("cross", "aware")
QK = ("untied", "tied")
#: values of ``select``: the label-free scores (``otfx.select``) and "off"
SELECT = ("kl", "mse", "off")


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each named option, from the registries (costs, solvers, residual combiners): what
    ``validate`` accepts and what the CLI offers."""
    from otfx.align.combiners import COMBINERS
    from otfx.align.costs import cost_names
    from otfx.align.solvers import SOLVERS

    return {"cost": cost_names(), "solver": tuple(sorted(SOLVERS)), "residual": tuple(COMBINERS), "heads": HEADS,
            "qk": QK}


class FusionError(ValueError):
    """A fusion cannot be done as asked; the message names the model, option or layer at fault."""


@dataclass(frozen=True)
class FusionConfig:
    """How transport maps are computed and combined (see ``otfx.fuse``)."""

    #: None: ``"activations"`` with ``data`` and three or more models, else ``"weights"`` (4 ViT models with
    #: repair, default reg: 76.7% mean validation accuracy against 68.8% for weights; with 2 models 85.5% against
    #: 86.1%, and weights on the BERT pair: 06_quality)
    cost: str | None = None
    solver: str = "sinkhorn_torch"
    #: Sinkhorn regularisation, relative to the normalised cost; None: 0.25 with repair, 0.06 without (the best
    #: of 0.02-0.5 on validation across digits and Fashion-MNIST ViT pairs, both anchor orders: 06_quality)
    reg: float | None = None
    #: how residual streams are mapped; None: ``"orthogonal"`` (one rotation per stream where the graph allows
    #: it, the paper's ``"mean"`` where no stream can rotate: 68.1% mean validation accuracy against 65.0% for
    #: ``"mean"`` on digits and Fashion-MNIST ViT pairs, both orders), but ``"mean"`` for the weights cost with
    #: repair (87.3% against 85.0% for orthogonal)
    residual: str | None = None
    heads: str = "cross"
    qk: str = "untied"
    tokens: str | tuple = "all"
    weights: tuple[float, ...] | None = None
    max_iter: int = 1000
    #: after fusing, reset every aligned unit's mean and std to the parents' (REPAIR; needs ``data``); None:
    #: whenever ``data`` is given (one-shot accuracy 93-98% of the parents with 2 models against 60-90% without)
    repair: bool | None = None
    #: after fusing (and REPAIR), solve each linear layer's weight and bias by least squares, in graph order, so
    #: that its outputs on ``data`` match the parents' weighted mean (PLeaS; needs ``data``); None: chosen per
    #: candidate by ``select``, on with ``select="off"`` (with the fixed default, 4 ViT models keep 93-98% of the
    #: mean parent against 81-86% without; 2 Fashion-MNIST models 95% against 96-97%: 08_defaults)
    refit: bool | None = None
    #: align every model to a common barycentre (MergeMany) instead of to the first model
    anchor_free: bool = False
    #: with ``data``, fuse each candidate for the options left None (cost, reg, residual, refit) and keep the one
    #: whose outputs on ``data`` agree best with the parents' mean, no labels read (``otfx.select``): ``"kl"``
    #: (outputs read as logits), ``"mse"`` (other outputs) or ``"off"``; None: ``"kl"``. 7-17x the time of one
    #: fusion (the ViT pairs of 08_defaults; 28x on its BERT pair)
    select: str | None = None

    @classmethod
    def make(cls, base: FusionConfig | None = None, **options) -> FusionConfig:
        """``base`` (the defaults if None) with ``options`` replaced; an unknown option is an error naming the
        known ones (the one place where ``fuse``, ``align``, the CLI and the sweep get their defaults)."""
        known = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in known]
        if unknown:
            raise FusionError(f"unknown fusion option {unknown[0]!r}; the options are {', '.join(known)}")
        if options.get("weights") is not None:
            options["weights"] = tuple(options["weights"])
        return replace(base or cls(), **options)

    def resolved(self, has_data: bool, n_models: int = 2) -> FusionConfig:
        """The configuration with its automatic choices made for ``n_models`` models: ``repair`` when there is
        data, ``cost``, ``reg`` and ``residual``."""
        repair = has_data if self.repair is None else self.repair
        refit = has_data if self.refit is None else self.refit
        cost = self.cost if self.cost is not None else (
            "activations" if has_data and n_models >= 3 else "weights")
        reg = self.reg if self.reg is not None else (0.25 if repair else 0.06)
        residual = self.residual if self.residual is not None else (
            "mean" if repair and cost == "weights" else "orthogonal")
        return replace(self, repair=repair, refit=refit, cost=cost, reg=reg, residual=residual)

    @classmethod
    def alignment(cls, **options) -> FusionConfig:
        """The defaults of ``otfx.align``: every map a permutation that respects the model's symmetries (EMD, one
        map per residual stream, head-aware, tied queries and keys), so the aligned model keeps its function."""
        return cls.make(cls(solver="emd", residual="shared", heads="aware", qk="tied", repair=False,
                                  refit=False), **options)

    def validate(self, n_models: int, has_data: bool) -> None:
        self = self.resolved(has_data, n_models)  # noqa: PLW0642 - the automatic choices are validated too
        import math
        import numbers

        for name, allowed in choices().items():
            if getattr(self, name) not in allowed:
                raise FusionError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if isinstance(self.reg, bool) or not isinstance(self.reg, numbers.Real) or not (
                math.isfinite(self.reg) and self.reg > 0):
            raise FusionError(f"reg must be a positive finite number, got {self.reg!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise FusionError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.select is not None and self.select not in SELECT:
            raise FusionError(f"select={self.select!r} is not one of {', '.join(SELECT)}")
        for name in ("repair", "refit", "anchor_free"):
            if not isinstance(getattr(self, name), bool):
                raise FusionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if n_models < 2:
            raise FusionError(f"fusion needs at least two models, got {n_models}")
        if self.needs_data() and not has_data:
            what = (f"cost={self.cost!r}" if self.cost_needs_data() else "repair=True" if self.repair
                    else "refit=True" if self.refit else f"residual={self.residual!r}")
            raise FusionError(f"{what} needs data: pass data=[batch, ...] with inputs shaped like the example args")
        self.check_weights(n_models)
        token_filter(self.tokens)

    def check_weights(self, n_models: int) -> None:
        """``weights``: None, or one finite non-negative number per model with a positive sum."""
        if self.weights is None:
            return
        if len(self.weights) != n_models:
            raise FusionError(f"weights has {len(self.weights)} entries for {n_models} models")
        bad = [i for i, w in enumerate(self.weights) if not _finite_non_negative(w)]
        if bad:
            raise FusionError(f"weights[{bad[0]}] = {self.weights[bad[0]]!r}: every weight must be a finite "
                              f"non-negative number, got {list(self.weights)}")
        if sum(self.weights) <= 0:
            raise FusionError(f"weights must have a positive sum, got {list(self.weights)}")

    def cost_needs_data(self) -> bool:
        from otfx.align.costs import COSTS, cost_names

        if self.cost not in cost_names():
            return False
        provider = COSTS[self.cost]
        return bool(getattr(provider, "needs_data", not provider.reads_rows))

    def needs_data(self) -> bool:
        """Whether this configuration reads activations (its cost provider or its residual combiner)."""
        from otfx.align.combiners import COMBINERS

        combiner = COMBINERS.get(self.residual)
        return self.cost_needs_data() or self.repair or self.refit or bool(getattr(combiner, "needs_magnitudes", False))

    def maps_need_data(self) -> bool:
        """Whether the transport maps themselves read activations (repair reads them after fusing)."""
        return replace(self, repair=False, refit=False).needs_data()

    def model_weights(self, n_models: int) -> list[float]:
        weights = self.weights or tuple([1.0] * n_models)
        total = float(sum(weights))
        return [w / total for w in weights]

    def merged_kinds(self) -> set[str]:
        """Soft links of the flow graph that become one transport map under this configuration."""
        kinds = {"tied"}  # one tensor, one map
        if self.residual in ("shared", "orthogonal"):
            kinds |= {"residual", "concat"}
        if self.qk == "tied":
            kinds.add("contract")
        return kinds


def normalised_weights(weights, n_models: int) -> list[float]:
    """Per-model weights checked as ``FusionConfig`` checks them and summing to 1 (uniform when None)."""
    config = FusionConfig.make(weights=weights)
    config.check_weights(n_models)
    return config.model_weights(n_models)


def _finite_non_negative(w) -> bool:
    """A Python, numpy or 0-d torch scalar, finite and >= 0."""
    import math

    if isinstance(w, (bool, str)):
        return False
    try:
        value = float(w)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(value) and value >= 0


def token_filter(tokens) -> tuple[str, int]:
    """Parse ``tokens``: "all", "cls", ("window", n) or "window:n"."""
    if tokens in ("all", "cls"):
        return tokens, 0
    if isinstance(tokens, str) and tokens.startswith("window:"):
        tokens = ("window", tokens.split(":", 1)[1])
    if isinstance(tokens, (tuple, list)) and len(tokens) == 2 and tokens[0] == "window":
        try:
            n = int(tokens[1])
        except ValueError:
            n = 0
        if n > 0:
            return "window", n
    raise FusionError(f"tokens={tokens!r}: use 'all', 'cls' or ('window', n) with n > 0")
