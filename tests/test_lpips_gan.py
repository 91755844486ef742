"""LPIPS v0.1 parity and loading, PatchGAN, the LDM reconstruction / hinge / adaptive-weight loss."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.signal import correlate2d

import svg

CONV_IDS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision vgg16.features convs


def random_vgg_file(path, extra=None):
    """Random VGG16 weights under torchvision's key names, plus a (small) classifier."""
    g = torch.Generator().manual_seed(0)
    sd, c_in = {}, 3
    for i, c in zip(CONV_IDS, [v for v in svg.VGG16_FEATURES if v != "M"]):
        sd[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
        sd[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.1
        c_in = c
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # ignored by the loader
    sd.update(extra or {})
    torch.save(sd, path)
    return sd


def random_heads_file(path, keys=None):
    g = torch.Generator().manual_seed(1)
    sd = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
          for i, c in enumerate(svg.LPIPS_CHANNELS)}
    torch.save(keys(sd) if keys else sd, path)
    return sd


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    vgg, heads = random_vgg_file(d / "vgg16.pth"), random_heads_file(d / "vgg.pth")
    return d, vgg, heads


def reference_lpips(x, y, vgg, heads):
    """LPIPS written out from its definition: plain F.conv2d over the VGG16 config."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(h):
        out, conv, taps = [], 0, {1: 0, 3: 1, 6: 2, 9: 3, 12: 4}  # conv number after which to tap
        h = (h - shift) / scale
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            if v == "M":
                h = F.max_pool2d(h, 2)
                continue
            i = CONV_IDS[conv]
            h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            if conv in taps:
                out.append(h)
            conv += 1
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (torch.sqrt((a**2).sum(1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt((b**2).sum(1, keepdim=True)) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total = total + ((a - b) ** 2 * w).sum(1).mean((1, 2))
    return total


def test_lpips_matches_definition(lpips_files):
    d, vgg, heads = lpips_files
    lp = svg.load_lpips(d / "vgg16.pth", d / "vgg.pth")
    x, y = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    got = lp(x, y)
    assert got.shape == (2,)
    torch.testing.assert_close(got, reference_lpips(x, y, vgg, heads), atol=1e-5, rtol=1e-5)
    assert lp(x, x).abs().max() < 1e-6
    with svg.autocast("bf16", "cpu"):  # trunk in bf16, distance in fp32
        torch.testing.assert_close(lp(x, y), got, rtol=0.05, atol=0.0)


def test_lpips_frozen_eval_and_differentiable(lpips_files):
    d, _, _ = lpips_files
    lp = svg.load_lpips(d / "vgg16.pth", d / "vgg.pth").train()
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    lp(x, torch.rand(1, 3, 32, 32)).sum().backward()
    assert x.grad.abs().sum() > 0


def test_lpips_loader_errors(lpips_files, tmp_path, monkeypatch):
    d, _, _ = lpips_files
    with pytest.raises(FileNotFoundError, match="download.pytorch.org/models/vgg16-397923af.pth"):
        svg.load_lpips(tmp_path / "missing.pth", d / "vgg.pth")
    with pytest.raises(FileNotFoundError, match="lpips/weights/v0.1/vgg.pth"):
        svg.load_lpips(d / "vgg16.pth", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="holds LPIPS heads.*--lpips-heads"):
        svg.load_lpips(d / "vgg.pth", d / "vgg.pth")
    random_vgg_file(tmp_path / "extra.pth", extra={"features.30.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not torchvision's vgg16.*features.30.weight"):
        svg.load_lpips(tmp_path / "extra.pth", d / "vgg.pth")
    sd = torch.load(d / "vgg16.pth")
    del sd["features.28.bias"]
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing.*features.28.bias"):
        svg.load_lpips(tmp_path / "short.pth", d / "vgg.pth")
    random_heads_file(tmp_path / "h.pth", keys=lambda s: {k.replace(".model.1", ""): v for k, v in s.items()})
    with pytest.raises(ValueError, match=r"not the LPIPS v0.1 heads file.*lin0.model.1.weight"):
        svg.load_lpips(d / "vgg16.pth", tmp_path / "h.pth")
    random_heads_file(tmp_path / "h2.pth", keys=lambda s: {**s, "lin0.model.1.weight": torch.ones(1, 3, 1, 1)})
    with pytest.raises(ValueError, match="wrong shapes"):
        svg.load_lpips(d / "vgg16.pth", tmp_path / "h2.pth")

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="downloading https://download.pytorch.org.*failed"):
        svg.load_lpips(None, d / "vgg.pth")


def test_patchgan_matches_taming_layout():
    D = svg.PatchGAN()
    assert sum(p.numel() for p in D.parameters()) == 2_765_633
    keys = {k.rsplit(".", 1)[0] for k in D.state_dict()}
    assert keys == {f"main.{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    assert D(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert abs(D.main[5].weight.std().item() - 0.02) < 1e-3  # weights_init N(0, 0.02)
    assert abs(D.main[6].weight.mean().item() - 1.0) < 0.01 and D.main[6].bias.abs().sum() == 0


def test_hinge_and_generator_losses():
    two = torch.full((3, 1, 2, 2), 2.0)
    assert svg.hinge_d_loss(two, -two).item() == 0  # confident and correct
    assert svg.hinge_d_loss(0 * two, 0 * two).item() == 1.0
    assert svg.hinge_d_loss(-two, two).item() == 3.0  # 0.5 * (3 + 3)
    assert svg.generator_loss(two).item() == -2.0


def test_reconstruction_loss_is_summed_over_pixels_divided_by_batch():
    x, x_hat = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    nll, l1, p = svg.reconstruction_loss(x, x_hat, lpips=lambda a, b: torch.tensor([0.1, 0.3]))
    # per image: 48 pixels * 0.5 + 48 * lpips_i; summed over images, divided by B = 2
    assert nll.item() == pytest.approx((48 * 0.5 * 2 + 48 * 0.4) / 2)
    assert l1.item() == 0.5 and p.item() == pytest.approx(0.2)
    assert svg.reconstruction_loss(x, x_hat)[0].item() == pytest.approx(48 * 0.5)


def test_adaptive_weight_analytic_and_clamped():
    g = torch.ones(2, 2)  # norm 2
    lam = svg.adaptive_weight(3 * g, 1.5 * g)
    assert lam.item() == pytest.approx(0.5 * 6 / (3 + 1e-4)) and not lam.requires_grad
    assert svg.adaptive_weight(g, 0 * g).item() == pytest.approx(0.5 * 1e4)
    assert svg.gan_active(2500, 2500) and not svg.gan_active(2499, 2500)


# fp32: the same products summed in another order differ by ~2e-6 of the largest gradient entry
# (grads analytically 0, e.g. conv biases before a GroupNorm, are that rounding noise).
GRAD_RTOL = 1e-5  # of each entry, plus GRAD_RTOL x the largest entry of any reference gradient


def ldm_generator_step(ae, lpips, disc, x, gan, scale):
    """Today's LDM / taming formulation: autograd.grad of nll and g at W, then the full backward."""
    x_hat = ae.decode(ae.encode(x))
    nll = svg.reconstruction_loss(x, x_hat, lpips)[0]
    g_loss = svg.generator_loss(disc(x_hat)) if gan else torch.zeros(())
    d_weight = torch.zeros(())
    if gan:
        W = ae.decoder.conv_out.weight
        grads = [torch.autograd.grad(loss, W, retain_graph=True)[0] for loss in (nll, g_loss)]
        d_weight = svg.adaptive_weight(*grads)
    ((nll + d_weight * g_loss) * scale).backward()
    return d_weight


@pytest.mark.parametrize("gan", [True, False])
def test_one_backward_generator_step_equals_ldm_formulation(gan):
    """autoencoder_backward (LPIPS and D differentiated once) gives the parameter gradients and
    the adaptive weight of the LDM formulation (which differentiates them twice), in fp32."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny", image_size=32,
                              decoder_ch=32, decoder_ch_mult=(1, 1, 1, 1, 1), decoder_num_res_blocks=0,
                              decoder_attn_resolutions=(), residual_depth=1, residual_width=64,
                              residual_heads=2, residual_mlp=64, residual_dropout=0.0, mask_prob=0.0)
    ae, disc, lpips = svg.SVGAutoencoder(cfg).train(), svg.PatchGAN(ndf=16), svg.LPIPS()
    for p in lpips.lins.parameters():
        p.data.uniform_(0, 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    bn_state = {k: v.clone() for k, v in disc.state_dict().items()}
    ref_weight = ldm_generator_step(ae, lpips, disc, x, gan, scale=0.5)
    ref = {n: p.grad.clone() for n, p in ae.named_parameters() if p.grad is not None}
    ae.zero_grad(set_to_none=True)
    disc.load_state_dict(bn_state)  # the same BatchNorm statistics for the second forward
    x_hat = ae.decode(ae.encode(x))
    x_cut = x_hat.detach().requires_grad_()
    nll = svg.reconstruction_loss(x, x_cut, lpips)[0]
    g_loss = svg.generator_loss(disc(x_cut)) if gan else None
    d_weight = svg.autoencoder_backward(x_hat, x_cut, nll, g_loss, ae.decoder.conv_out.weight, scale=0.5)
    assert (d_weight > 0) == gan
    torch.testing.assert_close(d_weight, ref_weight, rtol=GRAD_RTOL, atol=0)
    got = {n: p.grad for n, p in ae.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and len(got) > 10
    atol = GRAD_RTOL * max(g.abs().max().item() for g in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=GRAD_RTOL, atol=atol, msg=n)


def reference_ssim(x, y):
    """Per-channel SSIM with scipy 'valid' correlation and an 11x11 sigma-1.5 Gaussian."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    vals = []
    for a, b in zip(x.double().numpy(), y.double().numpy()):
        f = lambda t: correlate2d(t, win, mode="valid")  # noqa: E731
        mx, my = f(a), f(b)
        vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
        vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    assert torch.allclose(svg.psnr(x, x + 0.2), torch.full((2,), 20.0, dtype=torch.float64))  # mse 0.04, peak 2
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    s = svg.ssim(x, y)
    assert s.shape == (2,) and torch.allclose(svg.ssim(x, x), torch.ones(2, dtype=torch.float64))
    for i in range(2):
        # [-1, 1] images are scored as uint8 would be: SSIM of (x + 1) in [0, 2], data range 2
        assert s[i].item() == pytest.approx(reference_ssim(x[i].double() + 1, y[i].double() + 1), abs=1e-10)
    assert svg.ssim(x, y - 0.1)[0] != pytest.approx(reference_ssim(x[0].double(), y[0].double() - 0.1), abs=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        svg.ssim(x[..., :8, :8], y[..., :8, :8])
