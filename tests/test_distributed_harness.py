"""The multi-rank harness itself: results come back in rank order, collectives work,
and a raising, hanging or dying rank fails the call fast with the rank named."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from distributed import RankError, run_on_ranks


# Rank functions live at module level so the spawned children can unpickle them.
def _rank_times_ten(rank: int, world_size: int) -> tuple[int, int]:
    return rank * 10, world_size


def _all_reduce_rank_plus_one(rank: int, world_size: int, scale: float = 1.0) -> torch.Tensor:
    t = torch.full((3,), float(rank + 1), dtype=torch.float64) * scale
    dist.all_reduce(t)  # comm: world, 3 float64
    return t  # a tensor comes back by value, after this process has exited


def _rank1_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom")
    dist.all_reduce(torch.ones(1))  # comm: world; rank 1 never joins, so the others hang here


def _rank1_hangs(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(3600)
    return rank


def _rank1_exits(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def _size_one(rank: int, world_size: int) -> tuple:
    t = torch.tensor([7.0])
    dist.all_reduce(t)  # comm: world of 1
    return dist.get_rank(), dist.get_world_size(), t.item(), torch.get_num_threads()


def test_results_in_rank_order():
    assert run_on_ranks(_rank_times_ten, 2) == [(0, 2), (10, 2)]


def test_all_reduce_four_ranks():
    out = run_on_ranks(_all_reduce_rank_plus_one, 4, scale=2.0)
    assert len(out) == 4
    for t in out:
        torch.testing.assert_close(t, torch.full((3,), 20.0, dtype=torch.float64))  # 2 * (1+2+3+4)


def test_raising_rank_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(RankError) as e:
        run_on_ranks(_rank1_raises, 2, timeout=120)
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "rank 1" in msg and "ValueError: boom" in msg and "_rank1_raises" in msg, msg
    assert elapsed < 30, elapsed


def test_hang_times_out_naming_the_rank():
    t0 = time.monotonic()
    # Rank 0 normally finishes; on a loaded machine its spawn alone may outlast 10 s.
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] of 2 did not finish within 10"):
        run_on_ranks(_rank1_hangs, 2, timeout=10)
    assert time.monotonic() - t0 < 20


def test_silent_death_reports_exit_code():
    with pytest.raises(RankError, match="--- rank 1 died:\nexited with code 3 "):
        run_on_ranks(_rank1_exits, 2, timeout=60)


def test_world_size_one():
    assert run_on_ranks(_size_one, 1, threads_per_rank=2) == [(0, 1, 7.0, 2)]


def test_lambda_rejected_in_parent():
    with pytest.raises(TypeError, match="module-level"):
        run_on_ranks(lambda rank, world_size: rank, 1)
