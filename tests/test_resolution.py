"""App. H, higher resolution: position-embedding resampling, the same architecture at another size,
and a 64 -> 128 px --init-from run of both trainers, then sampling and editing at 128 px."""

import json
import math
import os
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import svg
import train_ae
import train_dit
from test_sample import tiny_stage2_checkpoint

# A very small AE (as tests/test_train_ae.py) at 64 px; --init-from moves it to 128 px.
AE = ["--preset", "tiny", "--ae-set", "dino_arch=dinov3_tiny", "image_size=64", "decoder_ch_mult=[1,1,1,1,1]",
      "decoder_num_res_blocks=0", "residual_depth=1", "residual_width=64", "residual_heads=2", "residual_mlp=64",
      "--num-synthetic", "8", "--num-eval", "2", "--global-batch", "2", "--log-every", "1",
      "--sample-every", "1000", "--eval-every", "1000", "--ckpt-every", "1000"]
DIT = ["--preset", "tiny", "--model", "SiT-tiny", "--prediction", "v", "--global-batch", "4", "--num-workers", "0",
       "--log-every", "1", "--ckpt-every", "1000"]
POS = "residual.encoder.pos_embedding"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def smooth(h, w, D=6):
    """Channels = low-frequency functions of the cell centres ((i + 0.5) / n in [0, 1]), [h * w, D]."""
    v, u = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    f = [torch.cos(math.pi * u), torch.sin(math.pi * v), u * v, torch.cos(math.pi * (u + v) / 2),
         (u - 0.5) ** 2, torch.sin(math.pi * u) * torch.cos(math.pi * v / 2)][:D]
    return torch.stack(f, -1).reshape(h * w, D).double()


# ---- resample_pos_embed ---------------------------------------------------------------------------

def test_resampling_to_the_same_size_is_the_identity():
    pos = torch.randn(1, 1 + 16 * 16, 8)
    assert svg.resample_pos_embed(pos, 16, 16) is pos
    # and the residual encoder at its training size adds exactly the stored table
    res = svg.ResidualEncoder(image_size=64, depth=1, width=32, heads=2, mlp_dim=32, dropout=0.0)
    assert res(torch.randn(1, 3, 64, 64)).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"expected a position embedding \[1, 1 \+ n\*n, D\]"):
        svg.resample_pos_embed(torch.randn(1, 1 + 15, 8), 4, 4)


@pytest.mark.parametrize("new", [(16, 16), (32, 32), (12, 20)])
def test_resampling_keeps_a_smooth_pattern_and_the_class_token(new):
    n, D = 8, 6
    cls = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.cat([cls, smooth(n, n, D)[None]], 1)  # [1, 1 + 64, D]
    out = svg.resample_pos_embed(pos, *new)  # [1, 1 + h*w, D]
    assert out.shape == (1, 1 + new[0] * new[1], D) and out.dtype == pos.dtype
    assert torch.equal(out[:, :1], cls)  # class token kept
    err = (out[0, 1:] - smooth(*new, D)).abs().reshape(*new, D)  # vs the pattern at the new centres
    near = F.interpolate(smooth(n, n, D).T.reshape(1, D, n, n), size=new, mode="nearest")  # [1, D, h, w]
    err_near = (near.flatten(2)[0].T - smooth(*new, D)).abs().reshape(*new, D)
    rows, cols = (((torch.arange(k) + 0.5) / k - 0.5).abs() < 0.5 - 1 / n for k in new)  # >= 1 source cell in
    inner, inner_near = err[rows][:, cols].max(), err_near[rows][:, cols].max()
    assert inner < 0.03 and inner < 0.3 * inner_near, (inner, inner_near)  # bicubic: third order inside
    assert err.max() < 0.11, err.max()  # border cells lie up to half a source cell outside (clamped)
    # row-major token order survives: a pattern that varies along x only stays constant along y
    x_only = torch.cat([cls, smooth(n, n, D)[None, :, :1].expand(1, -1, D)], 1)
    grid = svg.resample_pos_embed(x_only, *new)[0, 1:, 0].reshape(*new)
    assert (grid - grid[:1]).abs().max() < 1e-12


def test_resize_ae_config_keeps_the_architecture():
    """Only the residual position table changes shape; attention stays at the same decoder levels."""
    tiny = replace(svg.AE_PRESETS["tiny"], decoder_attn_resolutions=(4,))  # the tiny preset has no attention
    for cfg, size in ((svg.AE_PRESETS["paper"], 512), (svg.AE_PRESETS["paper"], 1024), (tiny, 128)):
        big = svg.resize_ae_config(cfg, size)
        scale = size // cfg.image_size
        assert big.image_size == size and big.decoder_attn_resolutions[0] == cfg.decoder_attn_resolutions[0] * scale
        with torch.device("meta"):
            a, b = ({k: v.shape for k, v in svg.SVGAutoencoder(c).state_dict().items()} for c in (cfg, big))
        assert a.keys() == b.keys()
        assert [k for k in a if a[k] != b[k]] == [POS]
        assert b[POS] == (1, 1 + (size // 16) ** 2, cfg.residual_width)
    assert svg.resize_ae_config(svg.AE_PRESETS["paper"], 512).decoder_attn_resolutions == (32,)
    with pytest.raises(ValueError, match="multiple of 16"):
        svg.resize_ae_config(svg.AE_PRESETS["paper"], 500)


# ---- --init-from: 64 px -> 128 px, both stages, then sampling ---------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """AE 64 px (2 steps) -> AE 128 px (--init-from, 1 step); DiT 64 px (2 steps) -> DiT 128 px (1 step)."""
    root = tmp_path_factory.mktemp("apph")
    ae64 = train_ae.main(AE + ["--out", str(root / "ae64"), "--steps", "2"])
    ae64 = os.path.join(ae64["out"], "checkpoints", "0000002.pt")
    ae128 = train_ae.main(AE + ["--out", str(root / "ae128"), "--steps", "1", "--init-from", ae64,
                                "--image-size", "128", "--disc-start", "0"])
    ae128 = os.path.join(ae128["out"], "checkpoints", "0000001.pt")
    mp = pytest.MonkeyPatch()
    mp.setitem(train_dit.SYNTHETIC_DATA, "num_images", 4)
    train_dit.main(DIT + ["--ae", ae64, "--out", str(root / "dit64"), "--steps", "2"])
    dit64 = str(root / "dit64" / "checkpoints" / "0000002.pt")
    train_dit.main(DIT + ["--ae", ae128, "--out", str(root / "dit128"), "--steps", "1", "--init-from", dit64])
    mp.undo()
    dit128 = str(root / "dit128" / "checkpoints" / "0000001.pt")
    return dict(root=root, ae64=ae64, ae128=ae128, dit64=dit64, dit128=dit128)


def test_train_ae_init_from_starts_a_new_run_at_the_new_size(runs, tmp_path):
    src, new = load(runs["ae64"]), load(runs["ae128"])
    assert new["step"] == 1 and new["sampler"]["position"] == 2  # a new run: step 0 + 1, data from the start
    assert new["opt_ae"]["state"][0]["step"] == 1  # fresh Adam
    assert new["ae_config"] == asdict(svg.resize_ae_config(svg.AEConfig(**src["ae_config"]), 128))
    assert new["ae"][POS].shape == (1, 1 + 8 * 8, 64)
    assert all(torch.isfinite(v).all() for v in new["ae"].values())
    log = (runs["root"] / "ae128" / "log.txt").read_text()
    assert "64 px -> 128 px" in log and " | nll " in log and "nan" not in log.split("initialised")[1]
    # --steps 0 writes the initial state: the source weights, the position table resampled
    out = train_ae.main(AE + ["--out", str(tmp_path / "init"), "--steps", "0", "--init-from", runs["ae64"],
                              "--image-size", "128"])
    init = load(os.path.join(out["out"], "checkpoints", "0000000.pt"))
    assert init["step"] == 0 and init["opt_ae"]["state"] == {}
    for k, v in src["ae"].items():
        expect = svg.resample_pos_embed(v, 8, 8) if k == POS else v
        assert torch.equal(init["ae"][k], expect), k
    assert all(torch.equal(init["disc"][k], v) for k, v in src["disc"].items())


def test_train_dit_init_from_loads_model_and_ema_with_fresh_optimizer_and_stats(runs):
    src, new = load(runs["dit64"]), load(runs["dit128"])
    assert (src["sit_config"]["input_size"], new["sit_config"]["input_size"]) == (4, 8)  # 16 -> 64 tokens
    assert new["step"] == 1 and new["opt"]["state"][0]["step"] == 1
    # the EMA continued from the source EMA: one update ema + (1 - decay) (model - ema)
    for k, v in src["ema"].items():
        torch.testing.assert_close(new["ema"][k], v + (1 - new["args"]["ema_decay"]) * (new["model"][k] - v), atol=1e-6,
                                   rtol=1e-5)
    moved = [k for k in src["model"] if not torch.equal(src["model"][k], new["model"][k])]
    assert moved  # the step trained the source weights
    assert not torch.equal(new["feature_stats"]["mean"], src["feature_stats"]["mean"])  # recomputed at 128 px
    assert torch.equal(new["ae"][POS], load(runs["ae128"])["ae"][POS])
    log = (runs["root"] / "dit128" / "log.txt").read_text()
    loss = float(log.split("| loss ")[1].split()[0])
    assert math.isfinite(loss) and "4x4 -> 8x8 features" in log


def test_train_dit_init_from_the_official_layout(runs, tmp_path, monkeypatch):
    """The official SVG-XL file ({"ema": ...}, reversed time, ln1, learn_sigma head, stored pos_embed)."""
    ema = load(runs["dit64"])["ema"]
    sd = {("ln1." + k[len("x_embedder."):] if k.startswith("x_embedder.") else k): v for k, v in ema.items()}
    for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[k] = torch.cat([sd[k]] * 2)
    sd["pos_embed"] = svg.sincos_pos_embed_2d(128, 4, 4)[None]  # 64 px grid; the new run is 8x8
    torch.save({"ema": sd}, tmp_path / "official.pt")
    monkeypatch.setitem(train_dit.SYNTHETIC_DATA, "num_images", 4)
    train_dit.main(DIT + ["--ae", runs["ae128"], "--out", str(tmp_path / "run"), "--steps", "1",
                          "--init-from", str(tmp_path / "official.pt")])
    new = load(tmp_path / "run" / "checkpoints" / "0000001.pt")
    assert new["sit_config"]["reversed_time"] and new["sit_config"]["input_size"] == 8
    for k, v in ema.items():  # model and EMA both start from the official EMA weights
        torch.testing.assert_close(new["ema"][k], v + (1 - new["args"]["ema_decay"]) * (new["model"][k] - v), atol=1e-6,
                                   rtol=1e-5)
    train_dit.main(DIT + ["--ae", runs["ae128"], "--out", str(tmp_path / "run"), "--steps", "2", "--resume", "auto"])
    assert load(tmp_path / "run" / "checkpoints" / "0000002.pt")["sit_config"]["reversed_time"]  # resumes as such


def test_sampling_export_and_edit_at_the_new_size(runs, tmp_path):
    ckpt = runs["dit128"]
    sample.main(["grid", "--ckpt", ckpt, "--classes", "0", "1", "--per-class", "1", "--steps", "2",
                 "--out", str(tmp_path / "g.png")])
    assert Image.open(tmp_path / "g.png").size == (132, 2 * 130 + 2)  # one 128 px row per class
    sample.main(["export", "--ckpt", ckpt, "--out-dir", str(tmp_path / "x"), "--num-samples", "2", "--steps", "2",
                 "--batch-size", "2"])
    assert np.load(tmp_path / "x" / "samples.npz")["arr_0"].shape == (2, 128, 128, 3)
    Image.fromarray(np.zeros((150, 140, 3), np.uint8)).save(tmp_path / "in.png")
    sample.main(["edit", "--ckpt", ckpt, "--image", str(tmp_path / "in.png"), "--class-id", "1", "--steps", "2",
                 "--box", "0", "0", "64", "64", "--out", str(tmp_path / "e.png")])
    assert Image.open(tmp_path / "e.png").size == (2 * 130 + 2, 132)


def test_edit_uses_the_generator_grid_not_the_autoencoder_training_size(tmp_path):
    """train_dit --image-size 64 on a 32 px AE: the SiT's grid is 4x4, so edit must crop at 64 px."""
    path = tiny_stage2_checkpoint(tmp_path / "c.pt")
    ckpt = load(path)
    ckpt["sit_config"]["input_size"] = 4  # the SiT weights do not depend on the grid
    torch.save(ckpt, path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in.png")
    sample.main(["edit", "--ckpt", path, "--image", str(tmp_path / "in.png"), "--class-id", "1", "--steps", "2",
                 "--box", "0", "0", "48", "48", "--out", str(tmp_path / "e.png")])
    assert Image.open(tmp_path / "e.png").size == (2 * 66 + 2, 68)


def test_init_from_refusals(runs, tmp_path, capsys):
    for main, extra in ((train_ae.main, AE), (train_dit.main, DIT + ["--ae", runs["ae128"]])):
        with pytest.raises(SystemExit):
            main(extra + ["--out", str(tmp_path), "--init-from", "a.pt", "--resume", "auto"])
        assert "--init-from starts a new run" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(extra + ["--init-from", "a.pt"])
        assert "give it its own --out" in capsys.readouterr().err
        with pytest.raises(FileNotFoundError, match="--init-from .*missing.pt' not found"):
            main(extra + ["--out", str(tmp_path / "m"), "--init-from", str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="does not fit this run.*hidden_size 128 there, 384 here"):
        train_dit.main(DIT + ["--ae", runs["ae128"], "--out", str(tmp_path / "s"), "--init-from", runs["dit64"],
                              "--model", "SiT-S", "--steps", "1"])


def test_eval_recon_at_the_new_size(runs, tmp_path, monkeypatch):
    import eval as ev
    from test_eval import write_pngs

    write_pngs(tmp_path / "val", np.random.default_rng(0).integers(0, 256, (2, 140, 150, 3), dtype=np.uint8))
    torch.save(ev.FIDInceptionV3().state_dict(), tmp_path / ev.INCEPTION_FILE)  # random weights, real layout
    monkeypatch.setattr(svg, "load_lpips", lambda vgg, heads: svg.LPIPS())
    out = tmp_path / "recon.json"
    monkeypatch.setattr("sys.argv", ["eval.py", "recon", "--ae", runs["ae128"], "--data", str(tmp_path / "val"),
                                     "--inception", str(tmp_path / ev.INCEPTION_FILE), "--lpips-vgg", "v",
                                     "--lpips-heads", "h", "--batch-size", "2", "--num-workers", "0",
                                     "--out", str(out)])
    ev.main()
    r = json.loads(out.read_text())
    assert r["image_size"] == 128 and r["num_images"] == 2 and math.isfinite(r["psnr"])


# ---- memory: the analytic count of bench.py against autograd's saved tensors --------------------------

def saved_bytes(module, inputs, precision):
    """Bytes of the distinct non-parameter storages autograd saves for backward in module(*inputs)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), svg.autocast(precision, "cpu"):
        module(*inputs)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sit_activation_count_matches_autograd(precision):
    import bench

    cfg = replace(svg.SIT_PRESETS["SiT-tiny"], in_channels=16, num_classes=10, hidden_size=64, num_heads=4)
    B, D = 2, cfg.hidden_size
    per_token = {}
    for n in (4, 8):  # the per-token part of one block, by differencing two grids (16 and 64 tokens)
        c = replace(cfg, input_size=n)
        sit = svg.SiT(c).train()
        per_token[n] = saved_bytes(sit.blocks[0], (torch.randn(B, n * n, D, requires_grad=True),
                                                   torch.randn(B, D, requires_grad=True)), precision)
    measured = (per_token[8] - per_token[4]) / (B * (64 - 16))
    key = "bf16-cpu" if precision == "bf16" else "fp32"  # CPU autocast keeps the QK LayerNorms in bf16
    assert measured == bench.ACTIVATION_BYTES_PER_TOKEN[key] * D + 4 * (5 * cfg.num_heads + 4)
    if precision == "fp32":  # the whole forward and loss, embedders and per-image terms included
        c = replace(cfg, input_size=8)
        sit = svg.SiT(c).train()
        x, y = torch.randn(B, 16, 8, 8), torch.randint(0, 10, (B,))
        total = saved_bytes(sit, (x, torch.rand(B), y), precision) + B * 16 * 64 * 4 * 2  # + loss (x_t, v)
        assert bench.sit_activation_bytes(c, B, precision, "cpu") == pytest.approx(total, rel=0.03)


def test_bench_memory_table_and_image_size(capsys):
    import bench

    bench.main(["--preset", "paper", "--memory"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)}
    assert [rows[s][1] for s in ("256", "512", "1024")] == ["256", "1024", "4096"]  # tokens
    act = [float(rows[s][3]) for s in ("256", "512", "1024")]
    assert act[1] == pytest.approx(4 * act[0], rel=0.02) and act[2] == pytest.approx(4 * act[1], rel=0.02)  # ~ N
    assert float(rows["256"][4]) == pytest.approx(29.9, rel=0.03)  # the H100 measurement in README, batch 32
    bench.main(["--preset", "tiny", "--image-size", "128", "--what", "train", "--batch", "2", "--warmup", "0",
                "--repeats", "1"])
    out = capsys.readouterr().out
    assert "8x8x" in out and "(128px)" in out and "train (cached)" in out
