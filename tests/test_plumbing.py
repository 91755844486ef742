"""Script plumbing: atomic checkpoints, RNG round trips, the resumable sampler, EMA, precision."""

import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import svg


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_save_roundtrip_and_no_partial_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    svg.atomic_save({"step": 1, "w": torch.arange(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    with pytest.raises(RuntimeError, match="boom"):
        svg.atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temp file left behind


def test_atomic_save_crash_before_rename_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "ckpt.pt"
    svg.atomic_save({"step": 1}, path)

    def crash(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(svg.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        svg.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    svg.set_seed(3)
    svg.atomic_save({"rng": svg.rng_state()}, tmp_path / "r.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    svg.set_seed(99)
    svg.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def global_batches(world_size, global_batch, epoch=0, n=40, seed=7):
    """The set of items in each global batch when W ranks each take global_batch / W."""
    b = global_batch // world_size
    per_rank = []
    for r in range(world_size):
        s = svg.ResumableSampler(n, world_size, r, seed)
        s.set_epoch(epoch)
        idx = list(s)
        per_rank.append([idx[k * b:(k + 1) * b] for k in range(len(idx) // b)])
    return [sorted(sum((p[k] for p in per_rank), [])) for k in range(len(per_rank[0]))]


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = global_batches(1, 8)
    assert len(one) == 5 and sorted(sum(one, [])) == list(range(40))
    assert global_batches(2, 8) == one and global_batches(4, 8) == one
    assert global_batches(2, 8, epoch=1) != one  # a new permutation each epoch


def test_sampler_resume_continues_at_next_batch():
    full = svg.ResumableSampler(30, 2, 1, seed=5)
    full.set_epoch(3)
    expected = list(full)
    s = svg.ResumableSampler(30, 2, 1, seed=5)
    s.set_epoch(3)
    it = iter(s)
    consumed = [next(it) for _ in range(6)]  # two batches of 3
    s.advance(3)
    s.advance(3)
    resumed = svg.ResumableSampler(30, 2, 1, seed=5)
    resumed.load_state_dict(s.state_dict())
    assert consumed + list(resumed) == expected and len(resumed) == 15 - 6


def test_sampler_resume_on_other_world_size_keeps_global_order():
    s = svg.ResumableSampler(40, 4, 0, seed=1)
    s.advance(4)  # 2 global batches of 8 consumed (2 per rank each)
    state = s.state_dict()
    nxt = []
    for r in range(2):
        t = svg.ResumableSampler(40, 2, r, seed=1)
        t.load_state_dict(state)
        nxt += list(t)[:4]
    assert sorted(nxt) == global_batches(1, 8, n=40, seed=1)[2]
    with pytest.raises(ValueError, match="world size that divides"):
        svg.ResumableSampler(40, 3, 0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="same data and seed"):
        svg.ResumableSampler(41, 4, 0, seed=1).load_state_dict(state)


def test_sampler_drop_last_false_pads_and_no_shuffle():
    s = [svg.ResumableSampler(5, 2, r, shuffle=False, drop_last=False) for r in range(2)]
    assert list(s[0]) == [0, 2, 4] and list(s[1]) == [1, 3, 0]
    assert len(svg.ResumableSampler(5, 2, 0)) == 2


def test_update_ema_math_buffers_and_sync():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    svg.update_ema(ema, model, decay=0)  # sync
    for a, b in zip(ema.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    old = ema[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(5)
    svg.update_ema(ema, model, decay=0.9)
    torch.testing.assert_close(ema[0].weight, 0.9 * old + 0.1 * model[0].weight)
    torch.testing.assert_close(ema[1].running_mean, torch.full((2,), 0.2))
    assert ema[1].num_batches_tracked.item() == 5
    with pytest.raises(ValueError, match="differ"):
        svg.update_ema(nn.Linear(3, 2), model, 0.5)


def test_unwrap_ddp_and_compile(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = nn.Linear(2, 2)
        assert svg.unwrap(torch.compile(nn.parallel.DistributedDataParallel(model))) is model
        assert svg.unwrap(model) is model
    finally:
        torch.distributed.destroy_process_group()


def test_single_process_dist(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = svg.init_distributed()
    assert (d.rank, d.world_size, d.is_main, d.initialized) == (0, 1, True, False)
    assert d.all_gather_object(3) == [3] and d.all_reduce_mean(torch.ones(1)).item() == 1


def test_precision_switch():
    x = torch.randn(4, 4)
    with svg.autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with svg.autocast("tf32", torch.device("cpu")):
        assert (x @ x).dtype == torch.float32
    svg.setup_precision("fp32")
    assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError, match="fp32"):
        svg.autocast("fp16", "cpu")
