"""FSDP's point-to-point all-gather / reduce-scatter for gloo against gloo's own collectives, on real processes."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmbert.distributed.p2p_comm import P2PAllGather, P2PReduceScatter


def _check(rank: int, world: int, init_file: str, failures):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ag, rs = P2PAllGather(), P2PReduceScatter()
        groups = [dist.group.WORLD, dist.new_group([1, 2])]  # the whole world, and a subgroup (HSDP's shard dim)
        for group in groups:
            if rank not in dist.get_process_group_ranks(group):
                continue
            w, r = group.size(), group.rank()
            shard = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
            want = torch.empty(1000 * w)
            dist.all_gather_into_tensor(want, shard, group=group)
            for async_op in (False, True):
                got = torch.full((1000 * w,), float("nan"))
                got[1000 * r:1000 * (r + 1)] = shard
                work = ag(got, got[1000 * r:1000 * (r + 1)], group, async_op=async_op)
                assert (work is not None) == async_op
                if work is not None:
                    work.wait()
                assert torch.equal(got, want), ("all-gather", w, async_op)
            grad = torch.randn(1000 * w, generator=torch.Generator().manual_seed(100 + rank))
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
                want = torch.empty(1000)
                dist.reduce_scatter_tensor(want, grad.clone(), op=op, group=group)
                for async_op in (False, True):
                    got = torch.empty(1000)
                    work = rs(got, grad.clone(), group, op, async_op=async_op)
                    if work is not None:
                        work.wait()
                    # gloo sums in its own order: equal to rounding for 3 ranks, bit for bit for 2
                    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), ("reduce-scatter", w, op, async_op)
                    if w == 2:
                        assert torch.equal(got, want)
            # MAX is not a sum: handed to gloo's own reduce-scatter
            got, want = torch.empty(1000), torch.empty(1000)
            rs(got, grad.clone(), group, dist.ReduceOp.MAX)
            dist.reduce_scatter_tensor(want, grad.clone(), op=dist.ReduceOp.MAX, group=group)
            assert torch.equal(got, want)
    except Exception as e:  # reported by the parent: a child's assert is otherwise only an exit code
        failures.put(f"rank {rank}: {e!r}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_p2p_collectives_match_gloo_on_three_ranks_and_a_subgroup(tmp_path):
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    init = os.path.join(tmp_path, "init")
    procs = [ctx.Process(target=_check, args=(r, 3, init, failures)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors and all(p.exitcode == 0 for p in procs), (errors, [p.exitcode for p in procs])
