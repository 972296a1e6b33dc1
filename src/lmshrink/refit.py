"""Error compensation for the block-by-block engine (``--refit``): after a block's matrices are factorized, each
one's left factor is refitted (lmshrink.decompose.refit) so that, on the calibration windows, the compressed
block's linears reproduce what the original model's did.

    for each group of factorized linears that read one input (q/k/v; gate/up), in forward order:
        per window: the group's inputs in the original model (x_o: the original block on the original activations)
                    and in the compressed one (x_c: the compressed block, earlier groups already refitted, on the
                    compressed activations), each forward stopped once the group's inputs are seen
        sums Coc = x_o x_c^T, Ccc = x_c x_c^T, Coo = x_o x_o^T (added across processes)
        L = argmin sum ||W x_o - L R x_c||^2   (R, the right factor, kept)

Going group by group in forward order lets a later group compensate what the earlier, refitted ones changed.
"""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.accounting import relative_error
from lmshrink.decompose.refit import output_error, refit_left
from lmshrink.distributed import SINGLE, World, all_reduce_sum, share_tensor
from lmshrink.joint import call_order_groups
from lmshrink.layers.lowrank import linear_weight
from lmshrink.models.blocks import run_block


class _Seen(Exception):
    """Raised by a pre-hook once every input wanted from a forward has been captured: the rest is not needed."""


def _inputs(block: nn.Module, names: list[str], hidden: torch.Tensor, call) -> dict[str, torch.Tensor]:
    """The input of each named submodule of ``block`` (tokens x features, float32) when it runs on ``hidden``."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def capture(module, args):
            seen[name] = args[0].reshape(-1, args[0].shape[-1]).float()
            if len(seen) == len(names):
                raise _Seen

        return capture

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            run_block(block, hidden, call)
    except _Seen:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def input_groups(block: nn.Module, names: list[str], hidden: torch.Tensor | None, call, world: World = SINGLE) -> list[list[str]]:
    """``names`` split into groups that read the same input tensor, in the order the block calls them (one forward
    on ``hidden``). Several processes: rank 0's grouping (it always holds a window) is everyone's."""
    groups = call_order_groups(block, names, lambda: run_block(block, hidden, call)) if hidden is not None else []
    # One group number per name, shared from rank 0.
    numbers = torch.tensor([number for number, group in enumerate(groups) for _ in group], dtype=torch.int64)
    position = torch.tensor([names.index(name) for group in groups for name in group], dtype=torch.int64)
    numbers = share_tensor(world, numbers if world.rank == 0 else None, 0, torch.device("cpu"), "sharing refit groups")
    position = share_tensor(world, position if world.rank == 0 else None, 0, torch.device("cpu"), "sharing refit groups")
    everyones: dict[int, list[str]] = {}
    for number, index in zip(numbers.tolist(), position.tolist()):
        everyones.setdefault(number, []).append(names[index])
    return [everyones[number] for number in sorted(everyones)]


def refit_block(original: nn.Module, block: nn.Module, names: list[str], original_inputs, compressed_inputs, calls, index: int, world: World = SINGLE) -> dict[str, dict]:
    """Refit the left factor of each factorized linear ``names`` (relative to ``block``) in place.

    ``original``: the block before factorization (a copy: its linears hold the original matrices);
    ``original_inputs`` / ``compressed_inputs``: the block's inputs per window in the original and in the compressed
    model (the same list in the open loop); ``calls[w][index]``: the block's call arguments for window ``w``.
    Returns per name its relative output error on the calibration windows before and after the refit, and the
    refitted matrix's relative (Frobenius) distance to the original.
    """
    results: dict[str, dict] = {}
    weights = {name: linear_weight(original.get_submodule(name)).detach() for name in names}
    first = compressed_inputs[0] if len(compressed_inputs) else None
    for group in input_groups(block, names, first, calls[0][index] if len(calls) else None, world):
        layers = {name: block.get_submodule(name) for name in group}
        sums = {name: [torch.zeros(n, n, dtype=torch.float64, device=weights[name].device) for _ in range(3)]
                for name in group for n in [weights[name].shape[1]]}
        for window, (hidden_o, hidden_c) in enumerate(zip(original_inputs, compressed_inputs)):
            call = calls[window][index]
            x_o, x_c = _inputs(original, group, hidden_o, call), _inputs(block, group, hidden_c, call)
            for name in group:
                cross, gram, original_gram = sums[name]
                cross += (x_o[name].T @ x_c[name]).double()
                gram += (x_c[name].T @ x_c[name]).double()
                original_gram += (x_o[name].T @ x_o[name]).double()
        all_reduce_sum(world, [t for name in group for t in sums[name]], "adding refit statistics")
        for name in group:
            layer, weight, (cross, gram, original_gram) = layers[name], weights[name].float(), sums[name]
            right, before = layer.right.detach().float(), layer.left.detach().float()
            after = refit_left(weight, right, cross, gram)
            error_before = output_error(weight, before, right, cross, gram, original_gram)
            error_after = output_error(weight, after, right, cross, gram, original_gram)
            if error_after <= error_before:  # the least-squares optimum cannot be worse; guard against round-off
                with torch.no_grad():
                    layer.left.copy_(after)
            results[name] = {"output_error_before_refit": error_before, "output_error": min(error_after, error_before),
                             "relative_error": relative_error(weight, layer.dense_weight())}
    return results
