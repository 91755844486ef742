"""SVG: latent diffusion without a variational autoencoder, in plain PyTorch.

Paper: "Latent Diffusion Model without Variational Autoencoder" (SVG), ICLR 2026,
arXiv 2510.15301. This file holds every model and the core math, read bottom-up as the
paper's Fig. 3 and Sec. 3:

    building blocks -> DINOv3 ViT (frozen F_D) -> residual encoder (F_R) -> alignment
    (Eq. 6) -> LDM decoder -> SVG autoencoder -> LPIPS -> PatchGAN -> SiT with QK-Norm
    -> flow matching (Eq. 3-5) -> samplers -> presets -> data and script plumbing.

Designs reproduced (re-written from their published descriptions, no code copied):
DINOv3 (Simeoni et al. 2025), the LDM / VA-VAE conv decoder and PatchGAN loss
(Rombach et al. 2022, Yao et al. 2025, Esser et al. 2021), LPIPS v0.1 (Zhang et al.
2018), DiT / SiT (Peebles & Xie 2023, Ma et al. 2024), QK-Norm (Henry et al. 2020),
CFG-Zero* zero-init (Fan et al. 2025), the ADM centre crop (Dhariwal & Nichol 2021).

Conventions, stated once here and used everywhere:
- Images are float tensors in [-1, 1], shape [B, 3, H, W], H and W multiples of 16.
- SVG features are [B, C, h, w] with h = H/16, w = W/16 and C = 392 for DINOv3-S/16+:
  channels 0..383 are the frozen DINO features F_D, channels 384..391 the aligned
  residual features F_R-hat (Eq. 6). DINO channels always come first.
- Time follows the paper's Eq. (3): t = 0 is data, t = 1 is noise,
  x_t = (1 - t) x_0 + t eps, and the network predicts the velocity v = eps - x_0 (Eq. 4).
  Sampling integrates from t = 1 down to t = 0. (The official code runs time the other
  way; its checkpoints are converted on import so both are called the same way.)
- Time shift (SD3 style, in this convention): t' = a t / (1 + (a - 1) t) with a > 1
  moving mass toward the noise end. Training uses a = 2.5 (official shift 0.4 in its
  reversed convention, a = 1 / 0.4); sampling uses a = 1 / 0.15 (official 0.15).
- Diffusion runs on per-channel normalised features: z = (x - mean) / std with the
  dataset statistics stored in every stage-2 checkpoint.
- Class labels are 0..num_classes-1; the null class for classifier-free guidance is
  the extra embedding row `num_classes` (1000 on ImageNet).
- Classifier-free guidance acts on all feature channels.
"""

import contextlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import re

# Named constants (imported by the scripts, never retyped).
PATCH_SIZE = 16  # every encoder here is a /16 patch model (Sec. 3.3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv3 LVD-1689M input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIDUAL_DIM = 8  # residual channels added to DINO's 384 (Sec. 3.3)
NUM_CLASSES = 1000  # ImageNet-1K
TRAIN_TIME_SHIFT = 2.5  # official training shift 0.4 in reversed time = 1 / 0.4
SAMPLE_TIME_SHIFT = 1 / 0.15  # official sampling shift 0.15 in reversed time


# ----------------------------------------------------------------------------------
# Building blocks: attention, MLPs, RoPE
# ----------------------------------------------------------------------------------
def check_images(x, what="images"):
    """Raise a clear error unless x is [B, 3, H, W] with H, W multiples of PATCH_SIZE."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must be [B, 3, H, W] RGB tensors, got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % PATCH_SIZE or W % PATCH_SIZE:
        raise ValueError(
            f"{what} size {H}x{W} is not a multiple of {PATCH_SIZE} (the patch size): resize or "
            f"centre-crop to e.g. {max(PATCH_SIZE, H // PATCH_SIZE * PATCH_SIZE)}x"
            f"{max(PATCH_SIZE, W // PATCH_SIZE * PATCH_SIZE)} first")


def load_strict(module, state_dict, source):
    """load_state_dict(strict=True), but the error names a few offending keys and the source."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = [f"{name} ({len(keys)}): {keys[:4]}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes))
                if keys]
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)  # copies (and casts, e.g. bf16 -> fp32)


def rope_rotate_half(x):
    """Rotate-half (NeoX) pairing: dim i is rotated with dim i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x, sin, cos):
    return x * cos + rope_rotate_half(x) * sin


class RopePositionEmbedding(nn.Module):
    """DINOv3 2D axial RoPE: sin/cos tables for an h x w patch grid ('separate' coords)."""

    def __init__(self, head_dim, base=100.0):
        super().__init__()
        k = torch.arange(head_dim // 4, dtype=torch.float32)
        periods = base ** (2 * k / (head_dim // 2))  # 100**(k/16) for head_dim 64
        # The released checkpoints store periods in bf16; rounding here makes a fresh model
        # equal the released one. load_state_dict overwrites it from the file anyway.
        self.register_buffer("periods", periods.to(torch.bfloat16).float(), persistent=True)

    def forward(self, h, w):
        # No training-time augmentation (shift / jitter / coordinate rescale) exists here: the
        # official model applies a random rescale in train mode; DINO is frozen, so we never do.
        dev = self.periods.device
        coords_h = torch.arange(0.5, h, device=dev, dtype=torch.float32) / h
        coords_w = torch.arange(0.5, w, device=dev, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), -1)  # [h, w, 2]
        coords = 2.0 * coords.flatten(0, 1) - 1.0  # [hw, 2] (y, x) in (-1, 1)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # [hw, 2, D/4]
        angles = angles.flatten(1, 2).tile(2)  # [hw, D]: [y, x, y, x] blocks
        return torch.sin(angles), torch.cos(angles)


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose bias is multiplied by a stored mask (DINOv3's masked k bias)."""

    def __init__(self, dim):
        super().__init__(dim, 3 * dim)
        self.register_buffer("bias_mask", torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class SwiGLUFFN(nn.Module):
    """Gated FFN w3(silu(w1 x) * w2 x) of DINOv3 ViT-S/16+."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Mlp(nn.Module):
    """Two-layer transformer MLP fc1 -> GELU -> fc2 (ViT; approximate='tanh' for DiT/SiT)."""

    def __init__(self, dim, hidden, approximate="none"):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale x * gamma (CaiT / DINOv3)."""

    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class PatchEmbed(nn.Module):
    """Non-overlapping 16x16 patchify conv: [B, 3, H, W] -> [B, hw, C] (row-major)."""

    def __init__(self, dim, patch_size=PATCH_SIZE):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, hw, C]


# ----------------------------------------------------------------------------------
# DINOv3 ViT: the frozen semantic encoder F_D (Sec. 3.3, Fig. 3)
# ----------------------------------------------------------------------------------
DINOV3_ARCHS = {  # dinov3/hub/backbones.py; all: patch 16, 4 registers, RoPE base 100, LN eps 1e-5
    "dinov3_vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp", ffn_hidden=1536),
    "dinov3_vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn="swiglu", ffn_hidden=1536),
    "dinov3_vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp", ffn_hidden=3072),
    "dinov3_tiny": dict(embed_dim=128, depth=2, num_heads=2, ffn="swiglu", ffn_hidden=256),  # tests
}
DINOV3_FILES = {  # Meta's release names (access form linked from github.com/facebookresearch/dinov3)
    "dinov3_vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "dinov3_vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "dinov3_vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
}
DINOV3_NUM_REGISTERS = 4


class DinoAttention(nn.Module):
    """DINOv3 self-attention with RoPE on the patch tokens (the 5 prefix tokens are not rotated)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = LinearKMaskedBias(dim), nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, C = x.shape  # batch, tokens (1 + 4 + hw), channels
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, N, Dh]
        sin, cos = rope
        prefix = N - sin.shape[0]
        q, k = (torch.cat([t[:, :, :prefix], rope_apply(t[:, :, prefix:].float(), sin, cos).to(t.dtype)], 2)
                for t in (q, k))  # RoPE in fp32, cast back
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, Dh]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class DinoBlock(nn.Module):
    """Pre-norm DINOv3 transformer block with LayerScale."""

    def __init__(self, dim, num_heads, ffn, ffn_hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.attn = DinoAttention(dim, num_heads)
        self.mlp = SwiGLUFFN(dim, ffn_hidden) if ffn == "swiglu" else Mlp(dim, ffn_hidden)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3(nn.Module):
    """DINOv3 ViT (Simeoni et al. 2025): the frozen semantic encoder giving F_D (Sec. 3.3).

    Input: ImageNet-normalised images [B, 3, H, W], H and W multiples of 16. Token order:
    [CLS, 4 registers ("storage tokens"), h*w patches row-major]. state_dict keys and shapes
    are those of Meta's released .pth files.
    """

    def __init__(self, arch="dinov3_vits16plus"):
        super().__init__()
        if arch not in DINOV3_ARCHS:
            raise ValueError(f"unknown DINOv3 arch {arch!r}; choose from {sorted(DINOV3_ARCHS)}")
        a = DINOV3_ARCHS[arch]
        self.arch, C = arch, a["embed_dim"]
        self.embed_dim, self.num_heads = C, a["num_heads"]
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, C))
        self.storage_tokens = nn.Parameter(0.02 * torch.randn(1, DINOV3_NUM_REGISTERS, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C))  # iBOT masking; unused at inference
        self.patch_embed = PatchEmbed(C)
        self.rope_embed = RopePositionEmbedding(C // a["num_heads"])
        self.blocks = nn.ModuleList(DinoBlock(C, a["num_heads"], a["ffn"], a["ffn_hidden"])
                                    for _ in range(a["depth"]))
        self.norm = nn.LayerNorm(C, eps=1e-5)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _blocks(self, x, take):
        """Raw (pre-norm) outputs [B, N, C], all tokens, of the 0-based blocks listed in take."""
        check_images(x, "DINOv3 input")
        h, w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        B = x.shape[0]
        tokens = self.patch_embed(x)  # [B, hw, C]
        prefix = torch.cat([self.cls_token, self.storage_tokens], 1).expand(B, -1, -1)  # [B, 5, C]
        tokens = torch.cat([prefix.to(tokens.dtype), tokens], 1)  # [B, 5 + hw, C]
        rope = self.rope_embed(h, w)
        outs = {}
        for i, blk in enumerate(self.blocks[: max(take) + 1]):  # stop after the last block needed
            tokens = blk(tokens, rope)
            outs[i] = tokens
        return [outs[i] for i in take]

    def forward_features(self, x):
        x_prenorm = self._blocks(x, [len(self.blocks) - 1])[0]
        x_norm = self.norm(x_prenorm)
        R = DINOV3_NUM_REGISTERS
        return dict(x_norm_clstoken=x_norm[:, 0], x_storage_tokens=x_norm[:, 1:1 + R],
                    x_norm_patchtokens=x_norm[:, 1 + R:], x_prenorm=x_prenorm)

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]  # [B, C]

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False,
                                return_extra_tokens=False, norm=True):
        """Outputs of the last n blocks (int n) or of the 0-based blocks listed in n."""
        depth = len(self.blocks)
        take = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        if not take or min(take) < 0 or max(take) >= depth:
            raise ValueError(f"block indices {take} out of range for a {depth}-block DINOv3")
        outs = [self.norm(o) if norm else o for o in self._blocks(x, take)]
        R, (B, _, H, W) = DINOV3_NUM_REGISTERS, x.shape
        cls, extra = [o[:, 0] for o in outs], [o[:, 1:1 + R] for o in outs]
        patches = [o[:, 1 + R:] for o in outs]  # [B, hw, C]
        if reshape:
            patches = [p.reshape(B, H // PATCH_SIZE, W // PATCH_SIZE, -1).permute(0, 3, 1, 2).contiguous()
                       for p in patches]  # [B, C, h, w]
        extras = [t for t, on in ((cls, return_class_token), (extra, return_extra_tokens)) if on]
        return tuple(zip(patches, *extras)) if extras else tuple(patches)


def _dinov3_from_hf(sd):
    """Hugging Face DINOv3ViTModel keys (transformers 4.56+ 'layer.N', 5.x 'model.layer.N') -> Meta's."""
    swiglu = any(".gate_proj." in k for k in sd)
    rules = [(r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.register_tokens$", "storage_tokens"),
             (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."), (r"^layer\.(\d+)\.", r"blocks.\1."),
             (r"\.attention\.o_proj\.", ".attn.proj."), (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
             (r"\.mlp\.gate_proj\.", ".mlp.w1."), (r"\.mlp\.up_proj\.", ".mlp.w2." if swiglu else ".mlp.fc1."),
             (r"\.mlp\.down_proj\.", ".mlp.w3." if swiglu else ".mlp.fc2.")]
    out, qkv = {}, {}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        if k.endswith("rope_embeddings.inv_freq"):  # recomputed by HF, never stored by Meta
            continue
        if k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)  # HF (1, 1, C) -> Meta (1, C)
            continue
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        m = re.fullmatch(r"(blocks\.\d+\.)attention\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault(m[1], {})[m[2] + m[3]] = v
        else:
            out[k] = v  # anything unknown stays as is and is reported by load_strict
    for blk, p in qkv.items():  # q, k, v -> one qkv; HF has no k bias (Meta's mask zeroes it)
        if not all(n + "weight" in p for n in "qkv"):
            raise ValueError(f"HF DINOv3 {blk} lacks some of q_proj/k_proj/v_proj weights")
        out[blk + "attn.qkv.weight"] = torch.cat([p[n + "weight"] for n in "qkv"])  # [3C, C]
        zero = torch.zeros_like(p["qweight"][:, 0])
        one = torch.ones_like(zero)
        out[blk + "attn.qkv.bias"] = torch.cat([p.get("qbias", zero), zero, p.get("vbias", zero)])  # [3C]
        out[blk + "attn.qkv.bias_mask"] = torch.cat([one, zero, one])
    return out


def dinov3_state_dict(sd, arch):
    """Any supported DINOv3 layout (Meta .pth, HF safetensors / .bin) -> Meta's keys, checked for arch."""
    a = DINOV3_ARCHS[arch]
    if any(k.startswith(("embeddings.", "layer.", "model.layer.")) for k in sd):
        sd = _dinov3_from_hf(sd)
        sd.setdefault("rope_embed.periods", RopePositionEmbedding(a["embed_dim"] // a["num_heads"]).periods)
    sd = dict(sd)
    if "rope_embed.periods" in sd:
        sd["rope_embed.periods"] = sd["rope_embed.periods"].float()  # released file: bf16
    if "cls_token" in sd:  # name the arch the file was made for when it is not `arch`
        embed = sd["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        ffn = "swiglu" if any(".mlp.w1." in k for k in sd) else "mlp"
        if (embed, depth, ffn) != (a["embed_dim"], a["depth"], a["ffn"]):
            name = next((n for n, b in DINOV3_ARCHS.items()
                         if (b["embed_dim"], b["depth"], b["ffn"]) == (embed, depth, ffn)), None)
            hint = f"this looks like a {name} checkpoint; pass arch={name!r}" if name else \
                "it matches no entry of DINOV3_ARCHS"
            raise ValueError(f"DINOv3 weights have embed {embed}, {depth} blocks, {ffn} FFN but arch={arch!r} "
                             f"expects embed {a['embed_dim']}, {a['depth']} blocks, {a['ffn']} FFN: {hint}")
    return sd


def _read_weights(path):
    """A state dict from .pth / .bin (torch.load) or .safetensors (optional safetensors package)."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors "
                              "(or pass Meta's .pth file instead)") from e
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_dinov3(path, arch="dinov3_vits16plus"):
    """Frozen eval DinoV3 from Meta's .pth or a Hugging Face model.safetensors / pytorch_model.bin."""
    if arch not in DINOV3_ARCHS:
        raise ValueError(f"unknown DINOv3 arch {arch!r}; choose from {sorted(DINOV3_ARCHS)}")
    if os.path.isdir(path):  # a Hugging Face snapshot folder
        path = next((os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")
                     if os.path.exists(os.path.join(path, f))), path)
    if not os.path.isfile(path):
        hf = "facebook/" + arch.replace("_", "-") + "-pretrain-lvd1689m"
        raise FileNotFoundError(
            f"DINOv3 weights not found at {path!r}. Fetch {DINOV3_FILES.get(arch, 'the ' + arch + ' .pth')} "
            f"via Meta's download form (linked from https://github.com/facebookresearch/dinov3) or "
            f"model.safetensors from the gated Hugging Face repo {hf}, then pass its path "
            f"as load_dinov3(path, arch={arch!r}) or load_autoencoder(ckpt, dino_weights=path).")
    model = DinoV3(arch)
    load_strict(model, dinov3_state_dict(_read_weights(path), arch), f"{path} as {arch}")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------
# Residual encoder F_R and distribution alignment (Sec. 3.3, Eq. 6)
# ----------------------------------------------------------------------------------
class ViTEncoderBlock(nn.Module):
    """Pre-norm ViT block (torchvision EncoderBlock names: ln_1, self_attention, ln_2, mlp.0/mlp.3)."""

    def __init__(self, dim, heads, mlp_dim, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        for lin in (self.mlp[0], self.mlp[3]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.dropout(self.self_attention(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.ln_2(x))


class ViTEncoder(nn.Module):
    """Learned position embedding + blocks + final LayerNorm (torchvision Encoder names)."""

    def __init__(self, num_tokens, dim, depth, heads, mlp_dim, dropout):
        super().__init__()
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, num_tokens, dim))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.add_module(f"encoder_layer_{i}", ViTEncoderBlock(dim, heads, mlp_dim, dropout))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, h, w):
        pos = self.pos_embedding  # [1, 1 + n*n, D] for the training image size
        n = math.isqrt(pos.shape[1] - 1)
        if (h, w) != (n, n):  # another input size: bicubic-resize the grid part (not in the official code)
            grid = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # [1, D, n, n]
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # [1, D, h, w]
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)  # [1, 1 + hw, D]
        return self.ln(self.layers(self.dropout(x + pos)))


class ResidualEncoder(nn.Module):
    """Residual encoder F_R (Sec. 3.3): a small ViT over the 16x16 patches -> [B, 8, h, w]."""

    def __init__(self, image_size=256, depth=6, width=384, heads=8, mlp_dim=1536, dropout=0.1,
                 out_dim=RESIDUAL_DIM):
        super().__init__()
        n = image_size // PATCH_SIZE
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))  # dropped after the encoder
        self.conv_proj = nn.Conv2d(3, width, PATCH_SIZE, stride=PATCH_SIZE)
        self.encoder = ViTEncoder(1 + n * n, width, depth, heads, mlp_dim, dropout)
        self.heads = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, x):
        """x: ImageNet-normalised images (the same tensor DINO gets)."""
        B, _, H, W = x.shape
        h, w = H // PATCH_SIZE, W // PATCH_SIZE
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, hw, D]
        x = torch.cat([self.class_token.expand(B, -1, -1), x], 1)  # [B, 1 + hw, D]
        x = self.heads(self.encoder(x, h, w)[:, 1:])  # [B, hw, 8]
        return x.transpose(1, 2).reshape(B, -1, h, w)  # [B, 8, h, w]


def align_residual(f_r, f_d, per_image=False, eps=1e-6):
    """Distribution alignment, Eq. (6): F_R-hat = (F_R - mu(F_R)) / sigma(F_R) * sigma(F_D) + mu(F_D).

    mu, sigma: per-channel mean / unbiased std over batch and tokens (per_image: over each
    image's tokens only), averaged over channels to scalars, detached (the official
    statistics). No running statistics: they come from the tensors passed in.
    """
    dims = (2, 3) if per_image else (0, 2, 3)

    def mu(f):
        return f.mean(dim=dims).mean(-1).reshape(-1, 1, 1, 1).detach()  # [B or 1, 1, 1, 1]

    def sigma(f):
        return f.std(dim=dims).mean(-1).reshape(-1, 1, 1, 1).detach()

    return (f_r - mu(f_r)) / (sigma(f_r) + eps) * sigma(f_d) + mu(f_d)  # Eq. (6)


# ----------------------------------------------------------------------------------
# SVG decoder: the LDM / VA-VAE convolutional decoder (Sec. 3.3)
# ----------------------------------------------------------------------------------
def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """LDM residual block: (GroupNorm, swish, conv3x3) x 2 with a 1x1 shortcut when widths differ."""

    def __init__(self, c_in, c_out, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # [B, c_out, H, W]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """LDM single-head spatial self-attention (1x1-conv q, k, v, proj_out), via SDPA."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B, 1, HW, C]
        return x + self.proj_out(h[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Decoder(nn.Module):
    """SVG decoder: the LDM / VA-VAE conv decoder (Rombach et al. 2022), features -> pixels (Sec. 3.3).

    attn_resolutions count in image pixels / 2**levels as in LDM: with image_size 256 and 5
    levels the features are 16x16 and attention at 16 means the lowest level.
    """

    def __init__(self, z_channels, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), image_size=256, dropout=0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = image_size // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        levels = []
        for i_level in reversed(range(len(ch_mult))):  # lowest resolution first
            level, block_out = nn.Module(), ch * ch_mult[i_level]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            level.upsample = Upsample(block_in) if i_level != 0 else nn.Identity()
            res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level: up[0] is full resolution
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)  # [B, ch * ch_mult[-1], h, w]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            h = level.upsample(h)  # [B, C, 2h, 2w] (identity at full resolution)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, 16h, 16w]


# ----------------------------------------------------------------------------------
# SVG autoencoder: DINO + residual encoder + decoder (Fig. 3)
# ----------------------------------------------------------------------------------
@dataclass
class AEConfig:
    """SVG autoencoder settings (Sec. 3.3, App. A; defaults = the official 256px model)."""

    dino_arch: str = "dinov3_vits16plus"
    image_size: int = 256  # training size: sizes the residual pos-embedding and decoder attention
    dino_layer: int | None = None  # None: last block; k: block k, 0-based (Table 6: 4, 8, 11); both normed
    use_residual: bool = True  # False: DINO-only features (Table 4, row 1)
    align: str = "batch"  # Eq. (6) stats over the "batch" (official) or per "image"; "none": Table 4, row 2
    mask_prob: float = 0.1  # stage-1 training: replace a sample's whole F_R by a learned token
    residual_depth: int = 6
    residual_width: int = 384
    residual_heads: int = 8
    residual_mlp: int = 1536
    residual_dropout: float = 0.1
    decoder_ch: int = 128
    decoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: int = 2
    decoder_attn_resolutions: tuple = (16,)
    decoder_dropout: float = 0.0

    def __post_init__(self):
        self.decoder_ch_mult = tuple(self.decoder_ch_mult)  # lists after a JSON round trip
        self.decoder_attn_resolutions = tuple(self.decoder_attn_resolutions)
        if self.dino_arch not in DINOV3_ARCHS:
            raise ValueError(f"dino_arch {self.dino_arch!r} unknown; choose from {sorted(DINOV3_ARCHS)}")
        if self.align not in ("batch", "image", "none"):
            raise ValueError(f"align must be 'batch', 'image' or 'none', got {self.align!r}")
        depth = DINOV3_ARCHS[self.dino_arch]["depth"]
        if self.dino_layer is not None and not 0 <= self.dino_layer < depth:
            raise ValueError(f"dino_layer {self.dino_layer} out of range: {self.dino_arch} has blocks 0..{depth - 1}")
        if self.image_size % PATCH_SIZE:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {PATCH_SIZE}")


AE_PRESETS = {
    "paper": AEConfig(),  # official f16d392 autoencoder, 256px
    "tiny": AEConfig(image_size=64, residual_depth=2, residual_width=128, residual_heads=4, residual_mlp=256,
                     residual_dropout=0.0, decoder_ch=32, decoder_num_res_blocks=1, decoder_attn_resolutions=(4,)),
}


class SVGAutoencoder(nn.Module):
    """SVG autoencoder (Sec. 3.3, Fig. 3): frozen DINOv3 F_D + residual F_R (Eq. 6) -> LDM decoder."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.dino = DinoV3(cfg.dino_arch).eval().requires_grad_(False)
        self.residual = ResidualEncoder(cfg.image_size, cfg.residual_depth, cfg.residual_width, cfg.residual_heads,
                                        cfg.residual_mlp, cfg.residual_dropout) if cfg.use_residual else None
        if cfg.use_residual and cfg.mask_prob > 0:
            self.mask_token = nn.Parameter(0.02 * torch.randn(1, RESIDUAL_DIM, 1, 1))
        self.feature_dim = self.dino.embed_dim + (RESIDUAL_DIM if cfg.use_residual else 0)  # 392 / 384
        self.decoder = Decoder(self.feature_dim, cfg.decoder_ch, cfg.decoder_ch_mult, cfg.decoder_num_res_blocks,
                               cfg.decoder_attn_resolutions, cfg.image_size, cfg.decoder_dropout)
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.dino.eval()  # DINO is frozen and never in train mode
        return self

    def trainable_parameters(self):
        """Residual encoder, mask token and decoder (stage 1); never DINO."""
        return [p for n, p in self.named_parameters() if not n.startswith("dino.")]

    @torch.no_grad()
    def dino_features(self, x):
        """F_D: normed patch tokens of the last (or cfg.dino_layer) block, [B, C_D, h, w]."""
        layer = len(self.dino.blocks) - 1 if self.cfg.dino_layer is None else self.cfg.dino_layer
        return self.dino.get_intermediate_layers(x, n=[layer], reshape=True, norm=True)[0]

    def encode(self, x):
        """Images in [-1, 1], [B, 3, H, W] -> SVG features [B, C, H/16, W/16], DINO channels first."""
        check_images(x, "encode input")
        x = ((x + 1) / 2 - self.imagenet_mean) / self.imagenet_std  # the input of both encoders
        f_d = self.dino_features(x)  # [B, 384, h, w]
        if self.residual is None:
            return f_d
        f_r = self.residual(x)  # [B, 8, h, w]
        if self.training and hasattr(self, "mask_token"):  # stage-1 mask augmentation (App. A)
            drop = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.cfg.mask_prob
            f_r = torch.where(drop, self.mask_token.to(f_r.dtype).expand_as(f_r), f_r)
        if self.cfg.align != "none":
            f_r = align_residual(f_r, f_d, per_image=self.cfg.align == "image")  # Eq. (6)
        return torch.cat([f_d, f_r], 1)  # [B, 392, h, w]

    def decode(self, z):
        """SVG features [B, C, h, w] -> images [B, 3, 16h, 16w] (about [-1, 1], not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.feature_dim:
            kind = "DINO + residual" if self.cfg.use_residual else "DINO-only"
            hint = " (384 = DINO-only features, 392 = DINO + 8 residual channels: decode with the autoencoder " \
                "that made them)" if z.ndim == 4 and {z.shape[1], self.feature_dim} == {384, 392} else ""
            raise ValueError(f"decode expects z of shape [B, {self.feature_dim}, h, w] ({kind} autoencoder), "
                             f"got {tuple(z.shape)}{hint}")
        return self.decoder(z)


def import_official_autoencoder(state_dict, cfg=AE_PRESETS["paper"]):
    """Official Lightning .ckpt state_dict (encoder./extra_vit./mask_token/decoder.) -> SVGAutoencoder."""
    state_dict = state_dict.get("state_dict", state_dict)
    dino = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    sd = {"dino." + k: v for k, v in dinov3_state_dict(dino, cfg.dino_arch).items()}
    for k, v in state_dict.items():
        if k.startswith(("encoder.", "loss.", "norm_vit.")):  # loss.*, norm_vit.*: training loss, unused LayerNorm
            continue
        if k == "mask_token":
            v = v.reshape(1, RESIDUAL_DIM, 1, 1)  # official [1, 8, 1] over tokens
        sd["residual." + k[len("extra_vit."):] if k.startswith("extra_vit.") else k] = v  # torchvision ViT names
    model = SVGAutoencoder(cfg)
    load_strict(model, sd, f"the official SVG autoencoder checkpoint into SVGAutoencoder({cfg.dino_arch}, "
                           f"use_residual={cfg.use_residual}, image_size={cfg.image_size})")
    return model.eval().requires_grad_(False)


def load_autoencoder(path_or_dict, dino_weights=None):
    """Frozen eval SVGAutoencoder from a stage-1/2 checkpoint ("ae_config", "ae") or an official .ckpt.

    dino_weights: a DINOv3 file (see load_dinov3) that replaces the checkpoint's DINO weights;
    required when the checkpoint was saved without them. Only load checkpoints you trust
    (Lightning .ckpt files hold pickled Python objects).
    """
    ckpt = path_or_dict
    if not isinstance(ckpt, dict):
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"autoencoder checkpoint {ckpt!r} not found: pass a stage-1 checkpoint written "
                                    "by train_ae.py, or the official SVG autoencoder .ckpt (HF repo howlin/SVG)")
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "ae_config" in ckpt and "ae" in ckpt:
        cfg, sd = AEConfig(**ckpt["ae_config"]), dict(ckpt["ae"])
        prefix = "dino."
    elif "state_dict" in ckpt or any(k.startswith("extra_vit.") or k.startswith("encoder.") for k in ckpt):
        sd, prefix = dict(ckpt.get("state_dict", ckpt)), "encoder."
        cfg = AE_PRESETS["paper"]
        if "mask_token" not in sd:  # trained without mask augmentation (official mask_ratio -1)
            cfg = AEConfig(**{**asdict(cfg), "mask_prob": 0.0})
    else:
        raise ValueError(f"unrecognised autoencoder checkpoint (top-level keys {list(ckpt)[:6]}): expected a stage-1 "
                         "checkpoint with 'ae_config' and 'ae', or an official Lightning .ckpt with 'state_dict'")
    if dino_weights is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        sd.update({prefix + k: v for k, v in load_dinov3(dino_weights, cfg.dino_arch).state_dict().items()})
    elif not any(k.startswith(prefix) for k in sd):
        raise ValueError(f"the checkpoint has no DINO weights ({prefix}*): pass dino_weights=<path to "
                         f"{DINOV3_FILES.get(cfg.dino_arch, cfg.dino_arch + ' weights')}>")
    if prefix == "encoder.":
        return import_official_autoencoder(sd, cfg)
    model = SVGAutoencoder(cfg)
    load_strict(model, sd, f"the stage-1 checkpoint into SVGAutoencoder({cfg.dino_arch}, "
                           f"use_residual={cfg.use_residual}, image_size={cfg.image_size})")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------
# LPIPS v0.1 (VGG16): perceptual loss and metric
# ----------------------------------------------------------------------------------
# <<stage1: lpips>>


# ----------------------------------------------------------------------------------
# PatchGAN discriminator and the stage-1 reconstruction loss (App. A)
# ----------------------------------------------------------------------------------
# <<stage1: patchgan and loss>>


# ----------------------------------------------------------------------------------
# SiT with QK-Norm: the diffusion transformer on SVG features (Sec. 3.3, Table 5)
# ----------------------------------------------------------------------------------
# <<stage2: sit>>


# ----------------------------------------------------------------------------------
# Flow matching (Eq. 3-5) and feature normalisation
# ----------------------------------------------------------------------------------
# <<stage2: flow matching and feature stats>>


# ----------------------------------------------------------------------------------
# Samplers: Euler / Heun ODE with classifier-free guidance (App. A)
# ----------------------------------------------------------------------------------
# <<sampling: samplers>>


# ----------------------------------------------------------------------------------
# Presets (Table 5) and checkpoint loading
# ----------------------------------------------------------------------------------
# <<stage2: presets and loading>>


# ----------------------------------------------------------------------------------
# Data: image folders, ADM centre crop, a built-in synthetic dataset
# ----------------------------------------------------------------------------------
# <<stage1: data>>


# ----------------------------------------------------------------------------------
# Script plumbing: distributed setup, precision, EMA, resumable sampler, checkpoints
# ----------------------------------------------------------------------------------
# <<stage1: plumbing>>
