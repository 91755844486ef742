"""One image, one feature: frozen Eq. (6) statistics, calibration, training-like batches, and
every encode path (cache extraction, eval recon / probe on 1 and 2 processes) independent of
batch make-up, folder order and world size. Also DINOv3's train-time RoPE augmentation and the
other official stage-1 train-mode behaviour (LPIPS head dropout)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import svg
import train_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = svg.resize_ae_config(dataclasses.replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny"), 64)  # 64 px, 136 channels
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 60)]


def class_sorted_folder(root, size, per_class=6, seed=0):
    """class0/ ... class3/ of noisy single-colour images: a folder sorted by class, as ImageNet."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        os.makedirs(root / f"class{c}")
        for i in range(per_class):
            im = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / f"class{c}" / f"{i:03d}.png")
    return str(root)


def trained_stats(ae, batches=3, b=4, seed=1):
    """Fill the running Eq. (6) statistics as stage-1 training does (train-mode encodes)."""
    g = torch.Generator().manual_seed(seed)
    ae.train()
    with torch.no_grad():
        for _ in range(batches):
            ae.encode(torch.rand(b, 3, ae.cfg.image_size, ae.cfg.image_size, generator=g) * 2 - 1)
    return ae.eval()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- frozen statistics in SVGAutoencoder -------------------------------------------------------------

def test_running_statistics_are_kept_like_batchnorm():
    ae = svg.SVGAutoencoder(dataclasses.replace(TINY, mask_prob=0.0, residual_dropout=0.0)).train()
    xs = [torch.rand(3, 3, 64, 64) * 2 - 1 for _ in range(3)]
    expected = None
    with torch.no_grad():
        for x in xs:
            f_d, f_r = ae.encode_unaligned(x)
            s = svg.alignment_stats(f_r, f_d)[0]  # the batch statistics the official code uses
            expected = s if expected is None else expected + svg.ALIGN_MOMENTUM * (s - expected)
            z = ae.encode(x)
            torch.testing.assert_close(z[:, 128:], svg.align_residual(f_r, f_d))  # training: batch stats
    assert int(ae.align_tracked) == 3
    torch.testing.assert_close(ae.align_running, expected)
    assert set(ae.alignment_buffers()) == {"align_running", "align_tracked", "align_batch"}


def test_frozen_mode_one_image_one_feature():
    ae = trained_stats(svg.SVGAutoencoder(TINY))
    g = torch.Generator().manual_seed(0)
    same_class = torch.rand(4, 3, 64, 64, generator=g) * 0.2 - 0.9  # dark images
    others = torch.rand(4, 3, 64, 64, generator=g) * 0.2 + 0.7  # bright images: another "class"
    x = same_class
    with torch.no_grad():
        z = ae.encode(x)
        for i in range(4):
            torch.testing.assert_close(z[i:i + 1], ae.encode(x[i:i + 1]), atol=1e-5, rtol=1e-5)
            mixed = torch.cat([others[:2], x[i:i + 1], others[2:]])  # the image among other classes
            torch.testing.assert_close(z[i], ae.encode(mixed)[2], atol=1e-5, rtol=1e-5)
        ae.align_stats = "batch"  # the official per-batch statistics depend on the company
        zb = ae.encode(x)
        assert rel(zb[0, 128:], ae.encode(torch.cat([others[:2], x[:1]]))[2, 128:]) > 1e-2
        torch.testing.assert_close(zb[:, :128], z[:, :128])  # DINO channels never depend on the mode


def test_missing_statistics_and_bad_mode_errors():
    ae = svg.SVGAutoencoder(TINY).eval()
    with pytest.raises(ValueError, match=r"no frozen Eq. \(6\) statistics .* eval.py calibrate .*"
                                         r"--align-stats batch"):
        ae.encode(torch.zeros(1, 3, 64, 64))
    ae.align_stats = "running"
    with pytest.raises(ValueError, match=r"align_stats must be one of \('frozen', 'batch'\)"):
        trained_stats(ae).encode(torch.zeros(1, 3, 64, 64))
    # The "statistics present" check is read once (no host sync per encode), and again after a load.
    ready = trained_stats(svg.SVGAutoencoder(TINY)).eval()
    untracked = svg.SVGAutoencoder(TINY).state_dict()
    with torch.no_grad():
        ready.encode(torch.zeros(1, 3, 64, 64))
        ready.load_state_dict(untracked)
        with pytest.raises(ValueError, match="no frozen Eq"):
            ready.encode(torch.zeros(1, 3, 64, 64))


def test_statistics_travel_with_the_checkpoint_and_older_files_load(tmp_path):
    ae = trained_stats(svg.SVGAutoencoder(TINY))
    torch.save({"ae_config": dataclasses.asdict(TINY), "ae": ae.state_dict(), "step": 3}, tmp_path / "ae.pt")
    loaded = svg.load_autoencoder(str(tmp_path / "ae.pt"))
    assert torch.equal(loaded.align_running, ae.align_running) and loaded.align_stats == "frozen"
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), ae.encode(x))
    old = {k: v for k, v in ae.state_dict().items() if not k.startswith("align_")}  # before this change
    older = svg.load_autoencoder({"ae_config": dataclasses.asdict(TINY), "ae": old})
    assert int(older.align_tracked) == 0 and int(older.align_batch) == svg.STAGE1_BATCH


# ---- calibration (official checkpoints have no statistics) --------------------------------------------

def test_calibration_of_an_imported_official_checkpoint(tmp_path, monkeypatch):
    from test_autoencoder import official_checkpoint, randomised

    ae = randomised(svg.SVGAutoencoder(TINY))
    torch.save(official_checkpoint(ae), tmp_path / "epoch=000040.ckpt")
    monkeypatch.setitem(svg.AE_PRESETS, "paper", TINY)  # load_autoencoder assumes the paper config
    official = svg.load_autoencoder(str(tmp_path / "epoch=000040.ckpt"))
    assert int(official.align_tracked) == 0
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad(), pytest.raises(ValueError, match="calibrate"):
        official.encode(x)
    data = class_sorted_folder(tmp_path / "train", 64, per_class=5)  # 20 images
    dataset = svg.build_dataset(data, 64, on_error="raise")
    r = svg.calibrate_alignment(official, dataset, num_images=16, batch_size=4, seed=3)
    # The mean of the per-batch statistics of a fixed seeded sample in mixed batches of 4:
    sample = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:16].tolist()
    per_batch = []
    with torch.no_grad():
        for j in range(4):
            xb = torch.stack([dataset[i][0] for i in sample[4 * j:4 * j + 4]])
            per_batch.append(svg.alignment_stats(*reversed(official.encode_unaligned(xb)))[0].double())
    per_batch = torch.stack(per_batch)  # [4 batches, 4]
    assert r["batches"] == 4 and int(official.align_tracked) == 4
    torch.testing.assert_close(official.align_running, per_batch.mean(0).float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(r["spread"]).double(),
                               per_batch.std(0, unbiased=False) / per_batch.mean(0)[[1, 1, 3, 3]], atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        z = official.encode(x)  # frozen now works, one image = one feature
        torch.testing.assert_close(z[1:2], official.encode(x[1:2]), atol=1e-5, rtol=1e-5)
        official.align_stats = "batch"  # import parity with the original model is unchanged
        ae.align_stats = "batch"
        torch.testing.assert_close(official.encode(x), ae.encode(x), atol=1e-5, rtol=1e-5)

    # The eval.py calibrate command writes a native checkpoint that encodes frozen by default.
    out = tmp_path / "calibrated.pt"
    monkeypatch.setattr("sys.argv", ["eval.py", "calibrate", "--ae", str(tmp_path / "epoch=000040.ckpt"), "--data",
                                     data, "--num-images", "16", "--batch-size", "4", "--seed", "3",
                                     "--out", str(out), "--num-workers", "0"])
    ev.main()
    ckpt = torch.load(out, weights_only=False)
    assert ckpt["step"] == 100_000 and ckpt["calibration"]["batches"] == 4
    again = svg.load_autoencoder(str(out))
    torch.testing.assert_close(again.align_running, official.align_running)
    assert json.loads((tmp_path / "calibrated.calibration.json").read_text())["batch_size"] == 4


# ---- training-like batches ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch", [(23, 4), (5, 8), (16, 4)])
def test_training_like_batches_cover_every_item_once_for_any_world_size(n, batch):
    ref = None
    for world in (1, 2, 3):
        got = {}
        for rank in range(world):
            for index, keep in svg.training_like_batches(n, batch, svg.Dist(rank=rank, world_size=world), seed=7):
                assert len(index) == batch  # always a full batch, as in training
                got[tuple(index)] = keep
        owned = sorted(i for index, keep in got.items() for i in index[:keep])
        assert owned == list(range(n))  # every item owned exactly once
        assert ref is None or got == ref  # the same batches for any world size
        ref = got
    first = sorted(ref, key=lambda b: -ref[b])[0]
    assert first != tuple(sorted(first)) or n <= batch  # a seeded permutation, not the folder order


# ---- cache extraction == on-the-fly encoding ----------------------------------------------------------

AE32 = dataclasses.replace(TINY, image_size=32, decoder_ch_mult=(1, 1, 1, 1, 1), decoder_attn_resolutions=())


def save_ae32(path):
    torch.manual_seed(0)
    ae = trained_stats(svg.SVGAutoencoder(AE32))
    ae.align_batch.fill_(8)  # the stage-1 per-GPU batch these statistics came from
    torch.save({"ae_config": dataclasses.asdict(AE32), "ae": ae.state_dict(), "step": 5}, path)
    return str(path)


def dit_args(ae, data, cache, *extra):
    return ["--preset", "tiny", "--ae", ae, "--data", data, "--extract", "--cache", str(cache), "--out",
            str(cache) + "_out", "--global-batch", "8", "--num-workers", "0", *extra]


def residual_channel_stats(f):
    """Per-channel mean and std of the residual channels of features [N, C, h, w]: [2, 8]."""
    r = f[:, -svg.RESIDUAL_DIM:].transpose(0, 1).flatten(1).double()  # [8, N h w]
    return torch.stack([r.mean(1), r.std(1)])


def test_extracted_features_equal_on_the_fly_encoding_on_a_class_sorted_folder(tmp_path):
    ae_path = save_ae32(tmp_path / "ae.pt")
    data = class_sorted_folder(tmp_path / "train", 32, per_class=16)  # 64 images, sorted by class
    images = svg.build_dataset(data, 32)
    x = torch.stack([images[i][0] for i in range(len(images))])  # [64, 3, 32, 32] in folder order
    ae = svg.load_autoencoder(ae_path)

    # Frozen (default): the cache holds exactly what on-the-fly training encodes, in any batch.
    train_dit.main(dit_args(ae_path, data, tmp_path / "frozen"))
    cache = train_dit.FeatureCache(str(tmp_path / "frozen"))
    assert cache.meta["align_stats"] == "frozen"
    with torch.no_grad():
        on_the_fly = torch.cat([ae.encode(x[i:i + 5]) for i in range(0, 64, 5)])  # any batching
        flipped = ae.encode(x.flip(-1))
    stored = torch.from_numpy(np.load(tmp_path / "frozen" / "features.npy")).float()  # [64, 2, C, h, w]
    torch.testing.assert_close(stored[:, 0], on_the_fly.half().float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(stored[:, 1], flipped.half().float(), atol=1e-3, rtol=0)

    # Batch statistics (official): training-like batches, so the residual channels have the
    # per-channel statistics of features encoded in stage-2's mixed batches, unlike batches
    # that follow the class-sorted folder (what --extract did before).
    train_dit.main(dit_args(ae_path, data, tmp_path / "batch", "--align-stats", "batch"))
    stored = torch.from_numpy(np.load(tmp_path / "batch" / "features.npy")).float()
    ae.align_stats = "batch"
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        mixed = torch.cat([ae.encode(x[torch.randperm(64, generator=g)][i:i + 8]) for _ in range(8)
                           for i in range(0, 64, 8)])  # 8 epochs of random batches of 8
        sorted_batches = torch.cat([ae.encode(x[i:i + 8]) for i in range(0, 64, 8)])  # one class per batch
    target = residual_channel_stats(mixed)
    err_new = (residual_channel_stats(stored[:, 0]) - target).abs().max().item()
    err_old = (residual_channel_stats(sorted_batches) - target).abs().max().item()
    scale = target[1].mean().item()  # typical residual std
    assert err_new < 0.2 * scale < err_old, (err_new, err_old, scale)  # stated tolerance: 20% of sigma


# ---- eval.py recon and probe: 1 process == 2 processes on a class-sorted folder -----------------------

DRIVER = """
import sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import eval as ev, svg
from test_frozen_alignment import TinyInception

torch.manual_seed(0)
lpips = svg.LPIPS()  # random weights, the same on every rank
ev.load_inception = lambda path=None: TinyInception()
svg.load_lpips = lambda vgg, heads: lpips
ev.main()
"""


class TinyInception(torch.nn.Module):
    """Stand-in with the FID network's interface (eval.py's Inception on 64 px is slow on a CPU)."""

    weights_name = "tiny-test-inception.pth"

    def forward(self, images):
        x = images.float() / 255
        pool3 = torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))], 1)  # [B, 9]
        return pool3, pool3[:, :4] * 10


def test_eval_recon_and_probe_do_not_depend_on_the_world_size(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ae = trained_stats(svg.SVGAutoencoder(TINY))
    ae.align_batch.fill_(4)
    torch.save({"ae_config": dataclasses.asdict(TINY), "ae": ae.state_dict(), "step": 5}, tmp_path / "ae.pt")
    data = class_sorted_folder(tmp_path / "data", 64, per_class=5)  # 20 images, sorted by class
    recon = ["recon", "--ae", str(tmp_path / "ae.pt"), "--data", data, "--inception", "i.pth", "--lpips-vgg", "v",
             "--lpips-heads", "h", "--batch-size", "3", "--align-stats", "batch", "--num-workers", "0"]
    probe = ["probe", "--ae", str(tmp_path / "ae.pt"), "--data", data, "--holdout", "0.25", "--epochs", "3",
             "--batch-size", "8", "--feature-batch-size", "3", "--num-workers", "0"]
    out = {f"{c}{n}": str(tmp_path / f"{c}{n}.json") for c in ("recon", "probe") for n in (1, 2)}
    # 2 processes (gloo)
    (tmp_path / "driver.py").write_text(DRIVER.format(root=ROOT))
    for cli, key in ((recon, "recon2"), (probe, "probe2")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "driver.py"), *cli, "--out", out[key]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "tests")}
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # 1 process, in this one
    torch.manual_seed(0)
    lpips = svg.LPIPS()
    monkeypatch.setattr(ev, "load_inception", lambda path=None: TinyInception())
    monkeypatch.setattr(svg, "load_lpips", lambda vgg, heads: lpips)
    for cli, key in ((recon, "recon1"), (probe, "probe1")):
        monkeypatch.setattr("sys.argv", ["eval.py", *cli, "--out", out[key]])
        ev.main()
    r1, r2, p1, p2 = (json.loads(open(out[k]).read()) for k in ("recon1", "recon2", "probe1", "probe2"))
    assert r1["num_images"] == 20 and r1["align_stats"] == "batch" and p1["align_stats"] == "frozen"
    for key in ("rfid", "psnr", "ssim", "lpips"):
        assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), key
    for space in ("dino", "svg"):
        assert p2[space] == pytest.approx(p1[space], rel=1e-5), space


# ---- DINOv3 train-time RoPE augmentation ---------------------------------------------------------------

def test_dinov3_rope_rescale_in_train_mode_only():
    rope = svg.DinoV3("dinov3_tiny").rope_embed
    assert (rope.shift_coords, rope.jitter_coords, rope.rescale_coords) == (None, None, 2.0)
    h = w = 4
    # eval: bit-identical to the plain formula (reference/dinov3.md 2): no augmentation
    c = torch.stack(torch.meshgrid(torch.arange(0.5, h) / h, torch.arange(0.5, w) / w, indexing="ij"), -1)
    c = 2.0 * c.flatten(0, 1) - 1.0
    angles = (2 * math.pi * c[:, :, None] / rope.periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = rope.eval()(h, w)
    assert torch.equal(sin, torch.sin(angles)) and torch.equal(cos, torch.cos(angles))
    # train: one log-uniform scale s in [1/2, 2] multiplies every coordinate
    scales = []
    rope.train()
    for seed in range(40):
        torch.manual_seed(seed)
        s_sin, s_cos = rope(h, w)
        p = rope.periods[-1]  # the slowest frequency: |angle| < pi, so atan2 recovers it
        a = torch.atan2(s_sin[:, 15], s_cos[:, 15])  # [hw], y-angle of the last period
        s = (a * p / (2 * math.pi * c[:, 0]))  # [hw], the same s for every token
        torch.testing.assert_close(s, s[:1].expand_as(s), atol=1e-4, rtol=1e-4)
        torch.manual_seed(seed)
        drawn = torch.empty(1).uniform_(-math.log(2), math.log(2)).exp()
        torch.testing.assert_close(s[0], drawn[0], atol=1e-4, rtol=1e-4)
        scales.append(s[0].item())
    assert 0.5 <= min(scales) < 0.8 and 1.4 < max(scales) <= 2.0


def test_dinov3_train_mode_changes_features_per_block_and_autoencoder_setting():
    dino = svg.DinoV3("dinov3_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for p in dino.parameters():  # weights large enough for attention to depend on position
            p.add_(0.3 * torch.randn_like(p))
        ref = dino.eval().forward_features(x)["x_norm_patchtokens"]
        assert torch.equal(ref, dino.forward_features(x)["x_norm_patchtokens"])  # eval: deterministic
        calls = []
        real = dino.rope_embed.forward
        dino.rope_embed.forward = lambda h, w: calls.append(1) or real(h, w)
        aug = dino.train().forward_features(x)["x_norm_patchtokens"]
        assert len(calls) == len(dino.blocks)  # DINOv3 draws a fresh rescale for every block
        assert rel(aug, ref) > 1e-3
    ae = svg.SVGAutoencoder(TINY)
    assert not ae.train().dino.training  # default: frozen DINO stays in eval while training
    ae.dino_train_mode = True  # train_ae --dino-rope-aug (the official run)
    assert ae.train().dino.rope_embed.training and not ae.eval().dino.training


# ---- LPIPS head dropout (the official stage-1 loss in train mode) --------------------------------------

def test_lpips_head_dropout_is_unbiased_and_off_for_the_metric():
    lp = svg.LPIPS()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        metric = lp(x, y)
        assert torch.equal(metric, lp(x, y)) and lp.head_dropout == 0.0
        lp.head_dropout = svg.LPIPS_HEAD_DROPOUT
        draws = torch.stack([lp(x, y) for _ in range(200)])  # [200, B]
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), metric, rtol=0.05, atol=0)  # inverted dropout: same mean


def test_residual_encoder_patch_projection_init_is_torchvision_vit():
    enc = svg.ResidualEncoder()
    w = enc.conv_proj.weight
    assert w.abs().max() < 2 and torch.equal(enc.conv_proj.bias, torch.zeros(384))
    assert w.std().item() == pytest.approx(math.sqrt(1 / 768), rel=0.02)  # 0.036, not nn.Conv2d's 0.021


def test_generator_checkpoint_carries_the_encode_mode(tmp_path):
    from test_sample import tiny_stage2_checkpoint

    path = tiny_stage2_checkpoint(tmp_path / "g.pt")
    assert svg.load_generator(path)[2].align_stats == "batch"  # older files: features had batch statistics
    ckpt = torch.load(path, weights_only=False)
    ckpt["align_stats"] = "frozen"  # what train_dit.py writes by default
    torch.save(ckpt, path)
    assert svg.load_generator(path)[2].align_stats == "frozen"


# ---- stage 1 keeps the statistics; the paper preset trains as the official run did --------------------

def test_train_ae_keeps_running_statistics_and_official_train_mode_settings(tmp_path):
    import train_ae
    from test_train_ae import TINY as AE_ARGS

    paper = train_ae.parse_args(["--data", "d", "--dino-weights", "w.pth"])
    assert paper.lpips_dropout and paper.dino_rope_aug  # what produced the paper's numbers
    tiny = train_ae.parse_args(["--preset", "tiny"])
    assert not tiny.lpips_dropout and not tiny.dino_rope_aug
    off = train_ae.parse_args(["--data", "d", "--dino-weights", "w", "--no-lpips-dropout", "--no-dino-rope-aug"])
    assert not off.lpips_dropout and not off.dino_rope_aug
    out = train_ae.main(AE_ARGS + ["--out", str(tmp_path), "--steps", "3", "--grad-accum", "2",
                                   "--dino-rope-aug", "--lpips-dropout"])
    ckpt = torch.load(os.path.join(out["out"], "checkpoints", "0000003.pt"), weights_only=True)
    assert int(ckpt["ae"]["align_tracked"]) == 3 * 2  # one update per micro-batch
    assert int(ckpt["ae"]["align_batch"]) == 2  # global 4 / 1 rank / 2 micro-batches
    sigma_r, sigma_d = ckpt["ae"]["align_running"][1::2]
    assert sigma_r > 0 and sigma_d > 0
    ae = svg.load_autoencoder(os.path.join(out["out"], "checkpoints", "0000003.pt"))
    with torch.no_grad():  # frozen by default, and the DINO of the loaded model is in eval
        x = torch.rand(3, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(ae.encode(x)[1:2], ae.encode(x[1:2]), atol=1e-5, rtol=1e-5)
    assert not ae.dino.training
