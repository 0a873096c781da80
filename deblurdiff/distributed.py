"""Several processes, one device each, started by ``torchrun`` or ``accelerate launch``: accelerate's
``PartialState`` (gloo on CPUs, NCCL on GPUs); a plain ``python -m`` run touches no process group."""

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


@dataclass
class Processes:
    """This process's place in the group (a group of one by default) and the steps the CLI shares."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _store: Any = field(default=None, repr=False)
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

    def finished(self) -> None:
        """Count one image finished by this rank (written or failed)."""
        self._local_count += 1
        if self._store is not None:
            self._store.add(_COUNTER_KEY, 1)

    def finished_overall(self) -> int:
        """Images finished by all ranks so far."""
        return self._local_count if self._store is None else int(self._store.add(_COUNTER_KEY, 0))

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
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState
    from torch.distributed.distributed_c10d import _get_default_store

    state = PartialState(cpu=not uses_cuda(device), timeout=GROUP_TIMEOUT)
    store = _get_default_store()  # the rendezvous store: a shared counter that needs no collective call
    return Processes(state.process_index, state.num_processes, state.local_process_index, store)


def process_device(device: str, processes: Processes) -> str:
    """``--device`` for this process: with several, "auto" and "cuda" mean ``cuda:LOCAL_RANK``."""
    if processes.distributed and device in ("auto", "cuda") and uses_cuda(device):
        return f"cuda:{processes.local_rank}"
    return device


def shard(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of ``costs`` split over ``world_size`` ranks (each in increasing order), balancing
    the total cost: the costliest item first, to the rank with the least so far (lowest on ties)."""
    loads = [0.0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[index]
        shards[rank].append(index)
    return [sorted(s) for s in shards]
