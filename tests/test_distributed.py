"""DistributedDataParallel on the CPU (gloo, 2 processes): each rank evaluates its half of a batch with the
drop-in's fused path; the gathered outputs equal one process's outputs on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_utils import MINI, images, make_model

WORLD = 2
BATCH = 4


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_file):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make_model(MINI, seed=rank)  # different weights: DDP broadcasts rank 0's
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.eval()
        x = images(BATCH, 32).chunk(WORLD)[rank]
        with torch.no_grad():
            out = ddp(x)
            parts = [torch.empty_like(out) for _ in range(WORLD)]
            dist.all_gather(parts, out)
        assert model.flash_bias_settings.resolved  # the fused path ran
        if rank == 0:
            torch.save(torch.cat(parts), out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_eval_matches_single_process(tmp_path):
    out_file = str(tmp_path / "ddp_out.pt")
    mp.spawn(_worker, args=(_free_port(), out_file), nprocs=WORLD, join=True)
    gathered = torch.load(out_file)
    model = make_model(MINI, seed=0)
    x = images(BATCH, 32)
    with torch.no_grad():
        expected = model(x)
        model.set_flash_bias(fused=False)
        official = model(x)
    assert gathered.shape == expected.shape
    assert torch.allclose(gathered, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gathered, official, rtol=1e-4, atol=1e-5)
