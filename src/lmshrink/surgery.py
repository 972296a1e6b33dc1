"""compress(): select targets, gather statistics, allocate ranks, factorize, swap modules, report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lmshrink.accounting import relative_error, count_bytes, count_params, module_params
from lmshrink.allocation import allocate, check_amounts
from lmshrink.calibration import collect_stats
from lmshrink.data import Corpus, with_self_share
from lmshrink.distributed import SINGLE, World, agree, current_world, matrix_cost, spread
from lmshrink.errors import InvalidArgument
from lmshrink.joint import JointTarget, merged_stats, model_groups, joint_targets, split_rows
from lmshrink.layers.base import carry_output_scale, replace_module
from lmshrink.layers.lowrank import LowRankEmbedding, LowRankLinear, TiedHead
from lmshrink.methods import get_method
from lmshrink.models import LoadedModel, load_model
from lmshrink.plan import Plan, Target, select_targets
from lmshrink.version import __version__


@dataclass
class CompressionReport:
    plan: dict
    modules: list[dict]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    stats_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def compressed(self) -> list[dict]:
        return [m for m in self.modules if m["status"] == "factorized"]

    def to_dict(self) -> dict:
        return {"plan": self.plan, "params_before": self.params_before, "params_after": self.params_after,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "seconds": self.seconds,
                "stats_seconds": self.stats_seconds, "notes": self.notes, "modules": self.modules}


def lowrank_layer(target: Target, left: torch.Tensor, right: torch.Tensor) -> nn.Module:
    """The factorized module for a target: LowRankEmbedding for embeddings, LowRankLinear otherwise."""
    dtype = target.weight().dtype
    left, right = left.to(dtype), right.to(dtype)
    if target.kind == "embedding":
        return LowRankEmbedding.from_embedding(target.module, left.shape[1], factors=(left, right))
    return LowRankLinear.from_linear(target.module, left.shape[1], factors=(left, right))


def check_plan(model, plan: Plan) -> list[Target]:
    """Fail fast on a plan that cannot apply to this model (method, options, targets, budget, ranks); return its targets.

    Cheap: nothing is allocated or factorized (compress allocates once, after calibrating).
    """
    from lmshrink.quantize_factors import check_quantizable, reconcile_bits

    loaded = load_model(model)
    plan = reconcile_bits(plan)
    method = get_method(plan.method)
    method.resolve_options(plan.options)
    targets = select_targets(loaded.candidates(), plan.targets)
    unsupported = [t.name for t in targets if t.kind not in method.target_kinds and not (t.kind == "lm_head" and "linear" in method.target_kinds)]
    if unsupported:
        raise InvalidArgument("--targets", f"method {method.name!r} cannot compress {unsupported[:3]}{' ...' if len(unsupported) > 3 else ''}",
                              f"targets of kind {sorted(method.target_kinds)}")
    if plan.untie_head and not any(t.tied_head for t in targets):
        raise InvalidArgument("--untie-head", "no targeted embedding shares its weight with an output layer",
                              "targets that include a tied token embedding (--targets embedding on a model with tied embeddings), "
                              "or no --untie-head")
    if plan.joint and method.kind != "lowrank":
        raise InvalidArgument("--joint", f"method {method.name!r} is not a low-rank method (it has no right factor to share)",
                              "a low-rank method (svd, rsvd, fwsvd, asvd, svdllm, fwhiten, kfac), or no --joint")
    if plan.allocation != "uniform" and method.kind != "lowrank" and method.group_targets is None:
        raise InvalidArgument("--allocation", f"method {method.name!r} builds its own modules at the ratio; it has no ranks to allocate",
                              "--allocation uniform with this method (sensitivity: a low-rank method)")
    check_quantizable(method, targets, plan)
    plan = plan.for_targets(targets)
    if method.kind == "lowrank":
        check_amounts(targets, plan)
    return targets


def compress(model, plan: Plan, data: Corpus | str | None = None, progress: bool = True, on_stage=None,
             world: World | None = None) -> CompressionReport:
    """Apply ``plan`` to ``model`` in place and return what changed, module by module.

    ``model`` is anything ``load_model`` accepts; ``data`` (a Corpus or what ``load_corpus`` accepts) is
    needed only by methods that calibrate on text. The LoadedModel keeps the per-module report, which
    ``save`` writes into the manifest. ``on_stage(text)``, if given, is told when calibrating and factorizing start.
    ``world`` (default: the initialized torch.distributed process group, if any): every process holds the whole
    model and runs this with the same plan; they split the calibration windows and the low-rank factorizations
    (and sensitivity spectra) by cost, and all end with the same compressed model (lmshrink.distributed).
    """
    from lmshrink.quantize_factors import quantize_factors, reconcile_bits

    world = current_world() if world is None else world
    on_stage = on_stage or (lambda text: None)
    loaded = load_model(model)
    plan = reconcile_bits(plan)  # bits/quant_group options -> Plan.bits/group_size: one meaning of --bits
    method = get_method(plan.method)
    options = method.resolve_options(plan.options)
    targets = check_plan(loaded, plan)
    asked, plan = plan, plan.for_targets(targets)  # a --params budget becomes the global ratio over these targets
    if world.distributed:  # the same lmshrink, plan and targets everywhere, or every process refuses together
        agree(world, {"lmshrink": __version__, "plan": plan.to_dict(), "targets": [t.name for t in targets]})
    params_before, bytes_before = count_params(loaded.model), count_bytes(loaded.model)
    start = time.perf_counter()
    stats, needs = {}, method.needs_for(options)
    if needs:
        corpus = with_self_share(data, plan.self_share)
        on_stage(f"calibrating ({', '.join(sorted(needs))} over {plan.calibration_windows} windows of {plan.window} tokens"
                 f"{f', {corpus.sampled:g} of them sampled from the model' if corpus.sampled else ''})")
        stats = collect_stats(loaded, targets, corpus, needs, windows=plan.calibration_windows,
                              window_len=plan.window, progress=progress, world=world)
    stats_seconds = time.perf_counter() - start
    rows = []
    on_stage(f"factorizing {len(targets)} matrices ({method.name})")
    if method.kind == "lowrank":
        if plan.joint:  # linears that read one input become one stacked target with merged statistics
            targets = joint_targets(targets, model_groups(loaded, targets))
            stats = {target.name: merged_stats(target, stats) for target in targets}
        ranks = allocate(targets, plan, stats, world)
        rows = factorize_targets(loaded, targets, ranks, method, stats, options, plan.untie_head, world, progress)
    else:
        rows = replace_modules(loaded, targets, method, plan, stats, options, progress)
    if plan.bits is not None:
        on_stage(f"quantizing the factors ({plan.bits} bits, {'one scale per row' if plan.group_size is None else f'groups of {plan.group_size}'})")
        quantize_factors(loaded.model, rows, plan.bits, plan.group_size, stats)
    report = CompressionReport({**plan.to_dict(), "params": asked.params}, rows, params_before, count_params(loaded.model), bytes_before,
                               count_bytes(loaded.model), time.perf_counter() - start, stats_seconds)
    if not report.compressed and not any(row["status"] == "dense, quantized" for row in rows):
        report.notes.append("no target became smaller: every matrix stays dense at this amount")
    untied = [row["tied_head"] for row in report.compressed if plan.untie_head and row["tied_head"]]
    if untied:
        report.notes.append(f"--untie-head: {', '.join(untied)} keeps its own dense copy of the original table, "
                            "so the model holds more parameters than the tied original")
    loaded.compression = rows
    loaded.model.eval()
    return report


def replace_modules(loaded: LoadedModel, targets: list[Target], method, plan: Plan, stats: dict, options,
                    progress: bool = False) -> list[dict]:
    """A module method's new modules swapped in for ``targets``; their report rows. Every process builds the same
    modules (they are cheap next to calibration). A grouping method (nystrom: an MLP's linears lose channels
    together) gets all its groups at once, so it can spend one budget across them."""
    rows = []
    if method.group_targets is not None:
        grouped = method.group_targets(targets)
        new = method.function(grouped, plan, stats, options)
        for target in grouped:
            members = getattr(target, "members", None)
            rows += ([_module_row(loaded, target, new.get(target.name))] if members is None else
                     [{**_module_row(loaded, m, new.get(m.name)), "group": target.name} for m in members])
        return rows
    for target in tqdm(targets, desc=f"{method.name}", unit="module", disable=not progress):
        new = method.function(target, plan, stats.get(target.name, {}), options)
        rows.append(_module_row(loaded, target, new, plan.untie_head))
    return rows


def _module_row(loaded: LoadedModel, target: Target, new: nn.Module | None, untie_head: bool = False) -> dict:
    """Swap a module method's replacement in (None: the target stays dense); its report row."""
    row = _row(target, module_params(target.module))
    if new is None:
        row.update(status="dense (not smaller)")
        return row
    weight = target.weight().detach()
    _swap(loaded, target, new, untie_head)
    row.update(status="factorized", params_after=module_params(new), layer=type(new).__name__)
    if hasattr(new, "dense_weight"):
        with torch.no_grad():
            row["relative_error"] = relative_error(weight, new.dense_weight())
    return row


def _row(target: Target, params_before: int) -> dict:
    m, n = target.shape
    return {"name": target.name, "kind": target.kind, "shape": [m, n], "rank": None, "params_before": params_before,
            "params_after": params_before, "relative_error": 0.0, "tied_head": target.tied_head}


def factorize_targets(loaded: LoadedModel, targets: list[Target], ranks: dict, method, stats: dict, options, untie_head: bool,
                      world: World = SINGLE, progress: bool = False) -> list[dict]:
    """Factorize ``targets`` at ``ranks`` (``factorize_target`` each) and swap them in; their report rows. Several
    processes: each factorizes the targets packed to it by cost and receives the others' factors from their owners,
    so every process ends with the same layers."""
    if not world.distributed:
        return [row for target in tqdm(targets, desc=method.name, unit="matrix", disable=not progress)
                for row in factorize_target(loaded, target, ranks[target.name], method, stats.get(target.name, {}), options, untie_head)]
    factorized = [t for t in targets if ranks[t.name] is not None]
    factors = spread(world, [matrix_cost(t.shape) for t in factorized],
                     lambda i: method.function(factorized[i].weight().detach().float(), ranks[factorized[i].name],
                                               stats.get(factorized[i].name, {}), options), 2,
                     lambda i: factorized[i].module.weight.device)  # where the layer it replaces lives
    by_name = {t.name: pair for t, pair in zip(factorized, factors)}
    return [row for t in targets for row in factorize_target(loaded, t, ranks[t.name], _Replay(method, by_name.get(t.name)), {},
                                                               options, untie_head)]


class _Replay:
    """A method that hands back factors computed elsewhere (by the process owning the matrix), so that the surgery
    builds, swaps and reports the layer exactly as if it had factorized it here."""

    def __init__(self, method, factors):
        self.name, self.needs, self.kind, self.factors = method.name, method.needs, method.kind, factors

    def function(self, weight, rank, stats, options):
        return self.factors


def factorize_target(loaded: LoadedModel, target: Target, rank, method, stats, options, untie_head: bool) -> list[dict]:
    """Factorize one target at ``rank`` (None: it stays dense) with a low-rank method and swap it in; its report rows
    (one; a JointTarget: one per member)."""
    if isinstance(target, JointTarget):
        return _factorize_joint(loaded, target, rank, method, stats, options)
    row = _row(target, module_params(target.module))
    if rank is None:
        row["status"] = "dense (not smaller)"
        return [row]
    weight = target.weight().detach()
    left, right = method.function(weight.float(), rank, stats, options)
    layer = lowrank_layer(target, left, right)
    _swap(loaded, target, layer, untie_head)
    with torch.no_grad():
        row.update(status="factorized", rank=rank, params_after=module_params(layer), layer=type(layer).__name__,
                   relative_error=relative_error(weight, left @ right))
    return [row]


def _factorize_joint(loaded: LoadedModel, target: JointTarget, rank, method, stats, options) -> list[dict]:
    """The stacked members factorized once; each member a LowRankLinear with its rows of the left factor and the one
    right factor, shared (the first member's row counts it; the others' count their left factor only)."""
    rows = [_row(member, module_params(member.module)) for member in target.members]
    if rank is None:
        return [{**row, "status": "dense (not smaller)", "joint": target.name} for row in rows]
    weights = [member.weight().detach() for member in target.members]
    left, right = method.function(torch.cat(weights).float(), rank, stats, options)
    shared = None
    for member, row, piece, weight in zip(target.members, rows, split_rows(target, left), weights):
        layer = lowrank_layer(member, piece, right)
        if shared is None:
            shared = layer.right
        else:
            layer.right = shared
        _swap(loaded, member, layer)
        with torch.no_grad():
            row.update(status="factorized", rank=rank, params_after=module_params(layer) - (0 if member is target.members[0] else shared.numel()),
                       layer=type(layer).__name__, relative_error=relative_error(weight, piece @ right), joint=target.name)
    return rows


def _swap(loaded: LoadedModel, target: Target, new: nn.Module, untie_head: bool = False) -> None:
    model = loaded.model
    carry_output_scale(target.module, new)
    replace_module(model, target.name, new)
    if target.tied_head is not None and untie_head:
        # The head already holds the original table (the tied Parameter); with the embedding module gone it is
        # the head's alone. The family records that the model is no longer tied, so a saved copy loads untied.
        loaded.family.untie_head(loaded)
    elif target.tied_head is not None:
        head = model.get_submodule(target.tied_head)
        bias = getattr(head, "bias", None)
        replace_module(model, target.tied_head, TiedHead(new, target.name, bias))
