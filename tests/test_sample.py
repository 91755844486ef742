"""sample.py end to end on a tiny stage-2 checkpoint (tiny SiT + 32px dinov3_tiny autoencoder).

Export: deterministic, the same array for 1 and 2 torchrun (gloo) processes, resumable
shard by shard. Interpolation endpoints, editing with nothing to edit reproduces the
autoencoder reconstruction, and every bad input's message.
"""

import copy
import os
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import svg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
SIZE = 32  # image size; features are [C, 2, 2]


def tiny_stage2_checkpoint(path, with_stats=True):
    """A random tiny generator in the train_dit.py checkpoint format (CONTRACT.md)."""
    torch.manual_seed(0)
    ae_cfg = replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny", image_size=SIZE, dino_layer=None,
                     decoder_attn_resolutions=(4,))  # the autoencoder these tests' thresholds were set on
    ae = svg.SVGAutoencoder(ae_cfg)
    sit_cfg = replace(svg.SIT_PRESETS["SiT-tiny"], in_channels=ae.feature_dim, input_size=SIZE // svg.PATCH_SIZE,
                      num_classes=NUM_CLASSES)
    model = svg.SiT(sit_cfg)
    with torch.no_grad():  # leave the adaLN-Zero init so the velocity depends on x, t and y
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ema = copy.deepcopy(model)
    C = ae.feature_dim
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 0,
            "sit_config": asdict(sit_cfg), "ae_config": asdict(ae_cfg), "ae": ae.state_dict(),
            "feature_stats": {"mean": 0.1 * torch.randn(C), "std": 0.5 + torch.rand(C)},
            "sampler": None, "rng": None, "args": {}}
    if not with_stats:
        del ckpt["feature_stats"]
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_stage2_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")



EXPORT = ["--num-samples", "10", "--shard-size", "3", "--batch-size", "2", "--steps", "4", "--seed", "3",
          "--cfg-scale", "1.5", "--zero-init-steps", "1"]


def torchrun_export(ckpt, out_dir, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "sample.py"), "export", "--ckpt", ckpt, "--out-dir", str(out_dir), *EXPORT]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return np.load(os.path.join(out_dir, "samples.npz"))


@pytest.fixture(scope="module")
def one_process_export(ckpt, tmp_path_factory):
    """Plain `python sample.py export` (world size 1)."""
    out = tmp_path_factory.mktemp("one")
    sample.main(["export", "--ckpt", ckpt, "--out-dir", str(out), *EXPORT])
    return np.load(out / "samples.npz")


def test_export_same_for_one_and_two_processes(ckpt, one_process_export, tmp_path):
    one = one_process_export
    two = torchrun_export(ckpt, tmp_path / "two", 2)  # 2 gloo ranks
    assert one["arr_0"].dtype == np.uint8 and one["arr_0"].shape == (10, SIZE, SIZE, 3)
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["labels"], two["labels"])
    assert sorted(one["labels"].tolist()) == list(range(NUM_CLASSES))  # 10 samples, 10 classes: one each
    assert len({a.tobytes() for a in one["arr_0"]}) == 10  # distinct samples
    assert sorted(os.listdir(tmp_path / "two" / "shards")) == [f"shard_{k:06d}.pt" for k in range(4)]


def test_export_resumes_without_duplicates(ckpt, one_process_export, tmp_path):
    args = ["export", "--ckpt", ckpt, *EXPORT]
    full = one_process_export
    part = tmp_path / "part"
    sample.main(args + ["--out-dir", str(part), "--max-shards", "1"])  # killed after one shard
    assert os.listdir(part / "shards") == ["shard_000000.pt"] and not (part / "samples.npz").exists()
    with pytest.raises(ValueError, match=r"other settings \(cfg_scale: 1.5 there, 2.0 now\)"):
        sample.main(args + ["--out-dir", str(part), "--cfg-scale", "2.0"])
    sample.main(args + ["--out-dir", str(part), "--max-shards", "2"])
    sample.main(args + ["--out-dir", str(part)])
    resumed = np.load(part / "samples.npz")
    np.testing.assert_array_equal(resumed["arr_0"], full["arr_0"])
    np.testing.assert_array_equal(resumed["labels"], full["labels"])
    os.remove(part / "shards" / "shard_000002.pt")  # a lost shard is regenerated identically
    sample.main(args + ["--out-dir", str(part)])
    np.testing.assert_array_equal(np.load(part / "samples.npz")["arr_0"], full["arr_0"])


def test_compile_matches_eager(ckpt, one_process_export, tmp_path, monkeypatch):
    """--compile compiles the SiT and the decoder; with the aot_eager backend (Dynamo and
    AOTAutograd graphs, no C++ code generation) the export equals the eager one."""
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(type(m).__name__)
                        or compile_(m, backend="aot_eager", **kw))
    sample.main(["export", "--ckpt", ckpt, "--out-dir", str(tmp_path), *EXPORT, "--compile"])
    assert compiled == ["SiT", "Decoder"]
    got, ref = np.load(tmp_path / "samples.npz")["arr_0"], one_process_export["arr_0"]
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # uint8: a rounding boundary at most
    assert (got == ref).mean() > 0.99


def test_export_labels_and_noise_are_fixed_by_index():
    balanced = sample.export_labels(50, 10, "balanced", seed=0)
    assert torch.bincount(balanced).tolist() == [5] * 10
    assert not torch.equal(balanced, torch.arange(50) % 10)  # shuffled
    assert torch.equal(balanced, sample.export_labels(50, 10, "balanced", seed=0))
    assert sample.export_labels(50, 10, "random", seed=0).max() < 10
    noise = sample.sample_noise([4, 5, 6], (3, 2, 2), seed=1)
    assert torch.equal(noise[1], sample.sample_noise([5], (3, 2, 2), seed=1)[0])  # batch-independent
    assert not torch.equal(noise[1], sample.sample_noise([5], (3, 2, 2), seed=2)[0])


def test_grid_and_interp_endpoints(ckpt, tmp_path):
    common = ["--ckpt", ckpt, "--steps", "4", "--seed", "7"]
    sample.main(["grid", *common, "--classes", "3", "--per-class", "2", "--out", str(tmp_path / "g.png")])
    sample.main(["interp", *common, "--class-id", "3", "--num-points", "5", "--out", str(tmp_path / "i.png")])
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    strip = np.asarray(Image.open(tmp_path / "i.png"))
    pad, S = 2, SIZE
    assert grid.shape == (S + 2 * pad, 2 * (S + pad) + pad, 3) and strip.shape == (2 * (S + pad) + pad, 5 * (S + pad) + pad, 3)

    def cell(img, r, c):
        return img[pad + r * (S + pad):pad + r * (S + pad) + S, pad + c * (S + pad):pad + c * (S + pad) + S].astype(int)

    for row in (0, 1):  # lerp and slerp start at x_T^0 = noise 0 and end at x_T^1 = noise 1
        assert np.abs(cell(strip, row, 0) - cell(grid, 0, 0)).max() <= 1
        assert np.abs(cell(strip, row, 4) - cell(grid, 0, 1)).max() <= 1
    assert np.abs(cell(strip, 0, 2) - cell(strip, 1, 2)).max() > 5  # Eq. (7) and (8) differ inside
    sample.main(["grid", *common, "--classes", "3", "--per-class", "2", "--cfg-scale", "1",
                 "--out", str(tmp_path / "g1.png")])
    assert np.abs(np.asarray(Image.open(tmp_path / "g1.png")).astype(int) - grid).max() > 5  # cfg acts


def test_edit_with_nothing_to_edit_reproduces_the_reconstruction(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not square: centre-cropped to 32
    Image.fromarray(src).save(tmp_path / "in.png")
    out = tmp_path / "edit.png"
    sample.main(["edit", "--ckpt", ckpt, "--image", str(tmp_path / "in.png"), "--class-id", "4", "--steps", "10",
                 "--box", "0", "0", str(SIZE), str(SIZE), "--region", "outside", "--out", str(out)])
    panel = np.asarray(Image.open(out)).astype(int)  # input | edited, 2 px padding
    assert panel.shape == (SIZE + 4, 2 * SIZE + 6, 3)
    left, right = panel[2:2 + SIZE, 2:2 + SIZE], panel[2:2 + SIZE, SIZE + 4:2 * SIZE + 4]
    model, stats, ae = svg.load_generator(ckpt)
    image = sample.load_image(tmp_path / "in.png", SIZE)  # [1, 3, 32, 32]
    with torch.no_grad():
        recon = svg.to_uint8(ae.decode(ae.encode(image)))[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(right - recon).max() <= 1  # the edited half is the AE reconstruction
    crop = svg.to_uint8(image)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(left[1:-1, 1:-1] - crop[1:-1, 1:-1]).max() <= 1  # the input, inside the red outline
    assert (left[0, :] == [255, 0, 0]).all() and (left[:, -1] == [255, 0, 0]).all()


def test_edit_regenerates_the_box_cells_only(ckpt):
    model, stats, ae = svg.load_generator(ckpt)
    assert sample.box_mask((0, 0, 16, 32), "inside", SIZE)[0, 0].tolist() == [[1, 0], [1, 0]]  # left cells
    assert sample.box_mask((3, 17, 5, 18), "inside", SIZE)[0, 0].tolist() == [[0, 0], [1, 0]]  # touched cell
    mask = sample.box_mask((0, 0, 16, 32), "outside", SIZE)  # edit the right column
    with torch.no_grad():
        x0 = svg.normalize_features(ae.encode(torch.rand(1, 3, SIZE, SIZE) * 2 - 1), stats)  # [1, C, 2, 2]
    z = svg.edit_features(model, x0, torch.tensor([4]), mask, torch.randn_like(x0), 0.8, steps=10,
                          null_class=NUM_CLASSES)
    assert torch.equal(z[..., 0], x0[..., 0])  # preserved cells: exactly the encoded features
    assert (z[..., 1] - x0[..., 1]).abs().mean() > 0.1  # the edited cells are new


def test_bad_inputs_give_clear_errors(ckpt, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"class ids \[10\] are outside \[0, 10\)"):
        sample.main(["grid", "--ckpt", ckpt, "--classes", "3", "10"])
    with pytest.raises(SystemExit):
        sample.main(["grid", "--ckpt", ckpt, "--steps", "0"])
    assert "must be an integer >= 1, got 0" in capsys.readouterr().err
    no_stats = tiny_stage2_checkpoint(tmp_path / "no_stats.pt", with_stats=False)
    with pytest.raises(ValueError, match="feature statistics"):
        sample.main(["grid", "--ckpt", no_stats, "--classes", "1"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    edit = ["edit", "--ckpt", ckpt, "--class-id", "1"]
    with pytest.raises(ValueError, match="cannot read image"):
        sample.main(edit + ["--image", str(tmp_path / "bad.png"), "--box", "0", "0", "8", "8"])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"--box 0 0 40 8 must satisfy 0 <= x0 < x1 <= 32"):
        sample.main(edit + ["--image", str(tmp_path / "ok.png"), "--box", "0", "0", "40", "8"])
    with pytest.raises(ValueError, match=r"class ids \[-1\] are outside"):
        sample.main(["interp", "--ckpt", ckpt, "--class-id", "-1"])
