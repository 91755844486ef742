"""Feature-space pictures: PCA feature maps (Fig. 11-12, App. G) and t-SNE panels (Fig. 4a, Fig. 10, App. E).

PCA recovers planted directions, variances and regions; `eval.py pca` / `pca-sit` / `tsne` run on tiny
checkpoints and write PNGs of the documented size; t-SNE titles carry `eval.py probe`'s top-1.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import svg
from test_eval import tiny_ae_checkpoint, write_pngs
from test_sample import SIZE as SIT_IMAGE_SIZE
from test_sample import tiny_stage2_checkpoint


def planted_feature_map(noise=0.05):
    """[2, 16, 8, 8] features: three orthonormal directions u_k with std 5 / 3 / 2 plus noise.

    Each 8x8 map has four 4x4 quadrants; a quadrant's patches all carry one coefficient
    vector, so quadrants are the "regions" PCA must separate by colour.
    """
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 3, generator=g))  # [16, 3] orthonormal columns
    stds = torch.tensor([5.0, 3.0, 2.0])
    # Eight region codes (2 images x 4 quadrants), each +-1 per component: mean 0, variance 1.
    codes = torch.tensor([[s0, s1, s2] for s0 in (1, -1) for s1 in (1, -1) for s2 in (1, -1)], dtype=torch.float)
    region = torch.zeros(2, 8, 8, dtype=torch.long)  # region id of each patch
    for b in range(2):
        for q, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            region[b, r:r + 4, c:c + 4] = 4 * b + q
    coeff = codes[region] * stds  # [2, 8, 8, 3]
    z = coeff @ u.T + noise * torch.randn(2, 8, 8, 16, generator=g)  # [2, 8, 8, 16]
    return z.permute(0, 3, 1, 2), u, stds, region  # [2, 16, 8, 8]


def test_pca_recovers_planted_directions_variances_and_regions():
    z, u, stds, region = planted_feature_map()
    tokens = z.permute(0, 2, 3, 1).reshape(-1, 16)
    scores, variances, components = ev.pca_project(tokens)
    cosines = (components.float() @ u).abs()  # [3, 3]
    assert torch.allclose(cosines, torch.eye(3), atol=0.01)  # component k is +-u_k, in order of variance
    assert torch.allclose(variances.float(), stds**2 * 128 / 127, rtol=0.01)  # unbiased, 128 tokens
    assert torch.allclose(scores.mean(0), torch.zeros(3), atol=1e-4) and scores.shape == (128, 3)
    # Sign convention: the largest loading of each component is positive.
    assert (components.gather(1, components.abs().argmax(1, keepdim=True)) > 0).all()

    rgb = ev.pca_rgb(z)  # [2, 3, 8, 8]
    assert rgb.shape == (2, 3, 8, 8) and rgb.min() >= 0 and rgb.max() <= 1
    colours = torch.stack([rgb.permute(0, 2, 3, 1)[region == r].mean(0) for r in range(8)])  # [8, 3]
    spread = max(rgb.permute(0, 2, 3, 1)[region == r].std(0).max().item() for r in range(8))
    gaps = torch.cdist(colours, colours) + 10 * torch.eye(8)
    assert spread < 0.05 and gaps.min() > 0.5  # one flat colour per region, all eight distinct
    # The colour is the region's code: each channel is high exactly where the code is +1.
    codes = torch.tensor([[s0, s1, s2] for s0 in (1, -1) for s1 in (1, -1) for s2 in (1, -1)])
    signs = torch.where(components.float() @ u > 0, 1, -1).diagonal()  # PCA sign vs planted sign
    assert torch.equal(colours > 0.5, codes * signs > 0)


def test_pca_needs_three_channels_and_tokens():
    with pytest.raises(ValueError, match="at least 3 channels"):
        ev.pca_project(torch.randn(10, 2))


def test_pca_cli_writes_one_row_per_image(tmp_path, monkeypatch, capsys):
    cfg = tiny_ae_checkpoint(tmp_path / "ae.pt")
    monkeypatch.setattr("sys.argv", ["eval.py", "pca", "--ae", str(tmp_path / "ae.pt"), "--data", "synthetic",
                                     "--num-images", "3", "--out", str(tmp_path / "pca.png")])
    ev.main()
    S, pad = cfg.image_size, 2
    with Image.open(tmp_path / "pca.png") as im:
        assert im.size == (4 * (S + pad) + pad, 3 * (S + pad) + pad)  # image | svg | dino | residual
        grid = np.asarray(im)
    # The first column is the input image itself (uint8 quantised).
    x = svg.build_dataset("synthetic", S)[0][0]
    assert np.array_equal(grid[pad:pad + S, pad:pad + S], svg.to_uint8(x).permute(1, 2, 0).numpy())
    # Each PCA column is one flat colour per 16x16 patch (nearest upsampling of the feature grid).
    cell = grid[pad:pad + 16, 2 * pad + S:2 * pad + S + 16]
    assert (cell == cell[0, 0]).all()
    assert "columns image, svg, dino, residual" in capsys.readouterr().out

    monkeypatch.setattr("sys.argv", ["eval.py", "pca", "--ae", str(tmp_path / "ae.pt"), "--data", "synthetic",
                                     "--spaces", "residual", "--out", str(tmp_path / "pca2.png")])
    tiny_ae_checkpoint(tmp_path / "ae.pt", use_residual=False)
    with pytest.raises(ValueError, match=r"\['residual'\] do not exist"):
        ev.main()


def test_pca_sit_cli_shows_hidden_states_at_the_requested_times(tmp_path, monkeypatch, capsys):
    ckpt = tiny_stage2_checkpoint(tmp_path / "dit.pt")
    model, _, _ = svg.load_generator(ckpt)
    noise = torch.randn(2, model.cfg.in_channels, 2, 2)
    recorded = []
    hook = model.blocks[1].register_forward_hook(lambda m, a, out: recorded.append(out[:2]))  # independent record
    x0, states = ev.sit_hidden_states(model, noise, torch.tensor([1, 2]), 6, block=1, keep=[4, 0], cfg_scale=2.0)
    hook.remove()
    assert states.shape == (2, 2, 4, model.cfg.hidden_size) and len(recorded) == 6  # one SiT call per Euler step
    assert torch.equal(states[0], recorded[4]) and torch.equal(states[1], recorded[0])
    assert torch.equal(x0, svg.sample_ode(model, noise, torch.tensor([1, 2]), 6, cfg_scale=2.0,
                                      null_class=model.cfg.num_classes))  # the hook changes nothing
    monkeypatch.setattr("sys.argv", ["eval.py", "pca-sit", "--ckpt", ckpt, "--classes", "1", "2", "3",
                                     "--steps", "6", "--times", "0.9", "0.5", "--out", str(tmp_path / "sit.png")])
    ev.main()
    S, pad = SIT_IMAGE_SIZE, 2
    with Image.open(tmp_path / "sit.png") as im:
        assert im.size == (3 * (S + pad) + pad, 3 * (S + pad) + pad)  # 2 times + the sample, 3 classes
    out = capsys.readouterr().out
    grid = svg.ode_time_grid(6)[:6]
    nearest = [min(grid, key=lambda t: abs(t - target)) for target in (0.9, 0.5)]
    assert f"columns t = {nearest[0]:.3f}, {nearest[1]:.3f}" in out and "block 2 " in out  # depth 4: middle = 2


def colour_class_folders(root, num_classes=3, per_class=12):
    """Class folders that differ in colour: separable even for a random-weight DINO."""
    rng = np.random.default_rng(0)
    palette = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    root.mkdir()
    for c in range(num_classes):
        noisy = np.clip(np.array(palette[c]) + rng.normal(0, 40, (per_class, 64, 64, 3)), 0, 255).astype(np.uint8)
        write_pngs(root / f"class{c}", noisy)
    return str(root)


def test_tsne_panels_are_titled_with_the_probe_top1(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    data = colour_class_folders(tmp_path / "data")
    tiny_ae_checkpoint(tmp_path / "ae.pt")
    tiny_ae_checkpoint(tmp_path / "noalign.pt")
    ckpt = torch.load(tmp_path / "noalign.pt", weights_only=False)
    ckpt["ae_config"]["align"] = "none"  # Table 4 row 2: SVG without Eq. (6)
    torch.save(ckpt, tmp_path / "noalign.pt")
    for name in ("ae", "noalign"):
        monkeypatch.setattr("sys.argv", ["eval.py", "probe", "--ae", str(tmp_path / f"{name}.pt"), "--data", data,
                                         "--holdout", "0.25", "--epochs", "3", "--batch-size", "8",
                                         "--num-workers", "0"])
        ev.main()
    monkeypatch.setattr("sys.argv", ["eval.py", "tsne", "--ae", str(tmp_path / "ae.pt"), str(tmp_path / "noalign.pt"),
                                     "--data", data, "--num-classes", "3", "--per-class", "8", "--num-workers", "0",
                                     "--out", str(tmp_path / "tsne.png")])
    ev.main()
    probe = {n: json.loads((tmp_path / f"{n}.pt.probe.json").read_text()) for n in ("ae", "noalign")}
    r = json.loads((tmp_path / "tsne.json").read_text())
    titles = [p["panel_title"] for p in r["panels"]]
    assert titles == [f"SVG: top-1 {probe['ae']['svg']['top1']:.2f}%",
                      f"DINO-only: top-1 {probe['ae']['dino']['top1']:.2f}%",
                      f"SVG w/o alignment: top-1 {probe['noalign']['svg']['top1']:.2f}%"]  # DINO-only once
    assert r["num_points"] == 24
    with Image.open(tmp_path / "tsne.png") as im:
        assert im.size == (3 * ev.TSNE_PANEL_INCHES * ev.TSNE_DPI, ev.TSNE_PANEL_INCHES * ev.TSNE_DPI)

    # A probe json of another autoencoder is refused (a DINO-only probe has no 136-channel "svg").
    (tmp_path / "dino.probe.json").write_text(json.dumps({"dino": {"channels": 128, "top1": 50.0}}))
    monkeypatch.setattr("sys.argv", ["eval.py", "tsne", "--ae", str(tmp_path / "ae.pt"), "--probe",
                                     str(tmp_path / "dino.probe.json"), "--data", data, "--num-classes", "2",
                                     "--per-class", "4", "--num-workers", "0", "--out", str(tmp_path / "t2.png")])
    with pytest.raises(ValueError, match="written for another autoencoder"):
        ev.main()


def test_class_subset_picks_whole_classes():
    dataset = svg.build_dataset("synthetic", 32, num_images=40, num_classes=4)
    subset = ev.class_subset(dataset, 3, 5, seed=1)
    labels = [ev.dataset_labels(dataset)[i] for i in subset.indices]
    assert len(labels) == 15 and len(set(labels)) == 3 and all(labels.count(c) == 5 for c in set(labels))
    with pytest.raises(ValueError, match="asked for 5 classes but the data has 4"):
        ev.class_subset(dataset, 5, 1)
    with pytest.raises(ValueError, match="fewer than --per-class 11"):
        ev.class_subset(dataset, 2, 11)


def test_tsne_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.manifold", None)
    with pytest.raises(ImportError, match=r"pip install -e '.\[viz\]'"):
        ev.require_viz()
