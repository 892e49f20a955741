"""Several processes, one program: torch.distributed set up from torchrun's environment, and the few collectives
the pipeline needs (the global batch for cross-rank mining, a stop flag, evaluation shards).

Launched plainly, nothing here starts anything: the world is one process, every helper is the identity, and the
program is the single-process one. Launched by torchrun (or srun starting one torchrun per node), RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set: the process group uses NCCL on GPUs, gloo on the
CPU, each process drives the GPU of its LOCAL_RANK, and only rank 0 prints on stdout, logs and writes files.
"""

from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from errors import UsageError


@dataclass(frozen=True)
class Processes:
    """This process's place among the ones training or evaluating together."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The process's own GPU (cuda:LOCAL_RANK) when several processes share a node's GPUs."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


SINGLE_PROCESS = Processes()


def processes_from_environment() -> Processes:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process when WORLD_SIZE is unset."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {error}") from None
    if not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world_size}: start the program with torchrun")
    return Processes(rank, world_size, local_rank)


@contextmanager
def launched_processes(device_name: str):
    """Join the process group torchrun started (none when launched plainly), for the block's duration.

    device_name: the config's device; `cpu` (or no GPU) means gloo, a GPU means NCCL with this process pinned
    to cuda:LOCAL_RANK. On ranks other than 0, stdout is silenced (errors still reach stderr).
    Yields a Processes.
    """
    processes = processes_from_environment()
    if not processes.distributed or dist.is_initialized():
        yield processes
        return
    on_gpu = device_name != "cpu" and torch.cuda.is_available()
    if on_gpu:
        if processes.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={processes.local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                             f"start at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(processes.local_rank)
    # The others wait while rank 0 alone checks every image before training (minutes for SOP): more than NCCL's
    # default 10 minutes is allowed. A process that fails makes torchrun stop the rest at once anyway.
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=60),
                            device_id=torch.device("cuda", processes.local_rank) if on_gpu else None)
    stdout = sys.stdout
    if not processes.is_main:
        sys.stdout = open(os.devnull, "w")
    try:
        yield processes
    finally:
        if not processes.is_main:
            sys.stdout.close()
            sys.stdout = stdout
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (say, generating the demo data or checking images), the others after it."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on some rank (one all-reduce of one number)."""
    if not _active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_rows(*local: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors of (n_r, ...) rows on each rank -> (sum n_r, ...) on every rank, rank 0's rows first, then rank 1's...

    All tensors have this rank's n_r rows. Gradients flow back through this rank's own rows only (the others'
    arrive as constants): each rank's backward of a loss over the gathered rows yields its share of the global
    batch's gradient, and the ranks' shares add up to the single-process gradient (see `sum_gradients_hook`).
    Ranks may hold different numbers of rows (an unreadable image skipped): rows are padded for the collective
    and cut back. Costs one all-reduce of the row counts and one all-gather per tensor.
    """
    if not _active():
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.zeros(world, dtype=torch.int64, device=local[0].device)
    sizes[rank] = len(local[0])
    dist.all_reduce(sizes)
    sizes = sizes.tolist()  # note: a CPU-GPU sync point
    gathered = []
    for tensor in local:
        padded = tensor.detach()
        if len(tensor) < max(sizes):
            padded = torch.cat([padded, padded.new_zeros((max(sizes) - len(tensor), *tensor.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        parts = [part[:size] for part, size in zip(parts, sizes)]
        parts[rank] = tensor
        gathered.append(torch.cat(parts))
    return tuple(gathered)


def sum_gradients_hook(process_group, bucket):
    """DDP communication hook: sum the ranks' gradients instead of averaging them.

    With cross-rank mining every rank's loss is the whole global batch's loss, and its backward reaches the
    weights through its own rows only, so the global gradient is the sum of the ranks' gradients; DDP's
    default mean would divide it by the world size.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def wrap_for_training(model: torch.nn.Module, processes: Processes, device: torch.device,
                      cross_rank_mining: bool) -> torch.nn.Module:
    """The model that training calls: the model itself in one process, DistributedDataParallel otherwise
    (gradients summed with cross-rank mining, averaged without)."""
    if not processes.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast before every forward: Swinv2's buffers (position tables, window masks; 6 MB at 256 px)
    # are constants, and the model has no running statistics. (torch 2.14 renamed the switch.)
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    if cross_rank_mining:
        wrapped.register_comm_hook(None, sum_gradients_hook)
    return wrapped


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce the mean of gradients DDP does not see (a loss's own proxies) when each rank has its own loss."""
    if not _active():
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor averaged over the ranks (a NaN on one rank makes it NaN on all)."""
    if not _active():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def gather_objects(value) -> list:
    """[rank 0's value, rank 1's, ...] on every rank (pickled; for evaluation's once-per-pass results)."""
    if not _active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (say, validation metrics computed on rank 0 only)."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_of_batches(num_items: int, batch_size: int, processes: Processes) -> range | None:
    """The items this rank embeds: a contiguous run of whole batches of `batch_size`, so that every image is
    embedded in the same batch as in one process (same result, bit for bit), and ranks in order give back
    the list's order. Uneven: the first num_batches % world ranks take one batch more; a rank may get none.
    None in one process: it embeds every item (`evaluation_loader`'s default)."""
    if not processes.distributed:
        return None
    num_batches = -(-num_items // batch_size)
    per_rank, extra = divmod(num_batches, processes.world_size)
    first = processes.rank * per_rank + min(processes.rank, extra)
    last = first + per_rank + (processes.rank < extra)
    return range(min(first * batch_size, num_items), min(last * batch_size, num_items))
