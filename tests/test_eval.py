"""Evaluation metrics (FID, IS, precision/recall, PSNR, SSIM), image sources, DDP gathering, CLI."""

import json
import math
import types

import numpy as np
import pytest
import torch

import eval as ev


def random_spd(rng, d, n=None):
    a = rng.standard_normal((n or 2 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(a, rowvar=False)


# ---------------------------------------------------------------- Frechet distance
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_of_diagonal_gaussians_is_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    assert ev.frechet_distance(mu1, np.diag(a), mu1, np.diag(a), method=method) == pytest.approx(0, abs=1e-9)


def test_eigh_form_handles_singular_covariances():
    a = np.array([0.0, 0.0, 1.0, 2.0])  # Cholesky fails: the eigen square root takes over
    b = np.array([1.0, 4.0, 1.0, 0.5])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_sqrtm_and_eigh_formulations_agree_on_random_spd():
    rng = np.random.default_rng(1)
    for d in (8, 64, 200):
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        fid_eigh = ev.frechet_distance(mu1, s1, mu2, s2, method="eigh")
        fid_sqrtm = ev.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
        assert fid_eigh == pytest.approx(fid_sqrtm, rel=1e-6)
    # Rank-deficient (fewer samples than dimensions), as for small sample sets.
    s1, s2 = random_spd(rng, 64, n=40), random_spd(rng, 64, n=40)
    assert ev.frechet_distance(mu1[:64], s1, mu2[:64], s2, "eigh") == pytest.approx(
        ev.frechet_distance(mu1[:64], s1, mu2[:64], s2, "sqrtm"), rel=1e-6)


def test_feature_statistics_are_float64_and_unbiased():
    f = torch.randn(50, 6)
    mu, sigma = ev.feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        ev.feature_statistics(torch.randn(1, 6))


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="FID statistics disagree"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary component"):
        ev.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2), method="sqrtm")  # sqrt(-I) = iI


# ---------------------------------------------------------------- Inception Score
def test_inception_score_analytic_cases():
    assert ev.inception_score(torch.zeros(40, 1008)) == pytest.approx((1.0, 0.0))  # uniform p(y|x)
    logits = torch.full((50, 1008), -100.0)
    logits[torch.arange(50), torch.arange(50) % 5] = 100.0  # each split: 5 confident, distinct classes
    mean, std = ev.inception_score(logits)
    assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # Contiguous, unshuffled splits: one class per split gives IS 1.
    logits = torch.full((50, 1008), -100.0)
    logits[torch.arange(50), torch.arange(50) // 5] = 100.0
    assert ev.inception_score(logits)[0] == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="at least 10 images"):
        ev.inception_score(torch.zeros(5, 1008))


# ---------------------------------------------------------------- precision / recall
def brute_force_pr(real, fake, k):
    def sq(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    r_real = np.sort(sq(real, real), 1)[:, k]  # index 0 is the point itself
    r_fake = np.sort(sq(fake, fake), 1)[:, k]
    precision = (sq(fake, real) <= r_real[None]).any(1).mean()
    recall = (sq(real, fake) <= r_fake[None]).any(1).mean()
    return precision, recall


def test_precision_recall():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8))
    assert ev.precision_recall(x, x) == (1.0, 1.0)
    assert ev.precision_recall(x, x + 100.0) == (0.0, 0.0)
    real, fake = rng.standard_normal((70, 8)), 0.7 * rng.standard_normal((50, 8)) + 0.5
    expected = brute_force_pr(real, fake, ev.PR_NEIGHBOURS)
    real_t, fake_t = torch.tensor(real).float(), torch.tensor(fake).float()
    precision = ev.fraction_in_manifold(fake_t, real_t, ev.manifold_radii(real_t, batch_size=16), batch_size=16)
    recall = ev.fraction_in_manifold(real_t, fake_t, ev.manifold_radii(fake_t, batch_size=16), batch_size=16)
    assert (precision, recall) == pytest.approx(expected)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    with pytest.raises(ValueError, match="more than k=3"):
        ev.precision_recall(x[:3], x)


# ---------------------------------------------------------------- PSNR / SSIM
def test_psnr():
    a = torch.randint(0, 200, (2, 3, 16, 16), dtype=torch.uint8)
    assert (ev.psnr_ssim(a, a)[0] > 120).all()  # identical: MSE clamped at 1e-12 by svg.psnr
    expected = 10 * math.log10(255**2 / 100)  # constant offset 10 -> MSE 100
    torch.testing.assert_close(ev.psnr_ssim(a, a + 10)[0], torch.full((2,), expected, dtype=torch.float64))


def ssim_numpy(a, b, data_range=255.0):
    """Direct SSIM: every valid 11x11 window, 2-D Gaussian weights, per channel, then mean."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[c, i : i + 11, j : j + 11], b[c, i : i + 11, j : j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_matches_direct_implementation():
    torch.manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 16, 18), dtype=torch.uint8)
    torch.testing.assert_close(ev.psnr_ssim(a, a)[1], torch.ones(2, dtype=torch.float64))
    # Contrast, luminance shift and noise: the luminance term is what [-1, 1] inputs would get wrong.
    b = (a.double() * 0.5 + 20 + 10 * torch.randn(a.shape)).round().clamp(0, 255).to(torch.uint8)
    got = ev.psnr_ssim(a, b)[1]
    expected = [ssim_numpy(a[i].double().numpy(), b[i].double().numpy()) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert 0.1 < got.min() < got.max() < 0.95


# ---------------------------------------------------------------- image sources, DDP gathering
def test_npz_images_memmap_and_compressed(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr, other=np.zeros(3))
    np.savez_compressed(tmp_path / "c.npz", arr_0=arr)
    stored = ev.NpzImages(str(tmp_path / "s.npz"))
    assert isinstance(stored.images, np.memmap)
    for ds in (stored, ev.open_images(str(tmp_path / "c.npz"))):
        assert len(ds) == 5 and torch.equal(ds[3], torch.from_numpy(arr[3]).permute(2, 0, 1))
    np.savez(tmp_path / "f.npz", arr_0=arr.astype(np.float32))
    with pytest.raises(ValueError, match=r"arr_0 must be uint8 \[N, H, W, 3\]"):
        ev.NpzImages(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "x.npz", images=arr)
    with pytest.raises(KeyError, match="no 'arr_0' array"):
        ev.NpzImages(str(tmp_path / "x.npz"))
    with pytest.raises(FileNotFoundError, match="neither a folder of PNG/JPEG images nor an existing .npz"):
        ev.open_images(str(tmp_path / "nothing.npz"))


def test_gather_strided_restores_dataset_order(monkeypatch):
    n, world = 8, 3
    items = torch.arange(n * 2).view(n, 2)
    slices = [items[r::world] for r in range(world)]  # ranks hold 3, 3, 2 rows

    def fake_all_gather(parts, x):
        for r, s in enumerate(slices):
            parts[r].copy_(torch.cat([s, s.new_zeros(len(x) - len(s), 2)]))

    monkeypatch.setattr(ev.torch_dist, "all_gather", fake_all_gather)
    dist = types.SimpleNamespace(rank=0, world_size=world)
    assert torch.equal(ev.gather_strided(slices[0], dist, n), items)


# ---------------------------------------------------------------- reference statistics and the fid CLI
class TinyInception(torch.nn.Module):
    """Stand-in with the FID network's interface: per-channel moments as 'pool3', 4 'logits'."""

    weights_name = "tiny-test-inception.pth"

    def forward(self, images):
        x = images.float() / 255
        pool3 = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # [B, 6]
        return pool3, pool3[:, :4] * 10  # [B, 6], [B, 4]


def write_pngs(folder, images):
    from PIL import Image

    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def test_folder_images_must_share_one_size(tmp_path):
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "s", rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(tmp_path / "s" / "z.png")
    ds = ev.open_images(str(tmp_path / "s"))
    assert len(ds) == 3 and ds[0].shape == (3, 16, 16) and ds[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="z.png is 12x8 but .*000.png is 16x16: samples for FID must all have one size"):
        ds[2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg/.jpeg/.png/.webp/.bmp images under"):
        ev.open_images(str(tmp_path / "empty"))


def test_reference_statistics_from_folder_are_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "ref", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    dist = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    ref = ev.reference_statistics(str(tmp_path / "ref"), TinyInception(), dist, batch_size=5, num_workers=0)
    assert ref["num"] == 12 and ref["mu"].shape == (6,) and ref["sigma"].shape == (6, 6)
    assert len(list(tmp_path.glob("ref.inception-*.npz"))) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("cached features were recomputed")

    monkeypatch.setattr(ev, "inception_features", no_recompute)
    again = ev.reference_statistics(str(tmp_path / "ref"), TinyInception(), dist, num_workers=0)
    np.testing.assert_array_equal(again["sigma"], ref["sigma"])
    # ADM reference batch: stored mu/sigma are used as they are.
    np.savez(tmp_path / "virtual.npz", mu=np.ones(6), sigma=np.eye(6))
    adm = ev.reference_statistics(str(tmp_path / "virtual.npz"), TinyInception(), dist)
    assert adm["features"] is None and np.array_equal(adm["mu"], np.ones(6))
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz.*--ref"):
        ev.reference_statistics(str(tmp_path / "missing.npz"), TinyInception(), dist)


def test_fid_cli_reports_count_reference_network_and_resize(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (15, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr(ev, "load_inception", lambda path: TinyInception())
    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", ["eval.py", "fid", "--samples", str(tmp_path / "samples.npz"), "--ref",
                                     str(tmp_path / "ref.npz"), "--inception", "w.pth", "--out", str(out),
                                     "--num-workers", "0"])
    ev.main()
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_samples"] == 20 and result["num_reference_images"] == 15
    assert result["fid"] > 0 and 1 <= result["inception_score"] <= 4 and 0 <= result["precision"] <= 1
    lines = printed.splitlines()
    for line in lines[:3]:  # FID, IS, precision/recall
        assert "20 samples" in line and "tiny-test-inception.pth" in line and "bilinear to 299x299" in line
    assert "ref.npz" in lines[0] and "15 reference images of" in lines[2] and "ref.npz" in lines[2]


# ---------------------------------------------------------------- reconstruction and linear probe
import dataclasses  # noqa: E402

import svg  # noqa: E402


def tiny_ae_checkpoint(path, use_residual=True):
    """A randomly initialised tiny autoencoder saved in the stage-1 checkpoint format."""
    cfg = dataclasses.replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny", use_residual=use_residual,
                              image_size=64, dino_layer=None, decoder_attn_resolutions=(4,))  # 64 px, last block
    ae = svg.SVGAutoencoder(cfg)
    if use_residual:  # running Eq. (6) statistics, as one stage-1 step keeps them
        ae.train().encode(torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1)
    torch.save({"ae_config": dataclasses.asdict(cfg), "ae": ae.state_dict(), "step": 0, "args": {}}, path)
    return cfg


class IdentityAutoencoder(torch.nn.Module):
    def encode_batch_size(self, default):
        return default

    def encode(self, x):
        return x

    def decode(self, z):
        return z


def test_reconstruction_of_identity_is_perfect(tmp_path):
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "val", rng.integers(0, 256, (3, 72, 80, 3), dtype=np.uint8))
    dataset = svg.build_dataset(str(tmp_path / "val"), 64, on_error="raise")
    r = ev.evaluate_reconstruction(IdentityAutoencoder(), dataset, TinyInception(), svg.LPIPS(), svg.Dist(),
                                   batch_size=2, num_workers=0)
    assert r["num_images"] == 3 and r["rfid"] == pytest.approx(0, abs=1e-9)
    assert r["psnr"] > 120 and r["ssim"] == pytest.approx(1.0) and r["lpips"] == pytest.approx(0, abs=1e-7)


def test_recon_cli_end_to_end_on_tiny_autoencoder(tmp_path, monkeypatch, capsys):
    tiny_ae_checkpoint(tmp_path / "ae.pt")
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "val", rng.integers(0, 256, (3, 72, 80, 3), dtype=np.uint8))
    torch.save(ev.FIDInceptionV3().state_dict(), tmp_path / ev.INCEPTION_FILE)  # random weights, real layout
    lpips = svg.LPIPS()
    monkeypatch.setattr(svg, "load_lpips", lambda vgg, heads: lpips)
    monkeypatch.setattr("sys.argv", ["eval.py", "recon", "--ae", str(tmp_path / "ae.pt"), "--data",
                                     str(tmp_path / "val"), "--inception", str(tmp_path / ev.INCEPTION_FILE),
                                     "--lpips-vgg", "v.pth", "--lpips-heads", "h.pth", "--num-images", "2",
                                     "--batch-size", "2", "--num-workers", "0"])
    ev.main()
    r = json.loads((tmp_path / "ae.pt.recon.json").read_text())
    # Independent recomputation of the per-image metrics from the same reconstructions.
    ae = svg.load_autoencoder(str(tmp_path / "ae.pt"))
    x = torch.stack([svg.build_dataset(str(tmp_path / "val"), 64)[i][0] for i in range(2)])
    with torch.no_grad():
        u_x, u_rec = svg.to_uint8(x), svg.to_uint8(ae.decode(ae.encode(x)))
        lp = lpips(u_x.float() / 127.5 - 1, u_rec.float() / 127.5 - 1)
    mse = ((u_x.double() - u_rec.double()) ** 2).mean((1, 2, 3)).numpy()
    assert r["num_images"] == 2 and r["image_size"] == 64 and math.isfinite(r["rfid"]) and r["rfid"] > 0
    assert r["psnr"] == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), rel=1e-6)
    assert r["lpips"] == pytest.approx(lp.mean().item(), rel=1e-4)
    assert r["ssim"] == pytest.approx(np.mean([ssim_numpy(u_x[i].double().numpy(), u_rec[i].double().numpy())
                                               for i in range(2)]), abs=1e-5)
    printed = capsys.readouterr().out
    assert "2 reconstructions" in printed and "not the VIRTUAL gFID batch" in printed and ev.INCEPTION_FILE in printed


def test_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(6, 16, generator=g)
    y = torch.arange(600) % 6
    x = centres[y] + 0.5 * torch.randn(600, 16, generator=g)
    r = ev.linear_probe(x[:500], y[:500], x[500:], y[500:], 6, epochs=20, batch_size=100, lr=1e-2)
    assert r["top1"] == 100.0 and r["top5"] == 100.0
    untrained = ev.linear_probe(x[:500], y[:500], x[500:], y[500:], 6, epochs=0)
    assert untrained["top1"] < 60


def test_probe_cli_beats_chance_on_separable_classes(tmp_path, monkeypatch, capsys):
    # Class folders that differ in colour: separable even for a random-weight DINO (the shape
    # classes of svg.SyntheticImages are not: top-1 stays near chance without trained weights).
    tiny_ae_checkpoint(tmp_path / "ae.pt")
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        noisy = np.clip(np.array(colour) + rng.normal(0, 40, (16, 64, 64, 3)), 0, 255).astype(np.uint8)
        (tmp_path / "data").mkdir(exist_ok=True)
        write_pngs(tmp_path / "data" / f"class{c}", noisy)
    monkeypatch.setattr("sys.argv", ["eval.py", "probe", "--ae", str(tmp_path / "ae.pt"), "--data",
                                     str(tmp_path / "data"), "--holdout", "0.25", "--epochs", "20",
                                     "--batch-size", "8", "--num-workers", "0"])
    ev.main()
    r = json.loads((tmp_path / "ae.pt.probe.json").read_text())
    assert (r["num_train"], r["num_val"], r["num_classes"]) == (36, 12, 3)
    assert r["dino"]["channels"] == 128 and r["svg"]["channels"] == 136
    assert r["dino"]["top1"] > 90 and r["svg"]["top1"] > 90  # chance: 33%
    assert "linear probe svg: top-1" in capsys.readouterr().out


# ---------------------------------------------------------------- shapes: the tiny tier's class score
def test_shape_judge_names_real_shapes_and_not_noise():
    judge = ev.train_shape_judge(4, 32, num_images=1024, epochs=4)
    u, y = ev.synthetic_uint8(200, 32, 4, ev.SHAPES_TEST_SEED)  # images the judge never saw
    ref = ev.feature_statistics(ev.judge_images(judge, ev.synthetic_uint8(200, 32, 4, ev.SHAPES_REF_SEED)[0])[1])
    real = ev.shape_score(judge, u, y, ref)
    assert real["accuracy"] > 45  # chance: 25% (this judge sees 1024 x 4 images; the default 2048 x 8: ~99%)
    flat = torch.full_like(u, 128)  # grey images carry no class: one prediction for all, 25% right
    blank = ev.shape_score(judge, flat, y, ref)
    assert blank["accuracy"] == 25.0 and blank["fd"] > 10 * real["fd"]


def test_shapes_command_rows_and_untrained_rebuild(tmp_path, capsys):
    # A stage-2 checkpoint whose EMA is still its initialisation (train_dit.py builds SiT(cfg) right after
    # manual_seed(--seed)): the "untrained" row must rebuild exactly those weights, so both rows agree.
    torch.manual_seed(0)
    ae_cfg = dataclasses.replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny", image_size=32)
    ae = svg.SVGAutoencoder(ae_cfg)
    sit_cfg = dataclasses.replace(svg.SIT_PRESETS["SiT-tiny"], in_channels=ae.feature_dim, input_size=2, num_classes=4)
    torch.manual_seed(7)
    init = svg.SiT(sit_cfg).state_dict()
    C = ae.feature_dim
    ckpt = {"ema": init, "step": 5, "sit_config": dataclasses.asdict(sit_cfg), "ae_config": dataclasses.asdict(ae_cfg),
            "ae": ae.state_dict(), "feature_stats": {"mean": torch.zeros(C), "std": torch.ones(C)},
            "args": {"data": "synthetic", "seed": 7}}
    torch.save(ckpt, tmp_path / "g.pt")
    quick = ["--per-class", "4", "--steps", "2", "--judge-images", "128", "--judge-epochs", "1"]
    r = ev.main(["shapes", "--ckpt", str(tmp_path / "g.pt"), *quick])
    assert set(r) >= {"real", "reconstruction", "untrained", "trained"} and r["num_per_row"] == 16
    assert r["untrained"] == r["trained"]
    assert "untrained" in capsys.readouterr().out and (tmp_path / "g.pt.shapes.json").exists()
    ckpt["args"]["data"] = "/imagenet/train"
    torch.save(ckpt, tmp_path / "folder.pt")
    with pytest.raises(ValueError, match="synthetic shapes only"):
        ev.main(["shapes", "--ckpt", str(tmp_path / "folder.pt"), *quick])
