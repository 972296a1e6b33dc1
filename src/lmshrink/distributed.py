"""Distributed compression on torch.distributed: several processes (torchrun) share one run.

What is split, and how it is put back together:

- calibration (and evaluation) windows: each process takes a contiguous share (``World.shard``); the statistics are
  sums over windows, added across processes with one all-reduce per tensor (``all_reduce_sum``), so the result
  differs from a single process's only by floating-point summation order;
- the matrices of a block: each goes to one process by its cost, about m·n·min(m, n) + n³/8
  (``matrix_cost``), greedy longest-processing-time bin packing (``pack_by_cost``); the owner broadcasts its
  factors (``share_tensor``) so every process can run the compressed block and rank 0 can write it.

Nothing crosses process boundaries as a pickle: small structured messages (the fingerprint that every process
must agree on, errors) travel as UTF-8 JSON inside uint8 tensors (``all_gather_json``), tensors as tensors. A
failed collective (a dead peer, a timeout) becomes ``lmshrink.errors.DistributedError`` (``collective``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass

import torch

from lmshrink.errors import DistributedError, InvalidArgument, LmshrinkError

TIMEOUT_ENV = "LMSHRINK_DIST_TIMEOUT"  # seconds a collective (or the rendezvous) may wait for the slowest process
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default: one process may factorize a large block while the others wait
MAX_DIMS = 8
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size``, ``local_rank`` of ``local_size`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    comm_device: str = "cpu"  # where tensors must be for a collective (cuda with an nccl-only group)
    owns_group: bool = False  # whether lmshrink started the process group (and so ends it)

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes the output."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (windows); the first ``count % size`` ranks get one more.
        A rank may get none (more processes than windows): it still takes part in every collective."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def place(self, device: torch.device) -> torch.device:
        """``device`` for this process: a bare "cuda" becomes this process's own GPU, cuda:LOCAL_RANK."""
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables) with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def launched_rank() -> int | None:
    """RANK as torchrun set it (before the process group exists), or None outside a launcher."""
    return int(os.environ["RANK"]) if launched() else None


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (1 <= value <= 7 * 86400):
        raise InvalidArgument(TIMEOUT_ENV, f"{text!r} is not a number of seconds in range", "1 to 604800 (seconds)")
    return value


def current_world() -> World:
    """The World of an already initialized default process group (the Python API inside torchrun), else SINGLE."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    size = dist.get_world_size()
    if size == 1:
        return SINGLE
    backend = str(dist.get_backend()).lower()
    comm = "cuda" if backend == "nccl" else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if comm == "cuda":
        comm = f"cuda:{torch.cuda.current_device()}"
    return World(dist.get_rank(), size, local_rank, local_size, timeout_seconds(), comm)


def init_world(device_type: str = "cpu") -> World:
    """Join the run torchrun started (its RANK, WORLD_SIZE, MASTER_ADDR/PORT), or use the process group already
    there; outside a launcher, SINGLE. ``device_type`` "cuda": one GPU per process (checked), nccl for CUDA
    tensors and gloo for CPU ones; "cpu": gloo. The rendezvous and every collective wait at most
    LMSHRINK_DIST_TIMEOUT seconds (default 1800)."""
    import torch.distributed as dist

    existing = current_world()
    if existing.distributed or not launched():
        _check_gpus(existing, device_type)
        return existing
    timeout = timeout_seconds()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_size = int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", size))
    world = World(rank, size, local_rank, local_size, timeout)
    _check_gpus(world, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, OSError) as error:  # DistStoreError (a RuntimeError): the rendezvous timed out
        raise DistributedError(f"rendezvous: the {size} processes of the run did not all join at "
                               f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} within {timeout:g} s "
                               f"(this is rank {rank}) "
                               f"({_first_line(error)}); check that every node started and can reach it, or raise "
                               f"{TIMEOUT_ENV}") from error
    # With GPUs, collectives go through nccl on this process's GPU (the statistics and factors are there already).
    return World(rank, size, local_rank, local_size, timeout, f"cuda:{local_rank}" if device_type == "cuda" else "cpu", owns_group=True)


def _check_gpus(world: World, device_type: str) -> None:
    if device_type != "cuda" or not world.distributed:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < world.local_size:
        raise InvalidArgument("--device", f"cuda with {world.local_size} processes on this node but {count} CUDA device"
                              f"{'s' if count != 1 else ''} (one GPU per process)",
                              f"at most {count} processes per node (--nproc_per_node {count}), or --device cpu" if count else
                              "--device cpu (this node has no CUDA device)")


def finish(world: World) -> None:
    """End the process group lmshrink started (quietly: the run is over either way)."""
    import torch.distributed as dist

    if world.owns_group and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].split('. ')[0][:300]}" if text else type(error).__name__  # gloo adds advice


@contextlib.contextmanager
def collective(world: World, what: str):
    """Run collectives; a dead peer or a timeout becomes one DistributedError naming the step."""
    try:
        yield
    except LmshrinkError:
        raise
    except (RuntimeError, OSError) as error:  # torch.distributed's DistError kinds are RuntimeErrors
        raise DistributedError(f"{what}: the run lost a process or timed out (rank {world.rank} of {world.size}, "
                               f"timeout {world.timeout_s:g} s; {_first_line(error)}); nothing was written, see the "
                               "launcher's report for the process that failed") from error


def barrier(world: World, what: str) -> None:
    if world.distributed:
        import torch.distributed as dist

        with collective(world, what):
            dist.barrier()


def all_reduce_sum(world: World, tensors, what: str = "adding statistics") -> None:
    """Sum each tensor over all processes, in place (one all-reduce per tensor: no copy of the whole set)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    with collective(world, what):
        for tensor in tensors:
            if tensor.device.type == "cpu" and world.comm_device != "cpu":
                moved = tensor.to(world.comm_device)
                dist.all_reduce(moved)
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor)


def all_gather_json(world: World, value) -> list:
    """Every process's JSON-able ``value``, in rank order (UTF-8 bytes in tensors: never a pickle)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    data = torch.tensor(list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8)
    with collective(world, "exchanging settings"):
        lengths = [torch.zeros(1, dtype=torch.int64, device=world.comm_device) for _ in range(world.size)]
        dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64, device=world.comm_device))
        longest = max(int(n) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8, device=world.comm_device)
        padded[: len(data)] = data.to(world.comm_device)
        gathered = [torch.zeros(longest, dtype=torch.uint8, device=world.comm_device) for _ in range(world.size)]
        dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[: int(n)].cpu().tolist()).decode()) for g, n in zip(gathered, lengths)]


def agree(world: World, fingerprint: dict, error: LmshrinkError | None = None) -> None:
    """Every process shows the others its ``fingerprint`` (lmshrink version, plan, options) and whether it failed a
    check so far. Any difference, or any failure, raises the same DistributedError (or the failing rank's own
    error) on every process, marked ``agreed``: rank 0 reports it and nothing is written."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    mine = {"fingerprint": fingerprint, "error": None if error is None else [type(error).__name__, str(error)]}
    everyone = all_gather_json(world, mine)
    failed = [(rank, entry["error"]) for rank, entry in enumerate(everyone) if entry["error"]]
    if failed:
        if error is not None and failed[0][0] == world.rank:
            error.agreed = True
            raise error
        rank, (kind, message) = failed[0]
        raised = DistributedError(f"rank {rank} of {world.size} refused the run: {message}")
        raised.agreed = True
        raise raised
    reference = everyone[0]["fingerprint"]
    for rank, entry in enumerate(everyone[1:], start=1):
        theirs = entry["fingerprint"]
        differ = sorted(k for k in set(reference) | set(theirs) if reference.get(k) != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k}: {reference.get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}" for k in differ[:3])
            raised = DistributedError(f"the processes of this run disagree ({shown}); every process must run the same "
                                      "lmshrink version with the same options")
            raised.agreed = True
            raise raised


def matrix_cost(shape) -> int:
    """The time factorizing an m x n (out x in) matrix takes, up to a constant: m·n·min(m, n) + n³/8.

    The SVD's m·n·min(m, n) alone makes an MLP's down projection (n = ffn) cost what its up projection does; it
    takes about twice as long, for plain SVD and for the whitening methods (the n x n input Gram's eigh) alike.
    The n³/8 term is fitted to svd, svdllm and fwhiten on SmolLM2's and Gemma 3's linears (benchmarks/matrix_cost.py).
    """
    m, n = int(shape[0]), int(shape[1])
    return m * n * min(m, n) + n ** 3 // 8


def pack_by_cost(costs: list[float], size: int) -> list[int]:
    """The rank that owns each item: greedy longest-processing-time first (each item, largest first, to the least
    loaded rank; ties to the lower index, so every process computes the same packing). At most 4/3 of optimal."""
    loads = [0.0] * size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def share_tensor(world: World, tensor: torch.Tensor | None, owner: int, device=None, what: str = "sharing factors") -> torch.Tensor:
    """``owner``'s ``tensor`` on every process (shape and dtype travel first), on ``device`` (default: where it was
    on the owner, or the CPU)."""
    if not world.distributed:
        return tensor
    import torch.distributed as dist

    with collective(world, what):
        header = torch.zeros(2 + MAX_DIMS, dtype=torch.int64)
        if world.rank == owner:
            if tensor.dim() > MAX_DIMS or tensor.dtype not in _DTYPES:
                raise InvalidArgument("tensor", f"{tensor.dim()} dims of {tensor.dtype}", f"at most {MAX_DIMS} dims of {_DTYPES}")
            header[0], header[1] = tensor.dim(), _DTYPES.index(tensor.dtype)
            header[2: 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        header = header.to(world.comm_device)
        dist.broadcast(header, src=owner)
        header = header.cpu()
        shape = tuple(int(v) for v in header[2: 2 + int(header[0])])
        dtype = _DTYPES[int(header[1])]
        if world.rank == owner:
            target_device = device if device is not None else tensor.device
            buffer = tensor.detach().to(world.comm_device).contiguous()
        else:
            target_device = device if device is not None else torch.device("cpu")
            buffer = torch.empty(shape, dtype=dtype, device=world.comm_device)
        dist.broadcast(buffer, src=owner)
    return buffer.to(target_device)


def spread(world: World, costs: list[float], compute, parts: int, device=None, what: str = "sharing factors") -> list[tuple]:
    """``compute(i)`` (a tuple of ``parts`` tensors) for every item ``i``, each run by the process packed to it by cost
    (``pack_by_cost``); every process gets every result, on ``device`` (one for all, or ``device(i)`` per item)
    (lmshrink's matrix-parallel step: SVDs, spectra). A process computes all of its items first, then the results
    travel in item order."""
    if not world.distributed:
        return [compute(index) for index in range(len(costs))]
    place = device if callable(device) else lambda index: device
    owners = pack_by_cost(costs, world.size)
    mine = {index: compute(index) for index, owner in enumerate(owners) if owner == world.rank}
    return [tuple(share_tensor(world, part, owner, place(index), what) for part in mine.get(index, (None,) * parts))
            for index, owner in enumerate(owners)]
