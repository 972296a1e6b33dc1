"""Whole-model recipes: stages (each a Plan: targets x method x amount x bits) plus an optional whole-model budget.

A recipe file (YAML or JSON) lists ``stages``; each stage has ``targets``, ``method``, one amount (``ratio``, ``rank``,
``energy``, ``params``), the Plan fields (``bits``, ``group_size``, ``allocation``, ...) and that method's own options,
either at the stage's top level or under ``options``. An optional budget, at most one of ``bytes`` (whole-model bytes
as held), ``params`` (whole-model parameters, factors counted as values whatever their bits) or ``bf16_fraction``
(bytes as a fraction of the original's bfloat16 size), is shared by the stages: one scale s multiplies every stage's
``ratio`` (the ratios are the stages' relative shares; a stage without an amount has share 1), chosen as the largest
whose predicted size meets the budget; inside a stage, ``allocation: sensitivity`` spends its share where calibration
says it costs least. Stages with ``rank`` keep it (a fixed size); ``energy`` stages cannot be budgeted (their size is
not known before the spectra). ``load_recipe`` reads a file, a built-in name (``half``, ``quarter``, ``channels``) or a directory
saved by lmshrink (the recipe in its manifest); ``apply_recipe`` runs the stages through ``lmshrink.compress``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmshrink.errors import InvalidArgument

# Keys of a stage that are Plan fields (``options`` holds method options; they may also stand at the stage's top level).
PLAN_KEYS = ("targets", "method", "ratio", "rank", "energy", "params", "bits", "group_size", "allocation", "max_shift",
             "multiple_of", "calibration_windows", "window", "self_share", "untie_head", "joint", "options")
# Plan fields a saved stage lists only when they differ from the Plan defaults.
OPTIONAL_PLAN_KEYS = ("bits", "group_size", "allocation", "max_shift", "multiple_of", "calibration_windows", "window", "self_share",
                      "untie_head", "joint")
BUDGET_KEYS = ("bytes", "params", "bf16_fraction")
# Stage keys that may be lists under a budget, which then picks one value of each (solve_budget): Plan.bits and
# gptq's rare_share.
CHOOSABLE = ("bits", "rare_share")
RECIPE_KEYS = ("stages", "name", "description") + BUDGET_KEYS

BUILTIN_RECIPES: dict[str, dict[str, Any]] = {
    "half": {
        "description": "at most half the original's bfloat16 bytes: gptq at 6 bits in groups of 64 on every linear, then on "
                       "the embedding/head (weighed by the compressed model's final hidden states)",
        # Measured at half (frontier_gemma.md, frontier_smollm2.md): 6-bit gptq keeps dense perplexity (Gemma-3-270M
        # 56.66 vs 56.98 at 0.41 of bf16), where GroupReduce + fwhiten with 8-bit factors doubled it (55.07 -> 112.53).
        "bf16_fraction": 0.5,
        "stages": [
            {"targets": ["linears"], "method": "gptq", "ratio": 1.0, "bits": 6, "group_size": 64},
            {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1.0, "bits": 6, "group_size": 64},
        ],
    },
    "quarter": {
        "description": "at most a quarter of the original's bfloat16 bytes (groups of 64): gptq on attention at 6 or 5 bits, "
                       "nystrom MLP channels with 5- or 4-bit weights rounded on calibration inputs, gptq on the "
                       "embedding/head at 4 bits with the 80% or 50% of its rows the calibration text and lmshrink's "
                       "reference text use least at 2 bits; the budget takes the first of these choices (in that order) "
                       "that keeps every MLP channel, else 5/4 bits, a 50% share, and the channels that leaves",
        # Quantization alone cannot reach a quarter at 4 bits (scales included, 4-bit groups of 64 are 0.28 of bf16),
        # and 3 bits everywhere breaks the model (frontier_*.md). Gemma-3-270M on 16k tokens (dense 43.77): the table at
        # 3 bits with attention 5 / MLP 4 gave 51.82; 80% rare rows at 2 bits paid for 6 / 5 and gave 47.25. SmolLM2
        # (a small table, 4k tokens): 80% rare rows 42.06, 50% 39.22, the table at 3 bits 39.87; on 8k tokens 50% rare rows
        # 45.54 against 44.69 at 3 bits, and 1.1-1.2x on pydoc and stdlib text (2.2x before rows were also counted in the
        # reference text, gptq's rare_reference; rare_rows_smollm2-135m.md). With the reference counts, 16k tokens: Gemma
        # 47.68 (46.28 counted in WikiText-2 alone), SmolLM2 38.70 (37.51) (frontier_*_16k.md).
        "bf16_fraction": 0.25,
        "stages": [
            {"targets": ["attention"], "method": "gptq", "ratio": 1.0, "bits": [6, 5], "group_size": 64},
            {"targets": ["mlp"], "method": "nystrom", "ratio": 1.0, "bits": [5, 4], "group_size": 64},
            {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1.0, "bits": 4, "rare_bits": 2,
             "rare_share": [0.8, 0.5], "group_size": 64},
        ],
    },
    "channels": {
        "description": "the linears at 0.8 of their parameters: nystrom MLP channels (the same share in every MLP, "
                       "refitted down projection) + fwhiten attention (allocated by sensitivity); an eighth of the "
                       "calibration windows sampled from the model itself",
        # uniform MLP channels: 29.82 on SmolLM2, sensitivity 30.31 (closer.md). Self-sampled windows: the calibration
        # text alone (WikiText-2 has no bare newline token) left greedy generation looping on newlines (channel_damping.md).
        "stages": [
            {"targets": ["mlp"], "method": "nystrom", "ratio": 0.8, "self_share": 0.125},
            {"targets": ["attention"], "method": "fwhiten", "ratio": 0.8, "allocation": "sensitivity", "self_share": 0.125},
        ],
    },
}


@dataclass
class Recipe:
    """Stages (Plans) applied in order, and an optional whole-model budget (at most one of the three)."""

    stages: list  # list[Plan]
    bytes: int | None = None
    params: int | None = None
    bf16_fraction: float | None = None
    name: str = ""
    description: str = ""
    # Per stage: {key: values} for the CHOOSABLE keys given as lists (the budget picks one value each); empty: none.
    choices: list = field(default_factory=list)

    def stage_choices(self, index: int) -> dict[str, tuple]:
        return self.choices[index] if index < len(self.choices) else {}

    def budget(self) -> tuple[str, float] | None:
        given = [(key, getattr(self, key)) for key in BUDGET_KEYS if getattr(self, key) is not None]
        return given[0] if given else None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "description": self.description,
               "stages": [{**_stage_dict(plan), **{key: list(values) for key, values in self.stage_choices(i).items()}}
                          for i, plan in enumerate(self.stages)]}
        out.update({key: getattr(self, key) for key in BUDGET_KEYS if getattr(self, key) is not None})
        return out

    def describe(self) -> str:
        budget = self.budget()
        def bits(i, plan):  # a list the budget chooses from: "6|5 bits"
            widths = self.stage_choices(i).get("bits") or ((plan.bits,) if plan.bits else ())
            return f", {'|'.join(map(str, widths))} bits" if widths else ""

        head = f"recipe {self.name or '(unnamed)'}: " + "; ".join(
            f"{p.method} on {', '.join(p.targets)} ({p.amount()}{bits(i, p)})" for i, p in enumerate(self.stages))
        return head + (f"; budget {budget[0]}={budget[1]:,}" if budget else "")


def _stage_dict(plan) -> dict[str, Any]:
    from lmshrink.plan import Plan

    defaults = Plan(ratio=1.0)
    out = {"targets": list(plan.targets), "method": plan.method}
    for key in ("ratio", "rank", "energy", "params"):
        if getattr(plan, key) is not None:
            out[key] = getattr(plan, key)
    for key in OPTIONAL_PLAN_KEYS:
        if getattr(plan, key) != getattr(defaults, key):
            out[key] = getattr(plan, key)
    if plan.options:
        out["options"] = dict(plan.options)
    return out


# -- reading ---------------------------------------------------------------------------------------------------------

def load_recipe(spec) -> Recipe:
    """A Recipe from a built-in name, a YAML/JSON file, a directory saved by lmshrink (its manifest's recipe), a dict,
    or a Recipe / list of Plans (returned as a Recipe)."""
    from lmshrink.plan import Plan

    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Plan):
        return Recipe([spec])
    if isinstance(spec, (list, tuple)) and all(isinstance(p, Plan) for p in spec) and spec:
        return Recipe(list(spec))
    if isinstance(spec, dict):
        return parse_recipe(spec, "recipe")
    text = str(spec)
    if text in BUILTIN_RECIPES:
        return parse_recipe({"name": text, **BUILTIN_RECIPES[text]}, f"built-in recipe {text!r}")
    path = Path(text).expanduser()
    if path.is_dir():
        from lmshrink.io import read_manifest

        manifest = read_manifest(path)
        if not isinstance(manifest.get("recipe"), dict):
            raise InvalidArgument("--recipe", f"saved model {text!r} records no recipe (it was not compressed with one)",
                                  "a directory saved by `lmshrink compress --recipe`, a YAML/JSON file, or a built-in: "
                                  + ", ".join(BUILTIN_RECIPES))
        # The manifest also records what was run ("applied", "budget"); the recipe is what was asked.
        asked = {key: value for key, value in manifest["recipe"].items() if key in RECIPE_KEYS}
        return parse_recipe(asked, f"recipe of {text!r}")
    if not path.is_file():
        raise InvalidArgument("--recipe", f"{text!r} is neither a file, a saved lmshrink directory nor a built-in recipe",
                              f"a YAML/JSON file, a directory saved by lmshrink, or one of: {', '.join(BUILTIN_RECIPES)}")
    if path.stat().st_size > 1 << 20:
        raise InvalidArgument("--recipe", f"{text!r} holds {path.stat().st_size:,} bytes", "a recipe file below 1 MiB")
    content = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(content)
        else:
            import yaml

            data = yaml.safe_load(content)  # safe_load: plain data only, never Python objects
    except Exception as error:  # noqa: BLE001 - json's ValueError, yaml's own YAMLError kinds
        from lmshrink.safefiles import one_line

        raise InvalidArgument("--recipe", f"{text!r} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                              f"({one_line(error)[:120]})", "a YAML or JSON mapping with a 'stages' list") from None
    return parse_recipe(data, f"recipe {text!r}", default_name=path.stem)


def parse_recipe(data: Any, where: str = "recipe", default_name: str = "") -> Recipe:
    """A Recipe from plain data (what a YAML/JSON file holds), every key checked."""
    if not isinstance(data, dict):
        raise InvalidArgument("--recipe", f"{where} is a {type(data).__name__}", "a mapping with a 'stages' list")
    unknown = sorted(set(map(str, data)) - set(RECIPE_KEYS))
    if unknown:
        raise InvalidArgument("--recipe", f"{where} has unknown key(s) {unknown}", f"keys {', '.join(RECIPE_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise InvalidArgument("--recipe", f"{where} has no 'stages' list", "'stages': a non-empty list of stages")
    budget = {key: data[key] for key in BUDGET_KEYS if data.get(key) is not None}
    if len(budget) > 1:
        raise InvalidArgument("--recipe", f"{where} gives {' and '.join(budget)}", f"at most one budget: {', '.join(BUDGET_KEYS)}")
    for key, value in budget.items():
        if key == "bf16_fraction":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InvalidArgument("bf16_fraction", f"{value!r} is not a number in (0, 1]", "0 < F <= 1 of the original's bfloat16 bytes")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < 1e18 or value != int(value):
            raise InvalidArgument(key, f"{value!r} is not a positive integer", f"an integer {key} >= 1 for the whole model")
    choices = [_stage_choices(stage, index, bool(budget)) for index, stage in enumerate(stages, 1)]
    plans = [_parse_stage({**stage, **{key: values[0] for key, values in given.items()}}, index, bool(budget))
             for index, (stage, given) in enumerate(zip(stages, choices), 1)]
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise InvalidArgument("--recipe", f"{where} '{key}' is a {type(data[key]).__name__}", "a string")
    return Recipe(plans, bytes=int(budget["bytes"]) if "bytes" in budget else None,
                  params=int(budget["params"]) if "params" in budget else None, bf16_fraction=budget.get("bf16_fraction"),
                  name=data.get("name") or default_name, description=data.get("description", ""),
                  choices=choices if any(choices) else [])


def _stage_choices(stage: Any, index: int, budgeted: bool) -> dict[str, tuple]:
    """A stage's CHOOSABLE keys given as lists: {key: values}, checked (each value is checked again as the stage's)."""
    from lmshrink.decompose.quantize import SUPPORTED_BITS

    given = {key: stage[key] for key in CHOOSABLE if isinstance(stage, dict) and isinstance(stage.get(key), list)}
    for key, values in given.items():
        where = f"recipe stage {index} {key}"
        if not budgeted:
            raise InvalidArgument(where, f"is a list {values!r} but the recipe has no budget to choose by",
                                  "one value, or a budget (bytes, params, bf16_fraction) with the list")
        valid = (all(not isinstance(v, bool) and v in SUPPORTED_BITS for v in values) if key == "bits" else
                 all(not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < 1 for v in values))
        if not values or not valid or len(set(values)) != len(values):
            raise InvalidArgument(where, f"{values!r} is not a list of distinct allowed values",
                                  f"widths from {SUPPORTED_BITS}, e.g. [6, 5]" if key == "bits" else "shares in (0, 1), e.g. [0.8, 0.5]")
    return {key: tuple(values) for key, values in given.items()}


def _parse_stage(stage: Any, index: int, budgeted: bool):
    from lmshrink.methods import get_method
    from lmshrink.plan import Plan

    where = f"recipe stage {index}"
    if not isinstance(stage, dict):
        raise InvalidArgument(where, f"is a {type(stage).__name__}", "a mapping such as {targets: [linears], method: svd, ratio: 0.8}")
    if "method" not in stage or not isinstance(stage["method"], str):
        raise InvalidArgument(where, "has no 'method' string", "method: one of `lmshrink methods`")
    method = get_method(stage["method"])
    method_options = {o.name for o in method.options} - set(PLAN_KEYS)
    unknown = sorted(set(map(str, stage)) - set(PLAN_KEYS) - method_options)
    if unknown:
        raise InvalidArgument(f"{where} ({method.name})", f"has unknown key(s) {unknown}",
                              f"keys {', '.join(PLAN_KEYS)}" + (f", or {method.name}'s options {', '.join(sorted(method_options))}"
                                                                 if method_options else ""))
    options = stage.get("options", {}) or {}
    if not isinstance(options, dict):
        raise InvalidArgument(f"{where} options", f"is a {type(options).__name__}", "a mapping of the method's options")
    options = {**options, **{k: v for k, v in stage.items() if k in method_options}}
    arguments = {k: v for k, v in stage.items() if k in PLAN_KEYS and k != "options"}
    if "targets" not in arguments:
        raise InvalidArgument(where, "has no 'targets'", "targets: a list of groups (linears, attention, mlp, embedding, lm_head) or globs")
    targets = arguments["targets"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise InvalidArgument(f"{where} targets", f"{targets!r}", "a non-empty list of group names or globs")
    arguments["targets"] = tuple(targets)
    amounts = [k for k in ("ratio", "rank", "energy", "params") if arguments.get(k) is not None]
    if budgeted and not amounts:
        arguments["ratio"] = 1.0  # its share of the budget
    for key in ("ratio", "energy", "max_shift"):
        value = arguments.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            arguments[key] = float(value)
    try:
        plan = Plan(**arguments, options=options)
        method.resolve_options(plan.options)
    except InvalidArgument as error:
        raise InvalidArgument(f"{where} ({method.name}) {error.argument.lstrip('-').replace('-', '_')}", error.problem, error.allowed) from None
    except TypeError as error:
        raise InvalidArgument(where, f"a value of the wrong type ({error})", "numbers for amounts, strings for names") from None
    return plan


# -- resolving against a model ---------------------------------------------------------------------------------------

def stage_targets(loaded, recipe: Recipe) -> list[list]:
    """Each stage's targets in this model; two stages on one target is an error naming the target and both stages."""
    from lmshrink.plan import select_targets

    owner: dict[str, int] = {}
    resolved = []
    for index, plan in enumerate(recipe.stages):
        try:
            targets = select_targets(loaded.candidates(), plan.targets)
        except InvalidArgument as error:
            raise InvalidArgument(f"recipe stage {index + 1} ({plan.method}) targets", error.problem, error.allowed) from None
        for target in targets:
            if target.name in owner:
                first = owner[target.name]
                what = target.name + (f" (tied to {target.tied_head})" if target.tied_head else "")
                raise InvalidArgument("--recipe", f"stages {first + 1} ({recipe.stages[first].method} on "
                                      f"{', '.join(recipe.stages[first].targets)}) and {index + 1} ({plan.method} on "
                                      f"{', '.join(plan.targets)}) both target {what}",
                                      "stages whose targets do not overlap (each matrix compressed by one stage)")
            owner[target.name] = index
        resolved.append(targets)
    return resolved


def _element_bytes(target) -> int:
    return target.weight().element_size()


def _bias_size(target, unit: str) -> int:
    bias = getattr(target.module, "bias", None)
    if bias is None or not hasattr(bias, "numel"):
        return 0
    return bias.numel() * (bias.element_size() if unit == "bytes" else 1)


def _factor_bytes(shapes, bits, group_size, element: int) -> int:
    from lmshrink.decompose.quantize import quantized_nbytes

    if bits is None:
        return sum(m * n for m, n in shapes) * element
    return sum(quantized_nbytes((m, n), bits, group_size) for m, n in shapes)


def predicted_size(plan, targets: list, unit: str) -> int:
    """Bytes (``unit`` "bytes") or parameters ("params") the stage's targets will take under ``plan`` (uniform ranks;
    a sensitivity allocation spends the same parameters). An upper bound where the method decides shapes itself."""
    from lmshrink.allocation import allocate
    from lmshrink.methods import get_method
    from lmshrink.quantize_factors import DENSE_QUANTIZERS

    method = get_method(plan.method)
    options = method.resolve_options(plan.options)
    bits = plan.bits if unit == "bytes" else None
    element = 1 if unit == "params" else None
    total = 0
    if method.kind == "lowrank":
        ranks = allocate(targets, replace(plan, allocation="uniform"), {})
        for t in targets:
            (m, n), e = t.shape, element or _element_bytes(t)
            bias = _bias_size(t, unit)
            k = ranks[t.name]
            # A target left dense is stored at the stage's bits too (quantize_factors), else in float.
            total += bias + _factor_bytes([(m, n)] if k is None else [(m, k), (k, n)], bits, plan.group_size, e)
        return total
    if plan.method in DENSE_QUANTIZERS:
        for t in targets:
            e = element or _element_bytes(t)
            if getattr(options, "mixed", False) and t.kind == "embedding" and bits is not None:  # gptq --rare-bits
                from lmshrink.methods.gptq import rare_row_count

                (vocab, dim), rare = t.shape, rare_row_count(t.shape[0], options.rare_share)
                total += (_factor_bytes([(vocab - rare, dim)], bits, plan.group_size, e)
                          + _factor_bytes([(rare, dim)], options.rare_bits, plan.group_size, e) + vocab)  # + a bool per row
            else:
                total += _bias_size(t, unit) + _factor_bytes([t.shape], bits, plan.group_size, e)
        return total
    if plan.method == "groupreduce":
        from lmshrink.decompose.groupreduce import budget_for_ratio

        for t in targets:
            (vocab, dim), e = t.shape, element or _element_bytes(t)
            if plan.ratio is None:
                raise InvalidArgument("--recipe", "a groupreduce stage under a budget needs a ratio", "ratio: R")
            budget = budget_for_ratio((vocab, dim), plan.ratio)
            groups = min(options.groups, vocab)
            if budget < vocab + groups * dim:  # below rank 1 in every group
                raise InvalidArgument("ratio", f"{plan.ratio:g} is below groupreduce's rank 1 per group", "a larger ratio")
            index = vocab * (1 if groups <= 256 else 2)
            if bits is None:
                total += budget * e + (index if unit == "bytes" else 0)
            else:  # values + one float16 scale and minimum per row or column group (bounded above) + per-factor rounding
                size = plan.group_size or dim
                total += -(-budget * bits // 8) + 4 * (budget // size + vocab + budget // dim + groups) + 2 * groups + index
            total += _bias_size(t, unit)
        return total
    if plan.method in ("tt", "tt-matrix"):
        from lmshrink.decompose.tt import padded_factorization, parse_shape
        from lmshrink.methods.tt import _dim_shape, cap_for_ratio, uniform_ranks

        for t in targets:
            (vocab, dim), e = t.shape, element or _element_bytes(t)
            shape = _dim_shape(options, dim)
            if plan.method == "tt":
                cap = options.tt_max_rank or plan.rank
                if plan.ratio is not None:
                    ratio_cap = cap_for_ratio(shape, vocab, vocab * dim, plan.ratio, "a per-token train")
                    cap = ratio_cap if cap is None else min(cap, ratio_cap)
                ranks = uniform_ranks(shape, cap)
                shapes = [(vocab, ranks[k] * n * ranks[k + 1]) for k, n in enumerate(shape)]
                extra = vocab * (len(shape) + 1) * 2 if unit == "bytes" else 0  # token_ranks (int16)
            else:
                vocab_shape = (parse_shape(options.tt_vocab_shape, vocab, "--tt-vocab-shape") if options.tt_vocab_shape
                               else padded_factorization(vocab, len(shape)))
                merged = tuple(v * n for v, n in zip(vocab_shape, shape))
                cap = options.tt_max_rank or plan.rank
                if plan.ratio is not None:
                    ratio_cap = cap_for_ratio(merged, 1, vocab * dim, plan.ratio, "a TT-matrix")
                    cap = ratio_cap if cap is None else min(cap, ratio_cap)
                ranks = uniform_ranks(merged, cap)
                shapes = [(ranks[k] * v, n * ranks[k + 1]) for k, (v, n) in enumerate(zip(vocab_shape, shape))]
                extra = 0
            total += _factor_bytes(shapes, bits, plan.group_size, e) + extra
        return total
    if plan.method == "nystrom":
        from lmshrink.channel_groups import ChannelTarget
        from lmshrink.methods.nystrom import channel_budget

        grouped = method.group_targets(targets)
        groups = [g for g in grouped if isinstance(g, ChannelTarget)]
        bounds = channel_budget(replace(plan, allocation="uniform"), groups)  # sensitivity keeps the same parameters
        for t in grouped:
            if not isinstance(t, ChannelTarget):  # outside a complete MLP: stays dense (at the stage's bits, if any)
                total += _bias_size(t, unit) + _factor_bytes([t.shape], bits, plan.group_size, element or _element_bytes(t))
        for group, (_, keep, _) in zip(groups, bounds):
            channels = group.shape[0]
            for member in group.members:
                m, n = member.shape
                shrunk = (keep, n) if member is not group.consumer else (m, keep)
                bias = _bias_size(member, unit)
                total += (bias * keep // channels if member is not group.consumer else bias) \
                    + _factor_bytes([shrunk], bits, plan.group_size, element or _element_bytes(member)) \
                    + (keep * 4 if unit == "bytes" and keep < channels else 0)  # the kept channels' int32 index (none: all kept)
        return total
    raise InvalidArgument("--recipe", f"method {plan.method!r} under a whole-model budget: its size cannot be predicted",
                          "budgeted stages with low-rank methods, nystrom, groupreduce, tt, tt-matrix or quantize; or no budget")


def _dense_size(loaded, targets: list, unit: str) -> int:
    """What the targets take now (unique tensors: a tied embedding/head counts once)."""
    from lmshrink.accounting import _unique

    tensors = list(_unique(t for target in targets for t in target.module.state_dict(keep_vars=True).values()))
    if unit == "params":
        return sum(t.numel() for t in tensors if t.is_floating_point())
    return sum(t.numel() * t.element_size() for t in tensors)


def model_size(loaded, unit: str) -> int:
    from lmshrink.accounting import count_bytes, count_params

    return count_bytes(loaded.model) if unit == "bytes" else count_params(loaded.model)


def budget_target(loaded, recipe: Recipe) -> tuple[str, int] | None:
    """(unit, limit) of the recipe's budget for this model: bf16_fraction becomes bytes of the bfloat16 original."""
    from lmshrink.accounting import count_params

    budget = recipe.budget()
    if budget is None:
        return None
    key, value = budget
    if key == "bf16_fraction":
        return "bytes", math.floor(value * 2 * count_params(loaded.model))
    return key, int(value)


BUDGET_MARGIN = 0.005


def _useful_ratio(plan, targets: list) -> float:
    """The largest ratio at which a low-rank stage still factorizes every target (0.95 for groupreduce/tt, 1 for the
    dense quantizers and for nystrom with bits).

    Above it a matrix stays dense, in float: under a byte budget that is never what quantized factors were for. A
    sensitivity allocation moves ranks up to (1 + max_shift) times the uniform rank, so its limit is lower by that much.
    """
    from lmshrink.accounting import largest_smaller_rank
    from lmshrink.methods import get_method
    from lmshrink.quantize_factors import DENSE_QUANTIZERS

    if plan.method in DENSE_QUANTIZERS or not targets:
        return 1.0
    if get_method(plan.method).group_targets is not None and plan.bits is not None:
        return 1.0  # an MLP keeping all its channels is stored as a quantized dense matrix (rounded as gptq rounds)
    if get_method(plan.method).kind != "lowrank":
        return 0.95  # block / train factorizations at ratio ~1 may come out no smaller than dense, and stay dense

    shift = 1 + (plan.max_shift or 0) if plan.allocation == "sensitivity" else 1
    useful = []
    for target in targets:
        (m, n), top = target.shape, largest_smaller_rank(target.shape, plan.multiple_of)
        if top is None:
            return 1e-9
        # budget.shift_bounds lets a target stay dense when ceil(uniform rank x shift) reaches its largest useful rank.
        rank = top if shift == 1 else max(1, math.floor((top - 1) / shift))
        while rank > 1 and shift > 1 and math.ceil(rank * shift) >= top:
            rank -= 1
        useful.append(rank * (m + n) / (m * n))
    return max(min(useful) * (1 - 1e-9), 1e-9)


def solve_budget(loaded, recipe: Recipe, targets: list[list]) -> tuple[list, dict]:
    """The stages with their ratios scaled by the one factor s that meets the budget (largest s whose predicted size
    fits); and what was predicted. A budget below what the recipe reaches at its smallest is an error naming that.

    Stages whose ``bits`` (or gptq's ``rare_share``) is a list: the first assignment, in the lists' order (earlier
    stages first, each list most preferred first), with which every stage keeps its full amount within the budget; if
    none, the last value of each list, amounts scaled. So bytes go to more bits only where nothing has to be cut to pay
    for them."""
    unit, limit = budget_target(loaded, recipe)
    for plan in recipe.stages:
        if plan.energy is not None:
            raise InvalidArgument("--recipe", f"stage {plan.method} on {', '.join(plan.targets)} uses energy under a budget",
                                  "ratio (a share of the budget), params or rank stages with a budget")
    stages = [plan.for_targets(t) if plan.params is not None else plan for plan, t in zip(recipe.stages, targets)]
    lists = [(i, key, values) for i in range(len(stages)) for key, values in recipe.stage_choices(i).items()]
    if not lists:
        return _solve_scale(loaded, unit, limit, stages, targets)

    def chosen(assignment) -> list:
        plans = list(stages)
        for (i, key, _), value in zip(lists, assignment):
            plans[i] = (replace(plans[i], bits=value) if key == "bits"
                        else replace(plans[i], options={**plans[i].options, key: value}))
        return plans

    fitting = (assignment for assignment in itertools.product(*(values for _, _, values in lists))
               if (size := _full_size(loaded, unit, chosen(assignment), targets)) is not None and size <= limit)
    assignment = next(fitting, None) or tuple(values[-1] for _, _, values in lists)
    stages, solution = _solve_scale(loaded, unit, limit, chosen(assignment), targets)
    picked = [{} for _ in stages]
    for (i, key, _), value in zip(lists, assignment):
        picked[i][key] = value
    return stages, {**solution, "chosen": picked}


def _fixed_and_margin(loaded, unit: str, stages: list, targets: list[list]) -> tuple[int, float]:
    """What the stages do not touch, and the margin their sizes are taken with: sensitivity allocations shift ranks, and
    bytes with them; other stages' sizes are predicted exactly (or bounded above: groupreduce, tt), so need none."""
    fixed = model_size(loaded, unit) - _dense_size(loaded, [t for group in targets for t in group], unit)
    return fixed, BUDGET_MARGIN if any(plan.allocation == "sensitivity" for plan in stages) else 0.0


def _full_size(loaded, unit: str, stages: list, targets: list[list]) -> int | None:
    """The predicted whole-model size with every scalable stage at its largest useful amount (None: cannot be built)."""
    fixed, margin = _fixed_and_margin(loaded, unit, stages, targets)
    try:
        return math.ceil((fixed + sum(predicted_size(replace(plan, ratio=_useful_ratio(plan, t)) if plan.ratio is not None else plan,
                                                     t, unit) for plan, t in zip(stages, targets))) * (1 + margin))
    except InvalidArgument:
        return None


def _solve_scale(loaded, unit: str, limit: int, stages: list, targets: list[list]) -> tuple[list, dict]:
    """solve_budget for stages of fixed widths: the one scale of their ratios."""
    fixed, margin = _fixed_and_margin(loaded, unit, stages, targets)
    shares = [plan.ratio for plan in stages]
    caps = [_useful_ratio(plan, t) for plan, t in zip(stages, targets)]

    def scaled(s):
        return [replace(plan, ratio=min(cap, s * share)) if share is not None else plan
                for plan, share, cap in zip(stages, shares, caps)]

    def size(s):
        try:  # sized against the limit less a margin where sensitivity allocations shift ranks, and bytes with them
            return math.ceil((fixed + sum(predicted_size(plan, t, unit) for plan, t in zip(scaled(s), targets))) * (1 + margin))
        except InvalidArgument:
            return None  # a stage cannot go that small

    scalable = [share for share in shares if share is not None]
    high = 1.0 / min(scalable) if scalable else 1.0
    grid = [high * 0.5 ** (i / 4) for i in range(0, 80)]  # down to ~1e-6 of the top
    sizes = [(s, size(s)) for s in grid]
    feasible = [(s, b) for s, b in sizes if b is not None]
    if not feasible:
        raise InvalidArgument(f"budget {unit}", "no stage amount of this recipe can be built on this model", "other stages")
    smallest = min(b for _, b in feasible)
    if smallest > limit:
        raise InvalidArgument(f"budget {unit}", f"{limit:,} is below what this recipe can reach on this model "
                              f"(about {smallest:,} {unit} with every stage at its smallest amount)",
                              f"{unit} >= {smallest:,} (the nearest feasible), or fewer bits / more targets in the stages")
    fitting = [s for s, b in feasible if b <= limit]
    low, top = max(fitting), None
    above = [s for s, b in sizes if s > low]
    top = min(above) if above else None
    if top is not None:  # bisect between the last fitting grid point and the next one up
        for _ in range(40):
            middle = (low + top) / 2
            b = size(middle)
            if b is not None and b <= limit:
                low = middle
            else:
                top = middle
    return scaled(low), {"unit": unit, "limit": limit, "predicted": size(low), "margin": margin, "scale": low,
                         "fixed": fixed}


# -- applying --------------------------------------------------------------------------------------------------------

def check_recipe(loaded, recipe: Recipe) -> tuple[list, dict | None]:
    """Every check that needs no calibration, before any work: targets of each stage (no overlap), each stage's plan
    (method, options, bits on its layer kinds), the budget. Returns the stages to run (budget solved) and the solution."""
    from lmshrink.surgery import check_plan

    recipe = load_recipe(recipe)
    targets = stage_targets(loaded, recipe)
    stages, solution = list(recipe.stages), None
    if recipe.budget() is not None:
        stages, solution = solve_budget(loaded, recipe, targets)
    for index, plan in enumerate(stages):
        try:
            check_plan(loaded, plan)
        except InvalidArgument as error:
            raise InvalidArgument(f"recipe stage {index + 1} ({plan.method}): {error.argument}", error.problem, error.allowed) from None
    return stages, solution


def apply_recipe(loaded, recipe, data=None, progress: bool = True, on_stage=None, world=None) -> list:
    """Run the recipe's stages on ``loaded`` in place (via lmshrink.compress, with ``world`` as it takes it); return
    one CompressionReport per stage.

    ``loaded.compression`` then holds every stage's rows, and ``loaded.recipe`` the recipe (saved in the manifest, so
    ``load_recipe(saved_dir)`` reuses it) with the stages as run and, under a budget, what was predicted and measured.
    """
    from lmshrink.data import Corpus, load_corpus
    from lmshrink.models import load_model
    from lmshrink.surgery import compress

    on_stage = on_stage or (lambda text: None)
    loaded = load_model(loaded)
    recipe = load_recipe(recipe)
    stages, solution = check_recipe(loaded, recipe)
    limit = budget_target(loaded, recipe)  # of the original model: before any stage runs
    corpus = data if isinstance(data, Corpus) or data is None else load_corpus(data)
    if corpus is None and any(_needs_data(plan) for plan in stages):
        corpus = load_corpus(None)
    original_params = model_size(loaded, "params")
    reports, rows = [], []
    for index, plan in enumerate(stages):
        on_stage(f"recipe stage {index + 1}/{len(stages)}: {plan.method} on {', '.join(plan.targets)} ({plan.amount()}"
                 f"{f', {plan.bits}-bit factors' if plan.bits else ''})")
        report = compress(loaded, plan, data=corpus, progress=progress, on_stage=on_stage, world=world)
        report.plan["stage"] = index + 1
        reports.append(report)
        rows += [{**row, "stage": index + 1} for row in report.modules]
    loaded.compression = rows
    missed = record_recipe(loaded, recipe, stages, solution, limit, original_params)
    if missed:
        reports[-1].notes.append(missed)
    return reports


def record_recipe(loaded, recipe: Recipe, stages: list, solution: dict | None, limit: tuple[str, int] | None,
                  original_params: int) -> str | None:
    """``loaded.recipe``: the recipe, its stages as run and, under a budget (``limit``: budget_target of the original
    model), what was predicted and measured (from the model and every stage's rows in ``loaded.compression``).
    Returns a note when the budget was missed."""
    record = recipe.to_dict()
    record["applied"] = [_stage_dict(plan) for plan in stages]
    missed = None
    if solution is not None:
        unit, limit = limit
        if unit == "bytes":
            measured = model_size(loaded, "bytes")
        else:  # factors counted as values whatever their bits: the rows' float parameter counts
            measured = original_params - sum(r["params_before"] - r["params_after"] for r in loaded.compression)
        record["budget"] = {**solution, "measured": measured, "met": measured <= limit}
        if measured > limit:
            missed = f"budget missed: {measured:,} {unit} against {limit:,} (the prediction said {solution['predicted']:,})"
    loaded.recipe = record
    return missed


def _needs_data(plan) -> bool:
    from lmshrink.methods import get_method

    return bool(get_method(plan.method).needs_for(plan.options))


def combined_report(reports: list):
    """One CompressionReport over every stage (modules concatenated, sizes from before the first to after the last)."""
    from lmshrink.surgery import CompressionReport

    first, last = reports[0], reports[-1]
    modules = [{**row, "stage": report.plan.get("stage")} for report in reports for row in report.modules]
    return CompressionReport({"stages": [r.plan for r in reports]}, modules, first.params_before, last.params_after,
                             first.bytes_before, last.bytes_after, sum(r.seconds for r in reports),
                             sum(r.stats_seconds for r in reports), [n for r in reports for n in r.notes])


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names with their descriptions (what `lmshrink methods` lists)."""
    return {name: spec["description"] for name, spec in BUILTIN_RECIPES.items()}


__all__ = ["BUILTIN_RECIPES", "Recipe", "apply_recipe", "builtin_recipes", "check_recipe", "combined_report", "load_recipe",
           "parse_recipe", "solve_budget"]
