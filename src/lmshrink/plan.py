"""What to compress and how much: the Plan, and the Targets it selects in a model."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

from lmshrink.errors import InvalidArgument

# Target groups a user can name instead of a glob pattern (alias -> the Target.group values it selects). A model
# family adds its own (ModelFamily.target_groups); select_targets takes them from the candidates it is given.
COMMON_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "linears": ("attention", "mlp"),
    "attention": ("attention",),
    "mlp": ("mlp",),
    "embedding": ("embedding",),
    "lm_head": ("lm_head",),
}


@dataclass
class Target:
    """One matrix-bearing module the plan may replace.

    ``kind`` says how it is used ("linear", "embedding", "lm_head", "lstm", ...); ``group`` is what
    aliases select ("attention", "mlp", "embedding", "lm_head", "other"). A token embedding tied to the
    output layer carries the head's name in ``tied_head``: both are compressed once, together.
    """

    name: str
    module: nn.Module
    kind: str
    group: str
    tied_head: str | None = None

    def weight(self) -> Tensor:
        """The matrix in (out, in) layout (embeddings: (V, d))."""
        from lmshrink.layers.lowrank import linear_weight

        if self.kind == "embedding":
            return self.module.weight
        return linear_weight(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)


@dataclass
class Plan:
    """Method x targets x amount. Exactly one of ``ratio``, ``rank``, ``energy`` or ``params`` says how much is kept.

    ``ratio`` R: each targeted matrix keeps R times its dense parameter count (0 < R <= 1).
    ``rank`` K: every targeted matrix gets rank K (1 <= K <= min(m, n)).
    ``energy`` E: the smallest rank keeping E of the squared singular values (0 < E <= 1).
    ``params`` N: the targeted matrices keep at most N parameters in all; it is the global ratio N / (their
    dense parameters), so "uniform" gives every matrix that ratio and "sensitivity" spends exactly N.

    ``allocation`` spreads the same global budget differently ("uniform", or "sensitivity"); ``max_shift``
    bounds how far "sensitivity" may move each rank from its uniform rank (a fraction; None: no bound).

    ``untie_head``: a token embedding tied to the output layer is compressed on the input side only; the
    output layer keeps the original table as its own dense weight. The model grows by that table (V x d), so
    this is for measuring what the input side tolerates, not for saving memory.

    ``bits`` B: the factors this plan produces are stored as B-bit packed integers (lmshrink.quantize_factors), with
    a float16 scale and minimum per row, or per ``group_size`` consecutive columns of a row. None: float factors.

    ``self_share`` S: that share of the calibration windows is text the model samples itself (lmshrink.self_samples),
    the rest the data's text; it keeps calibration from fitting one domain only. None: as the data says (``TEXT+self``:
    half; otherwise none).

    ``joint``: linears that read one input (q/k/v; gate/up) are factorized together, one right factor shared by
    them (lmshrink.joint): a rank costs in + sum(out) instead of in + out for each. Low-rank methods only.
    """

    method: str = "svd"
    targets: tuple[str, ...] = ("linears",)
    ratio: float | None = None
    rank: int | None = None
    energy: float | None = None
    params: int | None = None
    multiple_of: int = 1
    allocation: str = "uniform"
    max_shift: float | None = 0.25
    options: dict[str, Any] = field(default_factory=dict)
    calibration_windows: int = 32
    window: int = 512
    untie_head: bool = False
    bits: int | None = None
    group_size: int | None = None
    joint: bool = False
    self_share: float | None = None

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        given = [name for name in ("ratio", "rank", "energy", "params") if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidArgument("ratio/rank/energy/params", f"{'none' if not given else ' and '.join(given)} given",
                                  "exactly one of --ratio R, --rank K, --energy E or --params N")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise InvalidArgument("--ratio", f"{self.ratio} is outside (0, 1]", "0 < R <= 1, the fraction of each matrix's dense parameters kept")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise InvalidArgument("--energy", f"{self.energy} is outside (0, 1]", "0 < E <= 1, the fraction of squared singular values kept")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise InvalidArgument("--rank", f"{self.rank!r} is not a positive integer", "an integer K >= 1 and <= min(m, n) of every target")
        if self.params is not None and (isinstance(self.params, bool) or not isinstance(self.params, int) or self.params <= 0):
            raise InvalidArgument("--params", f"{self.params!r} is not a positive integer",
                                  "an integer N >= 1, below the targeted matrices' dense parameter count")
        if self.multiple_of < 1:
            raise InvalidArgument("--multiple-of", f"{self.multiple_of} is below 1", "an integer >= 1")
        if self.max_shift is not None and not (isinstance(self.max_shift, (int, float)) and 0 <= self.max_shift < float("inf")):
            raise InvalidArgument("--max-shift", f"{self.max_shift!r} is not a finite number >= 0",
                                  "a fraction >= 0 (0: the uniform ranks; 0.25: each rank within +-25% of its uniform rank), "
                                  "or None for no bound")
        if self.bits is not None:
            from lmshrink.decompose.quantize import SUPPORTED_BITS

            if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
                raise InvalidArgument("--bits", f"{self.bits!r} bits is not supported", f"one of {SUPPORTED_BITS}, or none for float factors")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or not 1 <= self.group_size <= 1 << 20):
            raise InvalidArgument("--group-size", f"{self.group_size!r} is not a positive integer",
                                  "an integer 1 .. 1048576 (columns sharing one scale), or none for one scale per row")
        if not isinstance(self.joint, bool):
            raise InvalidArgument("--joint", f"{self.joint!r} is not true or false", "true (shared right factors) or false")
        if self.joint and self.bits is not None:
            raise InvalidArgument("--joint", "cannot be combined with --bits in this version (each member would quantize the "
                                  "shared factor on its own)", "--joint with float factors, or --bits without --joint")
        if self.calibration_windows < 1:
            raise InvalidArgument("--calibration-windows", f"{self.calibration_windows} is below 1", "an integer >= 1")
        if self.self_share is not None and (isinstance(self.self_share, bool) or not isinstance(self.self_share, (int, float))
                                            or not 0 <= self.self_share <= 1):
            raise InvalidArgument("--self-share", f"{self.self_share!r} is not a share", "a number 0 .. 1 (the share of "
                                  "calibration windows sampled from the model itself), or none for what --data says")
        if self.window < 2:
            raise InvalidArgument("--window", f"{self.window} is below 2", "an integer >= 2 tokens")

    def amount(self) -> str:
        if self.ratio is not None:
            return f"ratio={self.ratio:g}"
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.params is not None:
            return f"params={self.params:,}"
        return f"energy={self.energy:g}"

    def for_targets(self, targets: list[Target]) -> "Plan":
        """This plan with a ``params`` budget turned into the global ratio over ``targets`` (others: unchanged)."""
        if self.params is None:
            return self
        dense = sum(t.shape[0] * t.shape[1] for t in targets)
        if self.params >= dense:
            raise InvalidArgument("--params", f"{self.params:,} is not below the {dense:,} dense parameters of the targets",
                                  f"1 <= N < {dense:,} (or more --targets)")
        return replace(self, ratio=self.params / dense, params=None)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "targets": list(self.targets), "ratio": self.ratio, "rank": self.rank,
                "energy": self.energy, "params": self.params, "multiple_of": self.multiple_of, "allocation": self.allocation,
                "max_shift": self.max_shift, "options": self.options, "calibration_windows": self.calibration_windows, "window": self.window,
                "untie_head": self.untie_head, "bits": self.bits, "group_size": self.group_size, "joint": self.joint,
                "self_share": self.self_share}


class Candidates(list):
    """The targets a model offers (a list of Target) and the group aliases its family declares for them."""

    def __init__(self, targets, groups: dict[str, tuple[str, ...]] | None = None):
        super().__init__(targets)
        self.groups = dict(COMMON_TARGET_GROUPS if groups is None else groups)


def select_targets(candidates: list[Target], patterns: tuple[str, ...],
                   groups: dict[str, tuple[str, ...]] | None = None) -> list[Target]:
    """Targets matching any pattern: a group alias (linears, attention, mlp, embedding, lm_head, and those the
    model's family declares) or a glob on names.

    ``groups`` (alias -> Target.group values) defaults to the ones the candidates carry (``Candidates``, as
    ``LoadedModel.candidates()`` returns them), else COMMON_TARGET_GROUPS. A pattern that matches nothing is an
    error that lists close matches.
    """
    aliases = groups if groups is not None else getattr(candidates, "groups", COMMON_TARGET_GROUPS)
    by_name = {t.name: t for t in candidates}
    chosen: dict[str, Target] = {}
    for pattern in patterns:
        if pattern in aliases:
            members = aliases[pattern]
            matched = [t for t in candidates if t.group in members
                       or (t.tied_head is not None and "lm_head" in members)]
        else:
            matched = [t for t in candidates if fnmatch.fnmatchcase(t.name, pattern)
                       or (t.tied_head is not None and fnmatch.fnmatchcase(t.tied_head, pattern))]
        if not matched:
            # Name what this model does have: the groups with at least one member, and a glob on its own names.
            present = {t.group for t in candidates} | ({"lm_head"} if any(t.tied_head for t in candidates) else set())
            offered = [alias for alias, members in aliases.items() if present & set(members)]
            example = next(iter(by_name), "*.q_proj")
            hint = f"groups this model has: {', '.join(offered) or 'none'}; or a glob on its module names such as {example!r}"
            close = [c for c in difflib.get_close_matches(pattern, offered + list(by_name), n=5, cutoff=0.5) if c != pattern]
            if close:
                hint = f"close matches: {', '.join(close)}; {hint}"
            what = (f"group {pattern!r} ({', '.join(aliases[pattern])}) matches no module of this model" if pattern in aliases
                    else f"pattern {pattern!r} matches no module")
            raise InvalidArgument("--targets", what, hint)
        for target in matched:
            chosen.setdefault(target.name, target)
    return [t for t in candidates if t.name in chosen]


def place_groups(targets: list[Target], group_of: dict[str, Target]) -> list[Target]:
    """``targets`` with each member (``group_of``: member name -> its group) replaced by its group, placed once,
    where its first member was; the rest in their order (joint factors and MLP channel groups share this)."""
    result, placed = [], set()
    for target in targets:
        group = group_of.get(target.name)
        if group is None:
            result.append(target)
        elif group.name not in placed:
            placed.add(group.name)
            result.append(group)
    return result
