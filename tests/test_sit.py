"""Stage 2 model math: SiT / DiT with QK-Norm, flow matching (Eq. 3-5), feature statistics,
official SVG-XL import. Each test compares against an independent formula."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import svg

# A small config in the official layout: C channels, 4x4 grid, 10 classes.
SMALL = svg.SiTConfig(in_channels=12, input_size=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def small_model(**kw):
    return svg.SiT(svg.SiTConfig(**{**svg.asdict(SMALL), **kw}))


def randomize(model, std=0.2):
    """Non-zero weights everywhere (the DiT init zeroes the adaLN and output layers)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("name", list(svg.SIT_PRESETS))
def test_every_preset_maps_features_to_velocity_of_same_shape(name):
    cfg = svg.SIT_PRESETS[name]
    with torch.device("meta"):
        model = svg.SiT(cfg)
        x = torch.empty(2, cfg.in_channels, cfg.input_size, cfg.input_size)
        v = model(x, torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == x.shape
    assert len(model.blocks) == cfg.depth and model.blocks[0].attn.num_heads == cfg.num_heads


def test_table5_sizes():
    sizes = {n: (c.depth, c.hidden_size, c.num_heads) for n, c in svg.SIT_PRESETS.items()}
    assert sizes["SiT-B"] == (12, 768, 12) and sizes["SiT-L"] == (24, 1024, 16)
    assert sizes["SiT-XL"] == (28, 1152, 16) and sizes["SiT-S"] == (12, 384, 6)


def test_svg_xl_parameter_count_matches_official_676M():
    with torch.device("meta"):
        model = svg.SiT(svg.SIT_PRESETS["SiT-XL"])
    ours = sum(p.numel() for p in model.parameters())
    dead_half = 392 * 1152 + 392  # official learn_sigma outputs 392..783 of final_layer.linear
    pos_embed = 256 * 1152  # official frozen nn.Parameter; here a non-persistent buffer
    print(f"SVG-XL parameters: {ours:,} (official file {ours + dead_half + pos_embed:,})")
    assert ours == 675_691_016
    assert ours + dead_half + pos_embed == 676_437_904


def test_qk_norm_is_layernorm_on_head_dim_and_makes_attention_scale_invariant():
    model = randomize(small_model()).eval()
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, torch.nn.LayerNorm) and attn.q_norm.normalized_shape == (8,)
    assert attn.k_norm.eps == 1e-5 and attn.k_norm.elementwise_affine
    x = torch.randn(3, 16, 32)
    before = attn(x)
    with torch.no_grad():  # scale the q and k projections: LayerNorm removes the scale
        attn.qkv.weight[:64] *= 7.0
        attn.qkv.bias[:64] *= 7.0
    torch.testing.assert_close(attn(x), before, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # ... but not a scale of v
        attn.qkv.weight[64:] *= 2.0
        attn.qkv.bias[64:] *= 2.0
    assert not torch.allclose(attn(x), before, atol=1e-3)


def test_adaln_zero_init_makes_blocks_identity_and_output_zero():
    model = small_model()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    v = model(torch.randn(2, 12, 4, 4), torch.rand(2), torch.tensor([1, 2]))
    assert torch.equal(v, torch.zeros_like(v))
    # Linears are xavier (non-zero), label table and t-MLP N(0, 0.02).
    assert model.blocks[0].attn.qkv.weight.abs().max() > 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005


def mae_pos_embed(dim, size):
    """MAE / DiT get_2d_sincos_pos_embed, re-derived in numpy (w-first meshgrid)."""
    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, size, size)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,size", [(1152, 16), (128, 32), (32, 4)])
def test_pos_embed_is_the_mae_layout(dim, size):
    ours = svg.sincos_pos_embed_2d(dim, size, size)
    assert ours.shape == (size * size, dim)
    np.testing.assert_allclose(ours.numpy(), mae_pos_embed(dim, size), atol=1e-6)


def test_timestep_embedding_feeds_t_directly_as_cos_then_sin():
    emb = svg.TimestepEmbedder(32)
    seen = {}
    emb.mlp[0].register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    t = torch.tensor([0.0, 0.25, 1.0])
    emb(t)
    freqs = torch.exp(-math.log(10_000) * torch.arange(128) / 128)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(seen["x"], expected)


def test_label_dropout_uses_null_class_in_training_only():
    model = small_model(class_dropout_prob=1.0)
    table = model.y_embedder.embedding_table.weight
    y = torch.tensor([3, 4])
    model.train()
    assert torch.equal(model.y_embedder(y), table[[10, 10]])
    model.eval()
    assert torch.equal(model.y_embedder(y), table[[3, 4]])
    assert torch.equal(model.y_embedder(y, torch.tensor([False, True])), table[[3, 10]])


def test_wrong_feature_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects features \[B, 12, 4, 4\].*autoencoder"):
        small_model()(torch.randn(1, 8, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    plain = randomize(small_model())
    ckpt = small_model(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 12, 4, 4), torch.rand(2), torch.tensor([0, 1])
    drop = torch.tensor([False, True])
    for m in (plain, ckpt):
        m(x, t, y, drop).square().sum().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


# ---------------------------------------------------------------- flow matching


def test_time_shift_matches_the_official_reversed_shift():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(1 - svg.time_shift(1 - u, 0.4), svg.time_shift(u, svg.TRAIN_TIME_SHIFT))
    torch.testing.assert_close(1 - svg.time_shift(1 - u, 0.15), svg.time_shift(u, svg.SAMPLE_TIME_SHIFT))


def test_training_time_distribution_is_the_shifted_uniform():
    g = torch.Generator().manual_seed(0)
    t = svg.sample_training_time(200_000, 2.5, generator=g).double()
    a = 2.5
    for s in (0.1, 0.3, 0.5, 0.7, 0.9):  # P(t <= s) = u(s), the inverse shift
        assert abs((t <= s).double().mean().item() - s / (a - (a - 1) * s)) < 0.005
    assert 0 <= t.min() and t.max() <= 1


def test_flow_matching_loss_on_analytic_cases():
    x0, y = torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)
    eps, t = torch.randn(4, 3, 2, 2), torch.tensor([0.1, 0.4, 0.6, 0.9])

    def oracle(x_t, tt, yy):  # knows x0: v = (x_t - x0) / t = eps - x0 exactly (Eq. 3-4)
        return (x_t - x0) / tt.view(-1, 1, 1, 1)

    assert svg.flow_matching_loss(oracle, x0, y, t=t, eps=eps).item() < 1e-10
    zero = svg.flow_matching_loss(lambda x_t, tt, yy: torch.zeros_like(x_t), x0, y, t=t, eps=eps)
    torch.testing.assert_close(zero, ((eps - x0) ** 2).mean())
    # identity model: v_pred = x_t = (1 - t) x0 + t eps
    ident = svg.flow_matching_loss(lambda x_t, tt, yy: x_t, x0, y, t=t, eps=eps)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(ident, (((1 - tt) * x0 + tt * eps - (eps - x0)) ** 2).mean())


def test_x0_loss_weight_is_the_x0_error_over_1_plus_t_squared():
    """weight "x0": lambda(t) = t^2 / (1 + t^2) on the velocity error, i.e. the x_0 error / (1 + t^2)."""
    x0, y = torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)
    eps, t = torch.randn(4, 3, 2, 2), torch.tensor([0.05, 0.3, 0.6, 1.0])
    x0_hat = torch.randn(4, 3, 2, 2)  # a fixed wrong guess, read through Eq. (3) as a velocity

    def guess(x_t, tt, yy):
        return (x_t - x0_hat) / tt.view(-1, 1, 1, 1)

    tt = t.view(-1, 1, 1, 1)
    err = (x0_hat - x0) ** 2
    torch.testing.assert_close(svg.flow_matching_loss(guess, x0, y, t=t, eps=eps, weight="x0"),
                               (err / (1 + tt**2)).mean())
    torch.testing.assert_close(svg.flow_matching_loss(guess, x0, y, t=t, eps=eps), (err / tt**2).mean())
    with pytest.raises(ValueError, match="loss weight must be one of"):
        svg.flow_matching_loss(guess, x0, y, t=t, eps=eps, weight="snr")


def test_x_prediction_returns_the_velocity_of_its_x0():
    """prediction "x" (JiT): the network's output is read as x_0 and turned into v = (x_t - x_0) / max(t, 0.05)."""
    torch.manual_seed(0)
    v_model = randomize(small_model()).eval()
    x_model = small_model(prediction="x").eval()
    x_model.load_state_dict(v_model.state_dict())
    x_t, t, y = torch.randn(3, 12, 4, 4), torch.tensor([0.01, 0.3, 0.9]), torch.tensor([1, 2, 3])
    x0_hat = v_model(x_t, t, y)  # the same network's raw output
    torch.testing.assert_close(x_model(x_t, t, y), (x_t - x0_hat) / torch.tensor([0.05, 0.3, 0.9]).view(3, 1, 1, 1))
    # Analytic: a fresh x-model outputs x_0 = 0 (zero output layer), so on data x_0 = 0 its velocity
    # x_t / t = eps is exact for t >= 0.05 and the loss vanishes; a fresh v-model (v = 0) scores E eps^2.
    x0, eps, tt = torch.zeros(4, 12, 4, 4), torch.randn(4, 12, 4, 4), torch.tensor([0.05, 0.2, 0.7, 1.0])
    yy = torch.zeros(4, dtype=torch.long)
    assert svg.flow_matching_loss(small_model(prediction="x"), x0, yy, t=tt, eps=eps).item() < 1e-10
    torch.testing.assert_close(svg.flow_matching_loss(small_model(), x0, yy, t=tt, eps=eps), (eps**2).mean())
    with pytest.raises(ValueError, match="prediction must be 'v' or 'x'"):
        small_model(prediction="eps")
    with pytest.raises(ValueError, match="official reversed-time"):
        small_model(prediction="x", reversed_time=True)


def test_linear_model_reaches_the_known_optimum():
    """For x0 = mu (a point mass) the optimal v is (x_t - mu) / t; a per-time linear model with
    that form, fit by SGD on the loss, recovers mu."""
    mu = torch.tensor([1.5, -2.0, 0.5]).view(1, 3, 1, 1)
    guess = torch.zeros(1, 3, 1, 1, requires_grad=True)
    opt = torch.optim.SGD([guess], lr=0.5)
    for _ in range(200):
        x0 = mu.expand(64, 3, 1, 1)
        loss = svg.flow_matching_loss(
            lambda x_t, t, y: (x_t - guess) / t.view(-1, 1, 1, 1), x0, torch.zeros(64, dtype=torch.long),
            t=torch.rand(64) * 0.8 + 0.2,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(guess.detach(), mu, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- feature statistics


def test_streaming_stats_are_exact_on_a_known_distribution_and_merge_like_ddp():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([1000.0, -3.0, 0.0, 3.54])
    stds = torch.tensor([1.0, 0.1, 2.0, 1.55])
    data = torch.randn(37, 4, 3, 5, generator=g) * stds.view(1, -1, 1, 1) + means.view(1, -1, 1, 1)
    ref = data.double().transpose(0, 1).reshape(4, -1).numpy()
    acc = svg.FeatureStatsAccumulator(4)
    for chunk in data.split([5, 13, 1, 18]):  # uneven batches
        acc.update(chunk)
    stats = acc.result()
    np.testing.assert_allclose(stats["mean"].numpy(), ref.mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"].numpy(), ref.std(1), rtol=1e-5)
    # Two ranks each see half; all_reduce sums their moments: identical to one pass.
    left, right = svg.FeatureStatsAccumulator(4), svg.FeatureStatsAccumulator(4)
    left.update(data[:20])
    right.update(data[20:])
    merged = svg.FeatureStatsAccumulator(4)
    merged.moments = left.moments + right.moments
    assert torch.equal(merged.result()["mean"], stats["mean"])
    torch.testing.assert_close(merged.result()["std"], stats["std"], rtol=1e-7, atol=0)


def test_normalize_roundtrip_and_unit_statistics():
    data = torch.randn(64, 5, 4, 4) * 3 + 7
    acc = svg.FeatureStatsAccumulator(5)
    acc.update(data)
    stats = acc.result()
    z = svg.normalize_features(data, stats)
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-3
    torch.testing.assert_close(svg.denormalize_features(z, stats), data, atol=1e-4, rtol=1e-5)


def test_stats_channel_mismatch_explains_dino_only_vs_svg():
    stats = {"mean": torch.zeros(384), "std": torch.ones(384)}
    with pytest.raises(ValueError, match=r"384 channels are DINO-only.*392 are SVG"):
        svg.normalize_features(torch.randn(1, 392, 2, 2), stats)
    with pytest.raises(ValueError, match="have 10 channels, the statistics were set up for 392"):
        svg.FeatureStatsAccumulator(392).update(torch.randn(1, 10, 2, 2))
    with pytest.raises(ValueError, match="non-positive std"):
        svg.check_feature_stats({"mean": torch.zeros(3), "std": torch.tensor([1.0, 0.0, 1.0])}, 3)


def test_loads_the_official_stats_file_format(tmp_path):
    mean, std = torch.randn(1, 1, 392), torch.rand(1, 1, 392) + 0.1
    torch.save({"dinov3_sp_mean": mean, "dinov3_sp_std": std}, tmp_path / "dinov3_sp_stats.pt")
    stats = svg.load_feature_stats(str(tmp_path / "dinov3_sp_stats.pt"), channels=392)
    assert torch.equal(stats["mean"], mean.reshape(-1)) and torch.equal(stats["std"], std.reshape(-1))
    with pytest.raises(ValueError, match="384 channels are DINO-only"):
        svg.load_feature_stats(str(tmp_path / "dinov3_sp_stats.pt"), channels=384)
    torch.save({"foo": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a feature-stats file"):
        svg.load_feature_stats(str(tmp_path / "bad.pt"))


# ---------------------------------------------------------------- official checkpoint import


def official_state_dict(C=12, grid=4, D=32, depth=2, heads=4, classes=10, seed=0):
    """Random weights in the released {"ema": ...} layout (learn_sigma: 2C outputs)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {
        "pos_embed": torch.from_numpy(mae_pos_embed(D, grid)).float()[None],
        "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(classes + 1, D),
        "ln1.weight": r(D, C), "ln1.bias": r(D),
        "final_layer.linear.weight": r(2 * C, D), "final_layer.linear.bias": r(2 * C),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "attn.qkv.weight": r(3 * D, D), p + "attn.qkv.bias": r(3 * D),
            p + "attn.q_norm.weight": 1 + r(D // heads), p + "attn.q_norm.bias": r(D // heads),
            p + "attn.k_norm.weight": 1 + r(D // heads), p + "attn.k_norm.bias": r(D // heads),
            p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
            p + "mlp.fc1.weight": r(4 * D, D), p + "mlp.fc1.bias": r(4 * D),
            p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D),
            p + "adaLN_modulation.1.weight": r(6 * D, D), p + "adaLN_modulation.1.bias": r(6 * D),
        })
    return sd


def official_forward(sd, z, s, y, heads):
    """The official DiT forward written out from its description: z [B, C, N] tokens-last
    features, s in [0, 1] with s = 1 data, returns the 2C-channel output [B, 2C, h, w]."""
    B, C, h, w = z.shape
    lin = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    ln = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)  # noqa: E731
    x = lin(z.reshape(B, C, h * w).permute(0, 2, 1), "ln1") + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = s[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    D = x.shape[-1]
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        mod = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        hmod = ln(x) * (1 + mod[1][:, None]) + mod[0][:, None]
        qkv = lin(hmod, p + "attn.qkv").reshape(B, h * w, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = F.layer_norm(q, (D // heads,), sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"], eps=1e-5)
        k = F.layer_norm(k, (D // heads,), sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"], eps=1e-5)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v
        x = x + mod[2][:, None] * lin(att.transpose(1, 2).reshape(B, h * w, D), p + "attn.proj")
        hmod = ln(x) * (1 + mod[4][:, None]) + mod[3][:, None]
        x = x + mod[5][:, None] * lin(F.gelu(lin(hmod, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(ln(x) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")  # [B, N, 2C]
    return out.permute(0, 2, 1).reshape(B, 2 * C, h, w)


def test_import_official_sit_matches_the_official_formula_in_our_time_convention():
    sd = official_state_dict()
    model = svg.import_official_sit(sd)
    assert model.cfg == svg.SiTConfig(in_channels=12, input_size=4, hidden_size=32, depth=2, num_heads=4,
                                      num_classes=10, reversed_time=True)
    assert not model.training
    x_t, t, y = torch.randn(3, 12, 4, 4), torch.tensor([0.05, 0.5, 0.93]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        ours = model(x_t, t, y)
        # Official: z_s = (1 - s) eps + s x0 is our x_t at s = 1 - t; it predicts x0 - eps = -v.
        official = official_forward(sd, x_t, 1 - t, y, heads=4)[:, :12]
    torch.testing.assert_close(ours, -official, atol=1e-5, rtol=1e-4)
    # Passing the preset-style config gives the same model; a wrong one is refused.
    svg.import_official_sit(sd, svg.SiTConfig(in_channels=12, input_size=4, hidden_size=32, depth=2,
                                              num_heads=4, num_classes=10))
    with pytest.raises(ValueError, match="does not match"):
        svg.import_official_sit(sd, svg.SIT_PRESETS["SiT-XL"])


def test_import_official_rejects_a_foreign_layout():
    sd = official_state_dict()
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    with pytest.raises(ValueError, match="pos_embed differs"):
        svg.import_official_sit(sd)
    with pytest.raises(KeyError, match="ln1.weight"):
        svg.import_official_sit({"x_embedder.weight": torch.zeros(1)})


def test_official_xl_layout_is_what_the_release_stores():
    with torch.device("meta"):
        cfg = svg.official_sit_config({
            "ln1.weight": torch.empty(1152, 392), "pos_embed": torch.empty(1, 256, 1152),
            "y_embedder.embedding_table.weight": torch.empty(1001, 1152),
            "blocks.0.attn.q_norm.weight": torch.empty(72), "blocks.0.mlp.fc1.weight": torch.empty(4608, 1152),
            **{f"blocks.{i}.attn.qkv.weight": None for i in range(28)},
        })
    assert cfg == svg.SiTConfig(**{**svg.asdict(svg.SIT_PRESETS["SiT-XL"]), "reversed_time": True})
