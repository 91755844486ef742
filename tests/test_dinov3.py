"""DINOv3 ViT: Meta's key layout, parity with Hugging Face transformers, loaders and errors."""

import sys

import pytest
import torch

import svg

transformers = pytest.importorskip("transformers")  # dev dependency: the independent reference

# Meta's released periods for ViT-S/16+ (bf16-rounded 100**(k/16)), from reference/dinov3.md section 2.
RELEASED_PERIODS = [1.0, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5, 10.0, 13.3125,
                    17.75, 23.75, 31.625, 42.25, 56.25, 75.0]


def official_vits16plus_shapes():
    """The published key/shape table of dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth (212 keys)."""
    C, Hd = 384, 1536
    shapes = {"cls_token": (1, 1, C), "storage_tokens": (1, 4, C), "mask_token": (1, C),
              "patch_embed.proj.weight": (C, 3, 16, 16), "patch_embed.proj.bias": (C,),
              "rope_embed.periods": (16,), "norm.weight": (C,), "norm.bias": (C,)}
    for n in range(12):
        b = f"blocks.{n}."
        shapes.update({
            b + "norm1.weight": (C,), b + "norm1.bias": (C,),
            b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,), b + "attn.qkv.bias_mask": (3 * C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,), b + "ls1.gamma": (C,),
            b + "norm2.weight": (C,), b + "norm2.bias": (C,),
            b + "mlp.w1.weight": (Hd, C), b + "mlp.w1.bias": (Hd,), b + "mlp.w2.weight": (Hd, C),
            b + "mlp.w2.bias": (Hd,), b + "mlp.w3.weight": (C, Hd), b + "mlp.w3.bias": (C,), b + "ls2.gamma": (C,)})
    return shapes


def hf_config(hidden, layers, heads, inter, gated):
    return transformers.DINOv3ViTConfig(
        patch_size=16, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_register_tokens=4, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", layer_norm_eps=1e-5, rope_theta=100.0, query_bias=True,
        key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True)


def random_hf_model(cfg):
    """HF DINOv3ViTModel with every weight random (LN, layer scales, biases, tokens: no identity defaults)."""
    model = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "token" in name:
                p.copy_(0.5 * torch.randn_like(p))
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.add_(1.0)
            if "lambda1" in name:
                p.mul_(0.4)
    return model


def exact_periods(model):
    k = torch.arange(16, dtype=torch.float32)
    model.rope_embed.periods.copy_(100.0 ** (2 * k / 32))  # HF recomputes fp32 frequencies


def test_official_vits16plus_keys_and_shapes():
    with torch.device("meta"):  # shapes only, no init cost
        got = {k: tuple(v.shape) for k, v in svg.DinoV3("dinov3_vits16plus").state_dict().items()}
    assert got == official_vits16plus_shapes()
    assert len(got) == 212


def test_vits16_and_vitb16_use_gelu_mlp_keys():
    with torch.device("meta"):
        small, base = svg.DinoV3("dinov3_vits16"), svg.DinoV3("dinov3_vitb16")
    sd = small.state_dict()
    assert len(sd) == 188 and sd["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert base.state_dict()["blocks.11.mlp.fc1.weight"].shape == (3072, 768)
    assert base.state_dict()["rope_embed.periods"].shape == (16,)  # head_dim 64 in every arch
    assert sum(p.numel() for p in small.parameters()) == 21_601_152  # reference/dinov3.md section 1
    assert sum(p.numel() for p in base.parameters()) == 85_669_632


def test_fresh_periods_equal_released_bf16_values():
    assert svg.RopePositionEmbedding(head_dim=64).periods.tolist() == RELEASED_PERIODS


def test_hf_parity_vits16plus_nonsquare(tmp_path):
    hf = random_hf_model(hf_config(384, 12, 6, 1536, gated=True))
    hf.save_pretrained(tmp_path)  # the hub layout: model.safetensors with 'layer.N...' keys
    model = svg.load_dinov3(tmp_path / "model.safetensors", "dinov3_vits16plus")
    assert model.rope_embed.periods.tolist() == RELEASED_PERIODS  # HF files carry no periods
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    exact_periods(model)
    x = torch.randn(2, 3, 64, 48)  # 4 x 3 patch grid
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        out = model.forward_features(x)
        mid = model.get_intermediate_layers(x, n=[3], norm=False, return_class_token=True)[0]
    last = ref.last_hidden_state
    torch.testing.assert_close(out["x_norm_clstoken"], last[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["x_storage_tokens"], last[:, 1:5], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], last[:, 5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["x_prenorm"], ref.hidden_states[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(mid[0], ref.hidden_states[4][:, 5:], atol=1e-4, rtol=0)  # after block 3
    torch.testing.assert_close(mid[1], ref.hidden_states[4][:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["transformers5_state_dict", "pytorch_model_bin"])
def test_hf_layouts_load_the_same(tmp_path, layout):
    hf = random_hf_model(hf_config(128, 2, 2, 256, gated=True))
    sd = hf.state_dict()
    if layout == "transformers5_state_dict":
        assert any(k.startswith("model.layer.") for k in sd)  # 5.x in-memory names
        path = tmp_path / "model.safetensors"
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save({k.removeprefix("model."): v for k, v in sd.items()}, path)
    model = svg.load_dinov3(tmp_path if layout == "pytorch_model_bin" else path, "dinov3_tiny")
    exact_periods(model)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)["x_norm_patchtokens"],
                                   hf(pixel_values=x).last_hidden_state[:, 5:], atol=1e-4, rtol=0)


def test_hf_gelu_mlp_variant(tmp_path, monkeypatch):
    """ViT-S/16 and B/16 use fc1/fc2 (HF up_proj/down_proj); a narrow arch runs the same code path."""
    monkeypatch.setitem(svg.DINOV3_ARCHS, "gelu_tiny", dict(embed_dim=128, depth=2, num_heads=2, ffn="mlp",
                                                            ffn_hidden=256))
    hf = random_hf_model(hf_config(128, 2, 2, 256, gated=False))
    hf.save_pretrained(tmp_path)
    model = svg.load_dinov3(tmp_path / "model.safetensors", "gelu_tiny")
    exact_periods(model)
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)["x_norm_clstoken"],
                                   hf(pixel_values=x).pooler_output, atol=1e-4, rtol=0)


def test_official_pth_round_trip_with_bf16_periods(tmp_path):
    model = svg.DinoV3("dinov3_tiny").eval()
    sd = model.state_dict()
    sd["rope_embed.periods"] = sd["rope_embed.periods"].to(torch.bfloat16)  # as Meta's file stores it
    torch.save(sd, tmp_path / "w.pth")
    loaded = svg.load_dinov3(tmp_path / "w.pth", "dinov3_tiny")
    assert loaded.rope_embed.periods.dtype == torch.float32
    assert loaded.rope_embed.periods.tolist() == RELEASED_PERIODS
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x)["x_norm_patchtokens"],
                           model.forward_features(x)["x_norm_patchtokens"])


def test_get_intermediate_layers_matches_forward_features():
    model = svg.DinoV3("dinov3_tiny").eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        ff = model.forward_features(x)
        (patches, cls), = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
        both = model.get_intermediate_layers(x, n=2, norm=False)
    assert patches.shape == (2, 128, 2, 4)
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), ff["x_norm_patchtokens"])
    torch.testing.assert_close(cls, ff["x_norm_clstoken"])
    assert len(both) == 2
    torch.testing.assert_close(both[1], ff["x_prenorm"][:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[2])


def test_eval_mode_has_no_rope_augmentation():
    model = svg.DinoV3("dinov3_tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x))  # train mode: test_frozen_alignment.py


def test_input_not_multiple_of_16():
    with pytest.raises(ValueError, match=r"50x64 is not a multiple of 16.*resize or centre-crop"):
        svg.DinoV3("dinov3_tiny")(torch.randn(1, 3, 50, 64))


def test_wrong_arch_names_the_right_one(tmp_path):
    torch.save(svg.DinoV3("dinov3_tiny").state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"looks like a dinov3_tiny checkpoint; pass arch='dinov3_tiny'"):
        svg.load_dinov3(tmp_path / "w.pth", "dinov3_vits16plus")
    with pytest.raises(ValueError, match="unknown DINOv3 arch 'vit_huge'"):
        svg.load_dinov3(tmp_path / "w.pth", "vit_huge")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = svg.DinoV3("dinov3_tiny").state_dict()
    del sd["blocks.1.ls2.gamma"]
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w.pth as dinov3_tiny: missing keys \(1\): \['blocks.1.ls2.gamma'\]; "
                                         r"unexpected keys \(1\): \['head.weight'\]"):
        svg.load_dinov3(tmp_path / "w.pth", "dinov3_tiny")
    sd = svg.DinoV3("dinov3_tiny").state_dict()
    sd["norm.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): \['norm.bias: file \(7,\) vs model \(128,\)'\]"):
        svg.load_dinov3(tmp_path / "w.pth", "dinov3_tiny")


def test_missing_file_says_what_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dinov3_vits16plus_pretrain_lvd1689m-4057cbaa\.pth.*"
                                                r"facebook/dinov3-vits16plus-pretrain-lvd1689m"):
        svg.load_dinov3(tmp_path / "nope.pth")


def test_safetensors_missing_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        svg.load_dinov3(tmp_path / "model.safetensors", "dinov3_tiny")
