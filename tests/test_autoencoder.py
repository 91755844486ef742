"""Residual encoder, Eq. (6) alignment, LDM decoder, SVGAutoencoder, checkpoint loading and errors."""

import dataclasses

import pytest
import torch

import svg

TINY = dataclasses.replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny")  # 128 DINO channels, fast


def images(b=2, h=64, w=64):
    return torch.rand(b, 3, h, w) * 2 - 1


def official_stats(h):
    """The official match_distribution statistics on a [B, C, N] tensor (reference/svg_official.md 3)."""
    return h.mean(dim=(0, 2)).mean(), h.std(dim=(0, 2)).mean()


# ---- decoder and residual encoder layouts ------------------------------------------------------------

def test_decoder_param_count_and_ldm_keys():
    with torch.device("meta"):
        dec = svg.Decoder(392)  # z 392, ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attn at 16
    assert sum(p.numel() for p in dec.parameters()) == 43_076_483  # reference/svg_official.md 4
    keys = set(dec.state_dict())
    for k in ["conv_in.weight", "mid.block_1.norm1.weight", "mid.attn_1.proj_out.weight", "mid.block_2.conv2.bias",
              "up.0.block.0.conv1.weight", "up.4.block.2.conv2.weight", "up.4.attn.2.q.weight",
              "up.3.block.0.nin_shortcut.weight", "up.1.upsample.conv.weight", "norm_out.weight", "conv_out.bias"]:
        assert k in keys, k
    assert "up.0.upsample.conv.weight" not in keys and "up.3.attn.0.q.weight" not in keys
    assert dec.state_dict()["conv_in.weight"].shape == (512, 392, 3, 3)


def test_decoder_patch_shortcut_maps_each_token_to_its_own_patch():
    """Tiny tier's decoder_patch_skip: output = LDM decoder + a linear map of token (i, j) to pixels
    [16i:16i+16, 16j:16j+16] (channel c, row r, column s = output channel c*256 + 16r + s)."""
    torch.manual_seed(0)
    dec = svg.Decoder(12, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=0, attn_resolutions=(), image_size=32,
                      patch_skip=True).eval()
    assert "patch_skip.weight" not in svg.Decoder(12, ch=32, num_res_blocks=0, image_size=32).state_dict()
    z = torch.randn(2, 12, 2, 3)
    shortcut = dec(z) - dec.conv_out(dec.trunk(z))  # [2, 3, 32, 48]
    W, b = dec.patch_skip.weight[:, :, 0, 0], dec.patch_skip.bias  # [768, 12], [768]
    for i, j in [(0, 0), (1, 2), (0, 1)]:
        patch = (W @ z[:, :, i, j].T + b[:, None]).T.reshape(2, 3, 16, 16)
        torch.testing.assert_close(shortcut[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16], patch, atol=1e-5, rtol=1e-5)


def test_attn_block_equals_explicit_softmax():
    blk = svg.AttnBlock(32).eval()
    x = torch.randn(2, 32, 3, 5)
    h = blk.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (blk.q, blk.k, blk.v))  # [B, C, HW]
    w = torch.softmax(q.transpose(1, 2) @ k * 32 ** -0.5, dim=-1)  # [B, HW(q), HW(k)]
    ref = x + blk.proj_out((v @ w.transpose(1, 2)).reshape(2, 32, 3, 5))
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


def test_residual_encoder_torchvision_layout_and_shapes():
    with torch.device("meta"):
        res = svg.ResidualEncoder()  # official: 6 layers, width 384, 8 heads, MLP 1536
        shapes = {k: tuple(v.shape) for k, v in res.state_dict().items()}
    assert shapes["class_token"] == (1, 1, 384) and shapes["conv_proj.weight"] == (384, 3, 16, 16)
    assert shapes["encoder.pos_embedding"] == (1, 257, 384)
    assert shapes["encoder.layers.encoder_layer_5.self_attention.in_proj_weight"] == (1152, 384)
    assert shapes["encoder.layers.encoder_layer_5.mlp.3.weight"] == (384, 1536)
    assert shapes["encoder.ln.weight"] == (384,) and shapes["heads.0.weight"] == (384, 384)
    assert shapes["heads.2.weight"] == (8, 384)
    assert sum(p.numel() for p in res.parameters()) == 11_192_840


def test_residual_encoder_other_sizes_interpolate_pos_embedding():
    res = svg.ResidualEncoder(image_size=32, depth=1, width=64, heads=2, mlp_dim=64, dropout=0.0).eval()
    assert res(torch.randn(2, 3, 32, 48)).shape == (2, 8, 2, 3)
    # At the training size the grid is untouched: equal to an explicit run with the stored embedding.
    x = torch.randn(1, 3, 32, 32)
    tok = torch.cat([res.class_token, res.conv_proj(x).flatten(2).transpose(1, 2)], 1)
    ref = res.heads(res.encoder.ln(res.encoder.layers(tok + res.encoder.pos_embedding))[:, 1:])
    torch.testing.assert_close(res(x), ref.transpose(1, 2).reshape(1, 8, 2, 2))


# ---- Eq. (6) alignment --------------------------------------------------------------------------------

def test_align_batch_matches_official_statistics():
    f_r, f_d = 3 * torch.randn(4, 8, 5, 6) + 2, 0.4 * torch.randn(4, 16, 5, 6) - 0.1
    out = svg.align_residual(f_r, f_d)
    mu_r, sd_r = official_stats(f_r.flatten(2))
    mu_d, sd_d = official_stats(f_d.flatten(2))
    torch.testing.assert_close(out, (f_r - mu_r) / (sd_r + 1e-6) * sd_d + mu_d)
    mu_o, sd_o = official_stats(out.flatten(2))  # after alignment F_R-hat has DINO's scalar statistics
    torch.testing.assert_close(mu_o, mu_d, atol=1e-5, rtol=0)
    torch.testing.assert_close(sd_o, sd_d, atol=1e-5, rtol=0)


def test_align_per_image_is_independent_of_the_batch():
    f_r, f_d = torch.randn(3, 8, 4, 4) * torch.tensor([1.0, 5, 9]).view(3, 1, 1, 1), torch.randn(3, 16, 4, 4)
    out = svg.align_residual(f_r, f_d, per_image=True)
    for i in range(3):
        one = svg.align_residual(f_r[i:i + 1], f_d[i:i + 1])  # batch mode on one image = per-image stats
        torch.testing.assert_close(out[i:i + 1], one)
        _, sd = official_stats(out[i:i + 1].flatten(2))
        torch.testing.assert_close(sd, official_stats(f_d[i:i + 1].flatten(2))[1], atol=1e-5, rtol=0)
    assert not torch.allclose(out, svg.align_residual(f_r, f_d))


@pytest.mark.parametrize("per_image", [False, True])
def test_align_gradient_flows_only_through_the_affine_map(per_image):
    f_r = torch.randn(2, 8, 3, 3, requires_grad=True)
    f_d = torch.randn(2, 16, 3, 3, requires_grad=True)
    w = torch.randn(2, 8, 3, 3)
    (svg.align_residual(f_r, f_d, per_image=per_image) * w).sum().backward()
    dims = (2, 3) if per_image else (0, 2, 3)
    scale = f_d.std(dim=dims).mean(-1) / (f_r.std(dim=dims).mean(-1) + 1e-6)  # sigma(F_D) / sigma(F_R)
    torch.testing.assert_close(f_r.grad, w * scale.detach().reshape(-1, 1, 1, 1))
    assert f_d.grad is None  # DINO statistics are detached


# ---- SVGAutoencoder -----------------------------------------------------------------------------------

def test_encode_layout_dino_first_and_imagenet_normalised():
    ae = svg.SVGAutoencoder(TINY).eval()
    ae.align_stats = "batch"  # official per-batch Eq. (6); frozen statistics: test_frozen_alignment.py
    x = images()
    z = ae.encode(x)
    assert z.shape == (2, ae.feature_dim, 4, 4) and ae.feature_dim == 128 + svg.RESIDUAL_DIM
    mean, std = torch.tensor(svg.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(svg.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f_d = ae.dino.forward_features(((x + 1) / 2 - mean) / std)["x_norm_patchtokens"]  # [B, hw, C]
    torch.testing.assert_close(z[:, :128], f_d.transpose(1, 2).reshape(2, 128, 4, 4))
    _, sd_r = official_stats(z[:, 128:].flatten(2))  # residual channels aligned to DINO (batch stats)
    torch.testing.assert_close(sd_r, official_stats(z[:, :128].flatten(2))[1], atol=1e-5, rtol=0)
    assert ae.decode(z).shape == (2, 3, 64, 64)


def test_encode_per_image_alignment_gives_batch_independent_features():
    ae = svg.SVGAutoencoder(dataclasses.replace(TINY, align="image")).eval()
    x = images(3)
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(z[1:2], ae.encode(x[1:2]), atol=1e-5, rtol=1e-5)


def test_dino_stays_frozen_and_eval_while_training():
    ae = svg.SVGAutoencoder(TINY).train()
    assert ae.training and ae.residual.training and not ae.dino.training
    ae.decode(ae.encode(images(2, 32, 32))).square().mean().backward()
    assert all(p.grad is None for p in ae.dino.parameters())
    trainable = ae.trainable_parameters()
    assert sum(p.numel() for p in trainable) == (sum(p.numel() for p in ae.residual.parameters())
                                                 + sum(p.numel() for p in ae.decoder.parameters()) + 8)
    assert any(p is ae.mask_token for p in trainable)
    assert all(p.grad is not None for p in ae.residual.parameters())


def test_mask_augmentation_only_in_training():
    ae = svg.SVGAutoencoder(dataclasses.replace(TINY, mask_prob=1.0, align="none"))
    x = images()
    with torch.no_grad():
        z_train = ae.train().encode(x)
        z_eval = ae.eval().encode(x)
    torch.testing.assert_close(z_train[:, 128:], ae.mask_token.expand(2, 8, 4, 4))  # whole F_R replaced
    x_in = ((x + 1) / 2 - ae.imagenet_mean) / ae.imagenet_std
    torch.testing.assert_close(z_eval[:, 128:], ae.residual(x_in))  # align "none": naive concat
    assert not hasattr(svg.SVGAutoencoder(dataclasses.replace(TINY, mask_prob=0.0)), "mask_token")


def test_dino_only_and_intermediate_layer():
    ae = svg.SVGAutoencoder(dataclasses.replace(TINY, use_residual=False, dino_layer=0)).eval()
    assert ae.residual is None and ae.feature_dim == 128
    x = images(1)
    with torch.no_grad():
        x_in = ((x + 1) / 2 - ae.imagenet_mean) / ae.imagenet_std
        ref = ae.dino.get_intermediate_layers(x_in, n=[0], reshape=True)[0]
        torch.testing.assert_close(ae.encode(x), ref)
    assert [n for n, _ in ae.named_parameters() if not n.startswith(("dino.", "decoder."))] == []


def test_presets():
    paper, tiny = svg.AE_PRESETS["paper"], svg.AE_PRESETS["tiny"]
    assert (paper.dino_arch, paper.image_size, paper.mask_prob, paper.align) == ("dinov3_vits16plus", 256, 0.1, "batch")
    assert (paper.residual_depth, paper.residual_width, paper.residual_heads, paper.residual_mlp) == (6, 384, 8, 1536)
    assert tiny.dino_arch == "dinov3_vits16plus" and (tiny.image_size, tiny.dino_layer) == (64, 0)
    assert tiny.decoder_patch_skip and not paper.decoder_patch_skip  # the shortcut is the tiny tier's only
    assert svg.AEConfig(**dataclasses.asdict(paper)) == paper


def test_tiny_preset_block_0_is_the_last_block_of_a_random_dino():
    # The tiny tier reads DINO block 0 (AE_PRESETS comment): with random weights the 12 blocks are the
    # identity to ~1e-5 (LayerScale 1e-5), so it equals the paper's last-block features at 1/12 the cost,
    # and they differ between images (not degenerate).
    torch.manual_seed(0)
    ae = svg.SVGAutoencoder(svg.AE_PRESETS["tiny"]).eval()
    x = torch.stack([svg.SyntheticImages(4, 32)[i][0] for i in range(4)])  # [4, 3, 32, 32]
    x = ((x + 1) / 2 - ae.imagenet_mean) / ae.imagenet_std
    first, last = (ae.dino.get_intermediate_layers(x, n=[k], reshape=True)[0] for k in (0, 11))
    assert ((first - last).norm() / last.norm()).item() < 1e-4
    between = (first - first.mean(0, keepdim=True)).pow(2).mean() / first.var(unbiased=False)
    assert between > 0.5  # most of the variance is between images


def test_bad_inputs_have_clear_errors():
    ae = svg.SVGAutoencoder(TINY).eval()
    with pytest.raises(ValueError, match=r"encode input must be \[B, 3, H, W\].*got shape \(2, 4, 64, 64\)"):
        ae.encode(torch.zeros(2, 4, 64, 64))
    with pytest.raises(ValueError, match="encode input size 64x40 is not a multiple of 16"):
        ae.encode(torch.zeros(1, 3, 64, 40))
    with pytest.raises(ValueError, match=r"decode expects z of shape \[B, 136, h, w\].*got \(1, 128, 4, 4\)"):
        ae.decode(torch.zeros(1, 128, 4, 4))
    with pytest.raises(ValueError, match="align must be 'batch', 'image' or 'none'"):
        svg.AEConfig(align="layer")
    with pytest.raises(ValueError, match=r"dino_layer 12 out of range: dinov3_vits16plus has blocks 0..11"):
        svg.AEConfig(dino_layer=12)


def test_decode_384_vs_392_message():
    with torch.device("meta"):  # the check runs before any compute
        ae = svg.SVGAutoencoder(svg.AE_PRESETS["tiny"])  # ViT-S/16+: 392 channels
    with pytest.raises(ValueError, match=r"384 = DINO-only features, 392 = DINO \+ 8 residual"):
        ae.decode(torch.zeros(1, 384, 4, 4, device="meta"))


# ---- checkpoints --------------------------------------------------------------------------------------

def randomised(ae):
    with torch.no_grad():  # non-default values everywhere (LN, biases, tokens)
        for p in ae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ae.eval()


def test_native_checkpoint_round_trip(tmp_path):
    ae = randomised(svg.SVGAutoencoder(TINY))
    ae.train().encode(images())  # running Eq. (6) statistics, as one stage-1 step keeps them
    ae.eval()
    torch.save({"ae_config": dataclasses.asdict(TINY), "ae": ae.state_dict(), "step": 3}, tmp_path / "ae.pt")
    loaded = svg.load_autoencoder(tmp_path / "ae.pt")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = images()
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(loaded.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(z), ae.decode(z), atol=1e-5, rtol=1e-5)


def official_checkpoint(ae):
    """ae's weights renamed to the official Lightning .ckpt layout (reference/svg_official.md 5)."""
    sd = {}
    for k, v in ae.state_dict().items():
        k = k.replace("dino.", "encoder.", 1).replace("residual.", "extra_vit.", 1)
        sd[k] = v.reshape(1, 8, 1) if k == "mask_token" else v
    sd["encoder.rope_embed.periods"] = sd["encoder.rope_embed.periods"].to(torch.bfloat16)
    sd.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
               "norm_vit.weight": torch.ones(40), "norm_vit.bias": torch.zeros(40)})
    return {"epoch": 40, "global_step": 100_000, "state_dict": sd}


def test_official_checkpoint_import(tmp_path, monkeypatch):
    ae = randomised(svg.SVGAutoencoder(TINY))
    ae.align_stats = "batch"
    torch.save(official_checkpoint(ae), tmp_path / "epoch=000040.ckpt")
    monkeypatch.setitem(svg.AE_PRESETS, "paper", TINY)  # load_autoencoder assumes the paper config
    loaded = svg.load_autoencoder(tmp_path / "epoch=000040.ckpt")
    direct = svg.import_official_autoencoder(torch.load(tmp_path / "epoch=000040.ckpt", weights_only=False), TINY)
    x = images()
    with torch.no_grad():
        z = ae.eval().encode(x)  # official per-batch Eq. (6): the official file has no frozen statistics
        for m in (loaded, direct):
            m.align_stats = "batch"
            torch.testing.assert_close(m.encode(x), z, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.decode(z), ae.decode(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.mask_token, ae.mask_token)
    ckpt = official_checkpoint(ae)
    del ckpt["state_dict"]["mask_token"]  # official runs with mask_ratio -1 have no token
    assert not hasattr(svg.load_autoencoder(ckpt), "mask_token")


def test_official_checkpoint_errors_name_keys():
    ckpt = official_checkpoint(svg.SVGAutoencoder(TINY))
    del ckpt["state_dict"]["decoder.conv_out.weight"]
    ckpt["state_dict"]["extra_vit.heads.4.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['decoder.conv_out.weight'\]; unexpected keys "
                                         r"\(1\): \['residual.heads.4.weight'\]"):
        svg.import_official_autoencoder(ckpt, TINY)
    with pytest.raises(ValueError, match=r"pass arch='dinov3_tiny'"):
        svg.import_official_autoencoder(official_checkpoint(svg.SVGAutoencoder(TINY)))  # paper cfg: S/16+


def test_dino_weights_replace_or_supply_dino(tmp_path):
    ae = randomised(svg.SVGAutoencoder(TINY))
    dino = svg.DinoV3("dinov3_tiny")
    torch.save(dino.state_dict(), tmp_path / "dino.pth")
    sd = {k: v for k, v in ae.state_dict().items() if not k.startswith("dino.")}
    ckpt = {"ae_config": dataclasses.asdict(TINY), "ae": sd}
    with pytest.raises(ValueError, match=r"no DINO weights \(dino.\*\): pass dino_weights="):
        svg.load_autoencoder(ckpt)
    loaded = svg.load_autoencoder(ckpt, dino_weights=tmp_path / "dino.pth")
    torch.testing.assert_close(loaded.dino.blocks[1].mlp.w3.weight, dino.blocks[1].mlp.w3.weight)


def test_load_autoencoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*missing.pt' not found: pass a stage-1 checkpoint"):
        svg.load_autoencoder(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"unrecognised autoencoder checkpoint \(top-level keys "
                                         r"\['model', 'ema'\]"):
        svg.load_autoencoder({"model": {}, "ema": {}})
    sd = svg.SVGAutoencoder(TINY).state_dict()
    sd["decoder.conv_in.weight"] = sd["decoder.conv_in.weight"][:, :128]
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): \['decoder.conv_in.weight: file \(128, 128, 3, 3\) vs model \(128, 136, 3, 3\)"):
        svg.load_autoencoder({"ae_config": dataclasses.asdict(TINY), "ae": sd})
