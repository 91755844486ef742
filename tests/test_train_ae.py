"""train_ae.py end to end on a 32 px model: learning, GAN start, exact resume, DDP == 1 process."""

import os
import subprocess
import sys

import pytest
import torch

import svg
import train_ae
from test_lpips_gan import random_heads_file, random_vgg_file

# A very small AE: 2-block DINO, one-block residual ViT, 32-channel one-block-per-level decoder.
TINY = ["--preset", "tiny", "--ae-set", "dino_arch=dinov3_tiny", "image_size=32",
        "decoder_attn_resolutions=[]", "decoder_ch_mult=[1,1,1,1,1]", "decoder_num_res_blocks=0",
        "residual_depth=1", "residual_width=64", "residual_heads=2", "residual_mlp=64",
        "--num-synthetic", "64", "--num-eval", "4", "--global-batch", "4", "--log-every", "1",
        "--sample-every", "1000", "--eval-every", "1000", "--ckpt-every", "1000"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def run(tmp_path, *extra):
    return train_ae.main(TINY + ["--out", str(tmp_path)] + [str(e) for e in extra])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_training_reduces_reconstruction_loss_with_lpips(tmp_path):
    random_vgg_file(tmp_path / "vgg16.pth")
    random_heads_file(tmp_path / "vgg.pth")
    out = run(tmp_path / "run", "--steps", 12, "--lr", 1e-3, "--disc-start", 1000, "--sample-every", 12,
              "--eval-every", 12, "--num-synthetic", 4,  # one batch of 4 images, seen every step
              "--lpips-vgg", tmp_path / "vgg16.pth", "--lpips-heads", tmp_path / "vgg.pth")
    nll = [h["nll"] for h in out["history"]]
    assert sum(nll[-3:]) < 0.85 * sum(nll[:3]), nll
    assert all(h["lpips"] > 0 for h in out["history"]) and set(out["eval"]) == {"psnr", "ssim", "lpips"}
    run_dir = tmp_path / "run"
    assert (run_dir / "samples" / "0000012.png").exists() and "eval step 12" in (run_dir / "log.txt").read_text()
    ckpt = load(run_dir / "checkpoints" / "0000012.pt")
    assert set(ckpt) == {"ae_config", "ae", "disc", "opt_ae", "opt_disc", "step", "sampler", "rng", "args"}
    ae = svg.load_autoencoder(str(run_dir / "checkpoints" / "0000012.pt"))  # the stage-2 entry point
    assert any(k.startswith("dino.") for k in ckpt["ae"]) and not ae.training


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 iterations in one go, GAN from iteration 3, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    with torch.random.fork_rng():
        hist = run(out, "--steps", 6, "--disc-start", 3, "--ckpt-every", 3)["history"]
    return out, hist


def test_gan_terms_absent_before_disc_start(straight):
    out, hist = straight
    assert [h["gan"] for h in hist] == [False] * 3 + [True] * 3
    assert all(h["g_loss"] == h["d_weight"] == h["d_loss"] == 0 for h in hist[:3])
    assert all(h["d_weight"] > 0 and h["d_loss"] > 0 for h in hist[3:])
    torch.manual_seed(0)  # the models are built from --seed alone: AE first, then D
    svg.SVGAutoencoder(train_ae.ae_config(train_ae.parse_args(TINY)))
    init = svg.PatchGAN().state_dict()
    at3, at6 = load(out / "checkpoints" / "0000003.pt"), load(out / "checkpoints" / "0000006.pt")
    assert_same_state(at3["disc"], init)  # D untouched before disc_start
    assert at3["opt_disc"]["state"] == {} and at6["opt_disc"]["state"]
    assert not torch.equal(at6["disc"]["main.0.weight"], init["main.0.weight"])


def test_resume_continues_exactly(straight, tmp_path):
    out, _ = straight
    run(tmp_path, "--steps", 3, "--disc-start", 3)
    assert (tmp_path / "checkpoints" / "0000003.pt").exists()
    run(tmp_path, "--steps", 6, "--disc-start", 3, "--resume", "auto")
    a, b = load(out / "checkpoints" / "0000006.pt"), load(tmp_path / "checkpoints" / "0000006.pt")
    for key in ("ae", "disc"):
        assert_same_state(a[key], b[key])
    assert a["sampler"] == b["sampler"] and a["step"] == b["step"] == 6
    for sa, sb in zip(a["opt_ae"]["state"].values(), b["opt_ae"]["state"].values()):
        assert_same_state(sa, sb)
    assert "resumed from" in (tmp_path / "log.txt").read_text()
    with pytest.raises(ValueError, match="was trained with AEConfig.*use the same --preset / --ae-set"):
        run(tmp_path, "--steps", 7, "--ae-set", "align=none", "--resume", "auto")


def test_bf16_autocast_step_with_gan(tmp_path):
    hist = run(tmp_path, "--steps", 2, "--disc-start", 1, "--precision", "bf16")["history"]
    assert hist[1]["gan"] and all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in hist)


def test_compile_matches_eager(tmp_path, monkeypatch):
    """--compile compiles the autoencoder and the LPIPS loss; with the aot_eager backend (Dynamo
    and AOTAutograd graphs, no C++ code generation) 3 iterations with the GAN from iteration 1
    train the same weights as eager."""
    random_vgg_file(tmp_path / "vgg16.pth")
    random_heads_file(tmp_path / "vgg.pth")
    flags = ("--steps", 3, "--disc-start", 1, "--lpips-vgg", tmp_path / "vgg16.pth", "--lpips-heads", tmp_path / "vgg.pth")
    eager = run(tmp_path / "eager", *flags)
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(type(m).__name__)
                        or compile_(m, backend="aot_eager", **kw))
    with_compile = run(tmp_path / "compiled", *flags, "--compile")
    assert compiled == ["Reconstruct", "LPIPS"]
    assert [h["gan"] for h in with_compile["history"]] == [False, True, True]
    for a, b in zip(eager["history"], with_compile["history"]):
        for k in ("nll", "lpips", "g_loss", "d_weight", "d_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    one, two = (load(tmp_path / d / "checkpoints" / "0000003.pt") for d in ("eager", "compiled"))
    for key in ("ae", "disc"):
        assert_same_state(one[key], two[key], exact=False, atol=1e-5)


# Eq. (6) per image, no mask draws, before disc_start: the only per-batch effects are off.
# No mask augmentation and no --decoder-noise: their draws depend on how the batch is split.
SPLIT = TINY + ["--ae-set", "align=image", "mask_prob=0", "--decoder-noise", "0", "--steps", "3", "--lr", "1e-3",
                "--disc-start", "100"]


def assert_same_training(one, two):
    """Same AE weights, up to Adam's amplification of rounding noise on zero gradients.

    Adam turns noise on a structurally zero gradient (a conv bias right before a
    one-channel-per-group GroupNorm, attention key biases) into +-lr steps. Every other
    weight must agree; a mismatch is allowed only where the first moment is ~0.
    """
    cfg = train_ae.ae_config(train_ae.parse_args(SPLIT))
    names = [n for n, _ in svg.SVGAutoencoder(cfg).named_parameters() if not n.startswith("dino.")]
    exp_avg = {n: one["opt_ae"]["state"][i]["exp_avg"] for i, n in enumerate(names)}
    assert one["ae"].keys() == two["ae"].keys()
    checked = 0
    for k, a in one["ae"].items():
        if k == "align_batch":  # the per-GPU batch: 8 on one process, 4 on two, by design
            continue
        off = ~torch.isclose(a, two["ae"][k], atol=1e-5, rtol=1e-4)
        assert not off.any() or exp_avg[k][off].abs().max() < 1e-3, k
        checked += (~off).sum().item()
    assert checked > 0.99 * sum(v.numel() for v in one["ae"].values())
    for i, s in one["opt_ae"]["state"].items():  # the same gradient scale, not only direction
        torch.testing.assert_close(s["exp_avg"], two["opt_ae"]["state"][i]["exp_avg"], atol=1e-2, rtol=0.05)


def test_two_process_ddp_equals_one_process(tmp_path):
    run(tmp_path / "one", *SPLIT[len(TINY):])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train_ae.py"), *SPLIT, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
    one, two = load(tmp_path / "one" / "checkpoints" / "0000003.pt"), load(tmp_path / "two" / "checkpoints" / "0000003.pt")
    assert len(two["rng"]) == 2
    assert_same_training(one, two)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    run(tmp_path / "one", *SPLIT[len(TINY):])
    run(tmp_path / "acc", *SPLIT[len(TINY):], "--grad-accum", 2)
    assert_same_training(load(tmp_path / "one" / "checkpoints" / "0000003.pt"),
                         load(tmp_path / "acc" / "checkpoints" / "0000003.pt"))
    with pytest.raises(AssertionError, match="divisible by --grad-accum 3"):
        run(tmp_path / "bad", "--grad-accum", 3)


def test_bad_inputs_have_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path, "--data", tmp_path / "no_such_folder")
    with pytest.raises(SystemExit):
        train_ae.main(["--data", str(tmp_path)])
    assert "--dino-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_ae.main(["--preset", "paper", "--dino-weights", "x.pth"])
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_ae.main(TINY + ["--bogus-flag"])
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected KEY=VALUE with KEY one of"):
        train_ae.ae_config(train_ae.parse_args(["--preset", "tiny", "--ae-set", "bogus=1"]))
    with pytest.raises(FileNotFoundError, match="--resume .*not found"):
        run(tmp_path, "--resume", tmp_path / "missing.pt")


def test_decoder_noise_is_per_image_and_training_only():
    """--decoder-noise TAU: in training the decoder (trunk and patch shortcut) reads z + sigma_i eps with
    sigma_i = TAU |n_i| one draw per image, after the mask draw; outside training it reads encode(x)."""
    cfg = train_ae.ae_config(train_ae.parse_args(TINY + ["--ae-set", "decoder_patch_skip=true"]))
    ae = svg.SVGAutoencoder(cfg)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model = train_ae.Reconstruct(ae, decoder_noise=0.5)
    torch.manual_seed(0)
    h, z = model.train()(x)
    torch.manual_seed(0)
    clean = ae.encode(x)  # the same mask draw
    sigma = 0.5 * torch.randn(3, 1, 1, 1).abs()
    torch.testing.assert_close(z, clean + sigma * torch.randn_like(clean))
    torch.testing.assert_close(h, ae.decoder.trunk(z))
    assert len(set(((z - clean).std((1, 2, 3)) / sigma.flatten()).round(decimals=1).tolist())) == 1  # noise ~ sigma_i
    h, z = model.eval()(x)
    torch.testing.assert_close(z, ae.encode(x))
    assert train_ae.parse_args(["--preset", "tiny"]).decoder_noise == 0.5
    assert train_ae.PRESETS["paper"]["decoder_noise"] == 0.0  # not in the paper
