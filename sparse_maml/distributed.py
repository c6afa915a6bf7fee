"""Several processes on one run (torchrun): the process group, task shards and the collectives.

    torchrun --nproc_per_node=4 train.py -c configs/x.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1, `setup` joins the process group
(nccl on CUDA, gloo on CPU) and gives process r the device cuda:LOCAL_RANK. Every process seeds the
same way and holds the same theta, phi and optimizers. A meta-batch of T tasks is split into
contiguous shares of T / world_size tasks; the outer gradients are summed across processes, so
each process steps its optimizers on the same gradient a single process would have computed (up to
the order of float additions). Without WORLD_SIZE > 1 nothing here starts a process group, and every
helper is the identity for a world of one.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError
from .runtime import resolve_device

T = TypeVar("T")


# What torchrun sets for every process; a run needs all of them or none.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_environment() -> None:
    """Refuse (ConfigError) a half-set torchrun environment: with RANK alone every error would be
    hidden (only rank 0 reports), with WORLD_SIZE alone the process group would wait for peers
    that never come."""
    found = {v: os.environ[v] for v in TORCHRUN_VARIABLES if v in os.environ}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if not found.get(name, "0").isdigit():
            raise ConfigError(f"environment variable {name}={found[name][:40]!r} is not a number "
                              "(torchrun sets it; unset it to run one process)")
    world = int(found.get("WORLD_SIZE", "1"))
    missing = [v for v in TORCHRUN_VARIABLES if v not in found]
    if world > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} not: start several "
                          "processes with torchrun, or unset WORLD_SIZE to run one")
    if world == 0 or int(found.get("RANK", "0")) >= world:
        raise ConfigError(f"RANK={found.get('RANK', '0')} does not fit WORLD_SIZE="
                          f"{found.get('WORLD_SIZE', '(unset)')}: start several processes with "
                          "torchrun, or unset RANK to run one")


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def env_rank() -> int:
    """RANK as set by torchrun (0 when not launched by it)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def is_distributed() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes sharing the run (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0: the one process that prints and writes the run folder."""
    return rank() == 0


def setup(device_name: str) -> torch.device:
    """Resolve run.device; under torchrun (WORLD_SIZE > 1) also join the process group, where
    `auto` and `cuda` mean cuda:LOCAL_RANK (one GPU per process, backend nccl) when CUDA exists;
    `cpu`, or `auto` without CUDA, uses gloo."""
    world = env_world_size()
    if world <= 1:
        return resolve_device(device_name)
    if device_name.startswith("cuda:"):
        raise ConfigError(f"run.device={device_name} names one GPU, but torchrun started {world} "
                          "processes: use run.device=auto or cuda (each process takes "
                          "cuda:LOCAL_RANK)")
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = resolve_device(device_name)  # cpu, or cuda without CUDA: the usual error
    if not dist.is_initialized():
        nccl = device.type == "cuda"
        dist.init_process_group("nccl" if nccl else "gloo", device_id=device if nccl else None)
    return device


def cleanup() -> None:
    """Leave the process group, if one was joined, once every process has come this far."""
    if dist.is_available() and dist.is_initialized():
        try:  # closing the connections while a peer still uses them can abort it
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors must be for the backend's collectives (nccl: this process's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_meta_batch(meta_batch_size: int, world: Optional[int] = None) -> None:
    """Refuse a meta-batch that cannot be split evenly across the processes."""
    world = world or world_size()
    if meta_batch_size % world:
        raise ConfigError(f"outer.meta_batch_size={meta_batch_size} is not divisible by the "
                          f"world size {world} (torchrun processes): each process must adapt the "
                          "same number of tasks; choose a multiple of the world size")


def train_share(meta_batch_size: int) -> tuple[int, int]:
    """(first task within the meta-batch, number of tasks) that this process adapts."""
    share = meta_batch_size // world_size()
    return rank() * share, share


def block(num_items: int, of_rank: Optional[int] = None, world: Optional[int] = None) -> range:
    """The contiguous block of range(num_items) given to a rank; blocks differ by at most one."""
    world = world or world_size()
    r = rank() if of_rank is None else of_rank
    return range(r * num_items // world, (r + 1) * num_items // world)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over the processes, returned on every process (the identity alone)."""
    if not is_distributed():
        return values
    reduced = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (stop signals, non-finite values)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over the processes (one flat buffer, one collective)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def gather_blocks(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate, in rank order, the 1-D `values` of every process (sizes[r] from rank r)."""
    if not is_distributed():
        return values
    if len(values) != sizes[rank()]:
        raise ValueError(f"rank {rank()} has {len(values)} values, expected {sizes[rank()]}")
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=_collective_device())
    padded[:len(values)] = values.to(padded.device)  # all_gather needs equal sizes
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(values.device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on rank 0 only and return its result on every process. An exception it raises there
    is raised on every process (as the same type, where it can be rebuilt from its message), so no
    process is left waiting in a collective."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # re-raised below, on every process
            error = err
    if is_distributed():
        result, shared = broadcast_object((result, _portable(error)))
        error = shared if error is None else error
    if error is not None:
        raise error
    return result


def _portable(error: Optional[Exception]) -> Optional[Exception]:
    """An exception that survives pickling (the original, or None, if it does)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")


def barrier() -> None:
    """Wait for every process (nothing alone)."""
    if is_distributed():
        dist.barrier()
