"""FSDP2's all-gather and reduce-scatter as direct point-to-point exchanges, for gloo (CPU) process groups.

Why: gloo's own `all_gather_into_tensor` and `reduce_scatter_tensor` are much slower than its all-reduce
for the same bytes (benchmarks/profile_dist.py --collectives measures all of them on the machine at hand;
docs/PERFORMANCE.md has the figures), and FSDP pays one all-gather per unit in forward (and again in backward when it
reshards) plus one reduce-scatter per unit in backward, on the training thread, because a CPU has no
streams for them to overlap on. Here every rank sends each peer exactly the bytes that peer needs
(its own shard for an all-gather, the peer's chunk of the gradient for a reduce-scatter) in one batch of
isend/irecv, which moves the minimum (W-1)/W of the buffer per rank, as a ring does, with no dependent
rounds.

Results are exact: an all-gather only moves bytes; a reduce-scatter sums the W chunks of a shard in rank
order (0, 1, ..., W-1) on the rank that owns the shard, then divides by W for an average, as gloo does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.distributed as dist
try:  # FSDP2's custom-collective interface (recent torch); an older torch keeps gloo's own collectives
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError:  # pragma: no cover - depends on the installed torch
    AllGather = ReduceScatter = object  # type: ignore[misc,assignment]

# Each kind of exchange has its own tag: if ranks ever issued different collectives (a bug), gloo would
# fail on a timeout instead of pairing one rank's parameters with another's gradient chunk of equal size.
ALL_GATHER_TAG, REDUCE_SCATTER_TAG = 0x6D6D01, 0x6D6D02


class _BatchWork(dist.Work):
    """The works of one batch of isend/irecv as one Work (FSDP waits on a single handle), then `finish`."""

    def __init__(self, works: list, finish: Optional[Callable[[], None]] = None):
        super().__init__()
        self._works, self._finish = works, finish

    def wait(self, timeout=None) -> bool:
        for w in self._works:
            w.wait()
        self._works = []
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        return not self._works and self._finish is None


def _exchange(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group, tag: int) -> list:
    """isend sends[p] to / irecv recvs[p] from every group rank p, as one batch. Ops are listed in the same
    global order on every rank (by peer), so each pair's messages match whatever the interleaving."""
    ops = []
    for p in sorted(set(sends) | set(recvs)):
        peer = dist.get_global_rank(group, p)
        if p in sends:
            ops.append(dist.P2POp(dist.isend, sends[p], peer, group, tag))
        if p in recvs:
            ops.append(dist.P2POp(dist.irecv, recvs[p], peer, group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _done(work: _BatchWork, async_op: bool) -> Optional[dist.Work]:
    if async_op:
        return work
    work.wait()
    return None


class _Alloc:
    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class P2PAllGather(_Alloc, AllGather):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> Optional[dist.Work]:
        world, rank = group.size(), group.rank()
        chunks = output_tensor.view(world, -1)
        if input_tensor.data_ptr() != chunks[rank].data_ptr():  # FSDP copies its shard in place already
            chunks[rank].copy_(input_tensor)
        peers = [p for p in range(world) if p != rank]
        works = _exchange({p: chunks[rank] for p in peers}, {p: chunks[p] for p in peers}, group, ALL_GATHER_TAG)
        return _done(_BatchWork(works), async_op)


class P2PReduceScatter(_Alloc, ReduceScatter):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False) -> Optional[dist.Work]:
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):  # PREMUL_SUM etc.: gloo's own
            return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        world, rank = group.size(), group.rank()
        chunks = input_tensor.view(world, -1)
        peers = [p for p in range(world) if p != rank]
        received = {p: torch.empty_like(output_tensor) for p in peers}

        def finish():
            parts = [chunks[rank] if p == rank else received[p] for p in range(world)]
            torch.add(parts[0], parts[1], out=output_tensor)
            for part in parts[2:]:
                output_tensor.add_(part)
            if op == dist.ReduceOp.AVG:
                output_tensor.div_(world)

        works = _exchange({p: chunks[p] for p in peers}, received, group, REDUCE_SCATTER_TAG)
        return _done(_BatchWork(works, finish), async_op)


def use_p2p_collectives(modules: list, group: dist.ProcessGroup) -> bool:
    """Give every FSDP module these collectives when its group is gloo with more than one rank."""
    if group.size() < 2 or dist.get_backend(group) != "gloo" or AllGather is object:
        return False
    for m in modules:
        m.set_custom_all_gather(P2PAllGather())
        m.set_custom_reduce_scatter(P2PReduceScatter())
    return True
