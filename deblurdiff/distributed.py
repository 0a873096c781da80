"""Several processes, one device each, started by ``torchrun`` or ``accelerate launch``.

:func:`start` joins the group through accelerate's ``PartialState`` (gloo on CPUs, NCCL on
GPUs); a plain ``python -m`` run is a group of one and touches no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

#: Ranks that finish early wait for the others in a collective; images can take minutes
#: each, so the group's timeout is long (a crashed rank ends the whole job anyway: torchrun
#: stops the other workers).
GROUP_TIMEOUT = timedelta(hours=24)
_COUNTER_KEY = "deblurdiff/images-finished"


def launched_world_size(environ=os.environ) -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return max(1, int(environ.get("WORLD_SIZE", "1")))


@dataclass
class Processes:
    """This process's place in the group (a group of one by default), with the few collective
    steps the command line needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _store: Any = field(default=None, repr=False)  # a shared counter that needs no collective call
    _local_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (``obj`` of the other ranks is ignored)."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def finished(self, n: int = 1) -> None:
        """Count ``n`` images finished by this rank (written or failed)."""
        self._local_count += n
        if self._store is not None:
            self._store.add(_COUNTER_KEY, n)

    def finished_overall(self) -> int:
        """Images finished by all ranks so far (without a shared store: this rank's)."""
        if self._store is None:
            return self._local_count
        return int(self._store.add(_COUNTER_KEY, 0))

    def close(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().destroy_process_group()


def uses_cuda(device: str) -> bool:
    """Whether ``--device`` (auto, cuda, cuda:N, mps, cpu) puts the model on a CUDA GPU."""
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    return device.split(":")[0] == "cuda"


def start(device: str = "auto") -> Processes:
    """Join the launcher's process group (a group of one without a launcher)."""
    if launched_world_size() == 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=not uses_cuda(device), timeout=GROUP_TIMEOUT)
    try:  # the rendezvous store
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # an older or other backend: rank 0 then counts its own images only
        store = None
    return Processes(state.process_index, state.num_processes, state.local_process_index, store)


def process_device(device: str, processes: Processes) -> str:
    """``--device`` for this process: with several processes, "auto" and "cuda" mean the
    GPU of the local rank (``cuda:LOCAL_RANK``); anything else is used as given."""
    if processes.distributed and device in ("auto", "cuda") and uses_cuda(device):
        return f"cuda:{processes.local_rank}"
    return device


def shard(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Split items ``0 .. len(costs) - 1`` over ``world_size`` ranks, balancing the total
    cost: the most costly item first, each to the rank with the least cost so far (the
    lowest rank on ties). Deterministic; every item is in exactly one shard, each shard
    in increasing index order."""
    loads = [0.0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[index]
        shards[rank].append(index)
    return [sorted(s) for s in shards]
