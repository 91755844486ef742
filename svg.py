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
- Eq. (6) takes the batch's statistics only while stage 1 trains (as the official code) and
  keeps their running averages; every other encode uses those frozen statistics, so an image
  gets the same features in any batch (SVGAutoencoder.align; align_stats "batch" = official).
"""

import argparse
import contextlib
import glob
import hashlib
import math
import multiprocessing
import os
import pickle
import random
import re
import socket
import struct
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# Named constants (imported by the scripts, never retyped).
PATCH_SIZE = 16  # every encoder here is a /16 patch model (Sec. 3.3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv3 LVD-1689M input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIDUAL_DIM = 8  # residual channels added to DINO's 384 (Sec. 3.3)
NUM_CLASSES = 1000  # ImageNet-1K
TRAIN_TIME_SHIFT = 2.5  # official training shift 0.4 in reversed time = 1 / 0.4
SAMPLE_TIME_SHIFT = 1 / 0.15  # official sampling shift 0.15 in reversed time
ADAM_BETAS = (0.9, 0.999)  # stage-2 AdamW (Table 5)
EMA_DECAY = 0.9999  # stage-2 EMA, updated every step (official)


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
    check_finite(state_dict, source)
    module.load_state_dict(state_dict, strict=True)  # copies (and casts, e.g. bf16 -> fp32)


def nonfinite_tensors(state_dict):
    """Names of the floating-point tensors holding a NaN or inf (a diverged model)."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state_dict, source):
    """Refuse weights with NaN / inf: no checkpoint is written with them, none is loaded with them."""
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise ValueError(f"{source} holds non-finite (NaN/inf) weights in {len(bad)} tensors, e.g. {bad[:4]}: "
                         "the run diverged before it was saved; use an earlier checkpoint")


TRUST_PICKLE_HELP = ("load --ae / --ckpt / --resume files with the full unpickler (torch.load weights_only=False) "
                     "when the safe loader refuses them. RISK: a crafted file can then run arbitrary code on this "
                     "machine; use only for files from a source you trust")


# What torch.load raises on a cut or damaged file: a zip without its directory (RuntimeError), a read past the
# end (OSError EINVAL), or a pickle cut mid-stream (EOFError, KeyError from a missing memo entry, IndexError,
# struct.error, ...), depending on where the cut falls.
UNREADABLE_FILE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError,
                          KeyError, IndexError, TypeError, AttributeError, struct.error, OverflowError)


def load_checkpoint(path, what="checkpoint", trust_pickle=False):
    """torch.load onto the CPU with weights_only=True: tensors, numbers, strings and containers only,
    so a crafted file cannot run code. Every file of this project loads so, and so do the official
    ones (SVG-XL {"ema": ...}, dinov3_sp_stats.pt, the Lightning autoencoder .ckpt, whose state_dict,
    optimizer, loop and callback states are plain data). A file that needs another Python global is
    refused naming it; trust_pickle=True (TRUST_PICKLE_HELP) is the explicit opt-in. Unreadable,
    truncated or foreign files raise a ValueError that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except UNREADABLE_FILE_ERRORS as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            names = found.group(1)
            with contextlib.suppress(Exception):  # every object the file needs, not only the first
                names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or names
            raise ValueError(f"{what} {path!r} refers to the Python object(s) {names}, which a weights-only "
                             "load refuses (unpickling them could run code). If you trust the file, pass "
                             "--trust-pickle (trust_pickle=True)") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read {what} {path!r}: truncated, corrupt or not a PyTorch file ({reason}); "
                         "use another copy or an earlier checkpoint") from e


def rope_rotate_half(x):
    """Rotate-half (NeoX) pairing: dim i is rotated with dim i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x, sin, cos):
    return x * cos + rope_rotate_half(x) * sin


class RopePositionEmbedding(nn.Module):
    """DINOv3 2D axial RoPE: sin/cos tables for an h x w patch grid ('separate' coords).

    Train mode only (as in DINOv3): coordinate augmentation, each a fresh draw per call from
    the global torch RNG: shift adds U(-shift, shift) per axis, jitter multiplies each axis
    by a log-uniform factor in [1/jitter, jitter], rescale multiplies both axes by one
    log-uniform factor in [1/rescale, rescale]. None disables one; eval mode never augments.
    """

    def __init__(self, head_dim, base=100.0, shift_coords=None, jitter_coords=None, rescale_coords=None):
        super().__init__()
        k = torch.arange(head_dim // 4, dtype=torch.float32)
        periods = base ** (2 * k / (head_dim // 2))  # 100**(k/16) for head_dim 64
        # The released checkpoints store periods in bf16; rounding here makes a fresh model
        # equal the released one. load_state_dict overwrites it from the file anyway.
        self.register_buffer("periods", periods.to(torch.bfloat16).float(), persistent=True)
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords

    def augment(self, coords):
        """DINOv3's train-time shift, jitter and rescale of [hw, 2] coordinates (in this order)."""
        dev = coords.device
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, device=dev).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            lim = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, device=dev).uniform_(-lim, lim).exp()  # per axis
        if self.rescale_coords is not None:
            lim = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=dev).uniform_(-lim, lim).exp()  # both axes
        return coords

    def forward(self, h, w):
        dev = self.periods.device
        coords_h = torch.arange(0.5, h, device=dev, dtype=torch.float32) / h
        coords_w = torch.arange(0.5, w, device=dev, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), -1)  # [h, w, 2]
        coords = 2.0 * coords.flatten(0, 1) - 1.0  # [hw, 2] (y, x) in (-1, 1)
        if self.training:  # frozen DINO stays in eval unless stage 1 asks (train_ae --dino-rope-aug)
            coords = self.augment(coords)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [hw, 2, D/4]
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
    # (RoPE train-time augmentation of the LVD-1689M backbones: shift None, jitter None, rescale 2)
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
DINOV3_ROPE_RESCALE = 2.0  # rescale_coords of the hub backbones: log-uniform in [1/2, 2] in train mode


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
        self.rope_embed = RopePositionEmbedding(C // a["num_heads"], rescale_coords=DINOV3_ROPE_RESCALE)
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
            if i and self.rope_embed.training:  # DINOv3 calls rope_embed per block: a fresh draw each
                rope = self.rope_embed(h, w)
            tokens = blk(tokens, rope)
            if i in take:  # keep only the requested blocks' outputs
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
    return load_checkpoint(path, "DINOv3 weights")


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
def resample_pos_embed(pos, h, w):
    """App. H: a learned ViT position embedding [1, 1 + n*n, D] (class token first) -> [1, 1 + h*w, D].

    The n x n grid part is resized bicubically as timm's resample_abs_pos_embed does (at least
    fp32, align_corners=False, antialiased when shrinking; torchvision's interpolate_embeddings
    differs only in align_corners=True); the class token is kept as is. The same size returns
    `pos` itself. Used on the fly for other input sizes and, once, to start a run at a new
    resolution from a checkpoint (train_ae.py --init-from). Not in the official code, whose
    torchvision ViT accepts 256 px only.
    """
    n = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or pos.shape[0] != 1 or n * n != pos.shape[1] - 1:
        raise ValueError(f"expected a position embedding [1, 1 + n*n, D], got {tuple(pos.shape)}")
    if (h, w) == (n, n):
        return pos
    grid = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # [1, D, n, n]
    grid = grid.to(torch.promote_types(pos.dtype, torch.float32))  # bf16 / fp16 weights: resample in fp32
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)  # [1, D, h, w]
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2).to(pos.dtype)], 1)  # [1, 1 + hw, D]


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
        # [1, 1 + n*n, D] stored for the training size; another input size resamples it on the fly
        pos = resample_pos_embed(self.pos_embedding, h, w)  # [1, 1 + hw, D]
        return self.ln(self.layers(self.dropout(x + pos)))


class ResidualEncoder(nn.Module):
    """Residual encoder F_R (Sec. 3.3): a small ViT over the 16x16 patches -> [B, 8, h, w]."""

    def __init__(self, image_size=256, depth=6, width=384, heads=8, mlp_dim=1536, dropout=0.1):
        super().__init__()
        n = image_size // PATCH_SIZE
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))  # dropped after the encoder
        self.conv_proj = nn.Conv2d(3, width, PATCH_SIZE, stride=PATCH_SIZE)
        fan_in = 3 * PATCH_SIZE * PATCH_SIZE  # torchvision VisionTransformer: trunc normal sqrt(1 / fan_in), zero bias
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))  # bounds +-2 absolute, as there
        nn.init.zeros_(self.conv_proj.bias)
        self.encoder = ViTEncoder(1 + n * n, width, depth, heads, mlp_dim, dropout)
        self.heads = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, RESIDUAL_DIM))

    def forward(self, x):
        """x: ImageNet-normalised images (the same tensor DINO gets)."""
        B, _, H, W = x.shape
        h, w = H // PATCH_SIZE, W // PATCH_SIZE
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, hw, D]
        x = torch.cat([self.class_token.expand(B, -1, -1), x], 1)  # [B, 1 + hw, D]
        x = self.heads(self.encoder(x, h, w)[:, 1:])  # [B, hw, 8]
        return x.transpose(1, 2).reshape(B, -1, h, w)  # [B, 8, h, w]


ALIGN_STATS_MODES = ("frozen", "batch")  # where Eq. (6) statistics come from outside stage-1 training
ALIGN_MOMENTUM = 0.1  # running average of the Eq. (6) statistics during stage 1 (BatchNorm's default)
STAGE1_BATCH = 64  # official stage-1 per-GPU batch: what Eq. (6) batch statistics were taken over
CALIBRATION_IMAGES = 10_000  # training images for calibrate_alignment


def alignment_stats(f_r, f_d, per_image=False):
    """The four Eq. (6) scalars [mu_R, sigma_R, mu_D, sigma_D], [B or 1, 4], detached.

    mu, sigma: per-channel mean / unbiased std over batch and tokens (per_image: over each
    image's tokens only), averaged over channels (the official statistics).
    """
    dims = (2, 3) if per_image else (0, 2, 3)
    return torch.stack([f_r.mean(dims).mean(-1), f_r.std(dims).mean(-1),
                        f_d.mean(dims).mean(-1), f_d.std(dims).mean(-1)], -1).reshape(-1, 4).detach()


def align_residual(f_r, f_d, per_image=False, eps=1e-6, stats=None):
    """Distribution alignment, Eq. (6): F_R-hat = (F_R - mu(F_R)) / sigma(F_R) * sigma(F_D) + mu(F_D).

    stats: given [mu_R, sigma_R, mu_D, sigma_D] ([4] or [B, 4]; e.g. the frozen running
    statistics), else computed from the tensors passed in (alignment_stats: batch or image).
    """
    stats = alignment_stats(f_r, f_d, per_image) if stats is None else stats.to(f_r.dtype).reshape(-1, 4)
    mu_r, sd_r, mu_d, sd_d = stats.reshape(-1, 4, 1, 1, 1).unbind(1)  # each [B or 1, 1, 1, 1]
    return (f_r - mu_r) / (sd_r + eps) * sd_d + mu_d  # Eq. (6)


def training_like_batches(n, batch_size, dist=None, seed=0):
    """This rank's batches [(indices, keep)] for encoding all n items with Eq. (6) batch statistics.

    Batches look like stage-1 training batches: a fixed seeded permutation of the items cut
    into full batches of batch_size (the last one topped up by wrapping around; it owns only
    its first `keep` indices), and batch j goes to rank j % W. So the batch each item is
    encoded in, and its features, are the same for any number of processes, and a folder
    sorted by class never makes a one-class batch.
    """
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    num = math.ceil(n / batch_size)
    padded = [order[i % n] for i in range(num * batch_size)]
    return [(padded[j * batch_size:(j + 1) * batch_size], min(batch_size, n - j * batch_size))
            for j in range(rank, num, world)]


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

    patch_skip (not in the paper; the tiny tier's AEConfig.decoder_patch_skip): a linear map of
    each feature token to its own 16x16 pixel patch (a 1x1 conv + pixel shuffle, the output
    head of ViT decoders), added to the output. Nearest-neighbour upsampling gives the four
    children of a pixel the same value, so the conv stack has to learn where in its patch each
    pixel lies from the neighbours; that takes far longer than a CPU tier can train.
    """

    def __init__(self, z_channels, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), image_size=256, dropout=0.0, patch_skip=False):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.factor = 2 ** (len(ch_mult) - 1)  # pixels per feature token along each side: 16
        self.patch_skip = nn.Conv2d(z_channels, 3 * self.factor**2, 1) if patch_skip else None
        res = image_size // self.factor
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
        return self.head(self.trunk(z), z)  # [B, 3, 16h, 16w]

    def head(self, h, z):
        """The last layer conv_out on the trunk's output h, plus the patch shortcut of z if any."""
        x = self.conv_out(h)  # [B, 3, 16h, 16w]
        if self.patch_skip is None:
            return x
        return x + F.pixel_shuffle(self.patch_skip(z), self.factor)  # [B, 3 * 256, h, w] -> [B, 3, 16h, 16w]

    def trunk(self, z):
        """Everything before conv_out: the last layer's input [B, ch, 16h, 16w] (train_ae.py applies
        head() outside the compiled / DDP forward, so the last layer's gradient alone is cheap to take)."""
        h = self.conv_in(z)  # [B, ch * ch_mult[-1], h, w]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            h = level.upsample(h)  # [B, C, 2h, 2w] (identity at full resolution)
        return F.silu(self.norm_out(h))  # [B, ch, 16h, 16w]


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
    align: str = "batch"  # Eq. (6) stats over the "batch" (official; frozen outside stage 1, see
    # SVGAutoencoder.align) or per "image"; "none": Table 4, row 2
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
    decoder_patch_skip: bool = False  # not in the paper: the tiny tier's token -> 16x16 patch shortcut (Decoder)

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
    # The CPU tier (README "Quick start tiers"), 64 px = a 4x4 feature grid. With a random DINO, whose 12 blocks
    # are the identity to 1e-5 (LayerScale starts at 1e-5), F_D is LayerNorm(patch_embed(x)): a random linear map
    # of each 16x16 patch, not degenerate (99% of its variance is between images). Block 0 gives the same features
    # (relative difference 9e-6) for 1/12 of the DINO cost; with real weights pass --ae-set dino_layer=null for
    # the paper's last block. 64 px, not 32: a least-squares token -> patch map of these features is judged
    # right (eval.py shapes) 99% of the time at 64 px, 89% at 32 px. decoder_patch_skip: the conv decoder alone
    # learns that map too slowly for a CPU tier (judge 67% after 6 min at 64 px; with the shortcut 96% after 1).
    "tiny": AEConfig(image_size=64, dino_layer=0, residual_depth=2, residual_width=128, residual_heads=4,
                     residual_mlp=256, residual_dropout=0.0, decoder_ch=32, decoder_num_res_blocks=0,
                     decoder_attn_resolutions=(), decoder_patch_skip=True),
}


def resize_ae_config(cfg: AEConfig, image_size: int) -> AEConfig:
    """App. H: the same autoencoder at another image size, "without architectural modifications".

    image_size sizes the residual encoder's position embedding (its weights are resampled on
    loading by resample_pos_embed; DINOv3's RoPE and the conv decoder take any size) and
    names the decoder's attention levels in pixels / 2**levels (LDM): (16,) at 256 px is the
    16x16 level, which is (32,) at 512 px. Scaling them keeps attention at the same levels.
    """
    if image_size % PATCH_SIZE or image_size <= 0:
        raise ValueError(f"image size {image_size} must be a positive multiple of {PATCH_SIZE}")
    attn = tuple(r * image_size // cfg.image_size for r in cfg.decoder_attn_resolutions)
    if any(r * image_size % cfg.image_size for r in cfg.decoder_attn_resolutions):
        raise ValueError(f"decoder_attn_resolutions {cfg.decoder_attn_resolutions} at {cfg.image_size} px do not "
                         f"scale to whole resolutions at {image_size} px")
    return replace(cfg, image_size=image_size, decoder_attn_resolutions=attn)


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
                               cfg.decoder_attn_resolutions, cfg.image_size, cfg.decoder_dropout,
                               cfg.decoder_patch_skip)
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Frozen Eq. (6) statistics (align "batch"), kept like BatchNorm's running statistics and saved
        # with the weights: [mu_R, sigma_R, mu_D, sigma_D] averaged over stage-1 training batches
        # (or written by calibrate_alignment), how many batches went in (0 = none yet), and the
        # per-GPU batch size those batches had (what align_stats "batch" encodes with elsewhere).
        self.register_buffer("align_running", torch.zeros(4))
        self.register_buffer("align_tracked", torch.zeros((), dtype=torch.long))
        self.register_buffer("align_batch", torch.tensor(STAGE1_BATCH))
        self.align_stats = "frozen"  # outside stage-1 training: "frozen" running stats or the official "batch"
        # "align_tracked > 0" read once, not per encode (a host sync); re-read after a state dict load
        self.frozen_ready = False
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "frozen_ready", False))
        self.dino_train_mode = False  # stage 1 only: DINO in train mode = DINOv3's RoPE rescale (official run)

    def train(self, mode=True):
        super().train(mode)
        self.dino.train(mode and self.dino_train_mode)  # frozen DINO: eval unless stage 1 asks
        return self

    def encode_batch_size(self, default):
        """Images per batch when encoding a dataset: the stage-1 per-GPU batch (align_batch) when
        Eq. (6) takes batch statistics, so batches look like training batches; else `default`."""
        batch_stats = self.cfg.align == "batch" and self.align_stats == "batch"
        return int(self.align_batch) if batch_stats and self.residual is not None else default

    def alignment_buffers(self):
        """The frozen Eq. (6) statistics' buffers as state-dict entries (defaults for older files)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("align_")}

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
        f_d, f_r = self.encode_unaligned(x)
        if f_r is None:
            return f_d
        return torch.cat([f_d, self.align(f_r, f_d)], 1)  # [B, 392, h, w]

    def encode_unaligned(self, x):
        """F_D [B, 384, h, w] and F_R [B, 8, h, w] before Eq. (6) (F_R None without a residual encoder)."""
        check_images(x, "encode input")
        x = ((x + 1) / 2 - self.imagenet_mean) / self.imagenet_std  # the input of both encoders
        f_d = self.dino_features(x)  # [B, 384, h, w]
        if self.residual is None:
            return f_d, None
        f_r = self.residual(x)  # [B, 8, h, w]
        if self.training and hasattr(self, "mask_token"):  # stage-1 mask augmentation (App. A)
            drop = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.cfg.mask_prob
            f_r = torch.where(drop, self.mask_token.to(f_r.dtype).expand_as(f_r), f_r)
        return f_d, f_r

    def align(self, f_r, f_d):
        """Eq. (6) with the statistics of this mode (the one place that decides).

        cfg.align "none": F_R as is; "image": each image's own statistics. cfg.align "batch":
        in stage-1 training (train mode) the current batch's statistics, as the official code,
        also folded into the running averages (align_running); outside it, with
        align_stats "frozen" (default) those running statistics, so an image gets the same
        features in any batch; with align_stats "batch" the current batch's (official).
        """
        if self.cfg.align == "none":
            return f_r
        if self.cfg.align == "image":
            return align_residual(f_r, f_d, per_image=True)
        if self.training:
            stats = alignment_stats(f_r, f_d)  # [1, 4]
            self.track_alignment(stats[0])
            return align_residual(f_r, f_d, stats=stats)
        if self.align_stats == "batch":
            return align_residual(f_r, f_d)
        if self.align_stats != "frozen":
            raise ValueError(f"align_stats must be one of {ALIGN_STATS_MODES}, got {self.align_stats!r}")
        if not self.frozen_ready and not self.align_tracked:
            raise ValueError(
                "this autoencoder has no frozen Eq. (6) statistics (an official .ckpt, or a checkpoint saved "
                "before any stage-1 step): calibrate them once with `python eval.py calibrate --ae <ckpt> --data "
                "<training images> --out <new ckpt>` (svg.calibrate_alignment), or encode with the official "
                "per-batch statistics (--align-stats batch, ae.align_stats = 'batch')")
        self.frozen_ready = True
        return align_residual(f_r, f_d, stats=self.align_running)

    @torch.no_grad()
    def track_alignment(self, stats):
        """Fold one batch's [mu_R, sigma_R, mu_D, sigma_D] into the running averages (no host sync)."""
        weight = torch.where(self.align_tracked == 0, 1.0, ALIGN_MOMENTUM)  # the first batch is copied
        self.align_running.lerp_(stats.float(), weight)
        self.align_tracked += 1

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
    sd = {**model.alignment_buffers(), **sd}  # none in the official file: calibrate_alignment writes them
    load_strict(model, sd, f"the official SVG autoencoder checkpoint into SVGAutoencoder({cfg.dino_arch}, "
                           f"use_residual={cfg.use_residual}, image_size={cfg.image_size})")
    return model.eval().requires_grad_(False)


def load_autoencoder(path_or_dict, dino_weights=None, trust_pickle=False):
    """Frozen eval SVGAutoencoder from a stage-1/2 checkpoint ("ae_config", "ae") or an official .ckpt.

    dino_weights: a DINOv3 file (see load_dinov3) that replaces the checkpoint's DINO weights;
    required when the checkpoint was saved without them. Files load weights-only (load_checkpoint);
    trust_pickle=True allows any pickled object (only for files you trust).
    """
    ckpt = path_or_dict
    if not isinstance(ckpt, dict):
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"autoencoder checkpoint {ckpt!r} not found: pass a stage-1 checkpoint written "
                                    "by train_ae.py, or the official SVG autoencoder .ckpt (HF repo howlin/SVG)")
        ckpt = load_checkpoint(ckpt, "autoencoder checkpoint", trust_pickle)
    if not isinstance(ckpt, dict):
        raise ValueError(f"unrecognised autoencoder checkpoint: a {type(ckpt).__name__}, not a dict")
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
    sd = {**model.alignment_buffers(), **sd}  # checkpoints from before the frozen statistics: none tracked
    load_strict(model, sd, f"the stage-1 checkpoint into SVGAutoencoder({cfg.dino_arch}, "
                           f"use_residual={cfg.use_residual}, image_size={cfg.image_size})")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_alignment(ae, dataset, num_images=CALIBRATION_IMAGES, batch_size=None, seed=0, dist=None,
                        num_workers=0):
    """Frozen Eq. (6) statistics for an autoencoder that has none (the official .ckpt): written once.

    The mean of the per-batch [mu_R, sigma_R, mu_D, sigma_D] that stage-1 training computes,
    over a fixed, seeded sample of num_images items ((image, label) pairs) of the training
    set in mixed batches of the stage-1 per-GPU size (ae.align_batch; full batches only),
    in eval mode. Batches are split over ranks (the result does not depend on how many).
    Sets ae.align_running / ae.align_tracked; returns the statistics and their spread over
    batches (std over batches in units of the matching sigma: mu_R and sigma_R / sigma_R,
    mu_D and sigma_D / sigma_D), i.e. how far one batch's statistics stray from them.
    """
    dist = dist or Dist(device=ae.align_running.device)
    n = min(num_images, len(dataset))
    batch_size = min(batch_size or int(ae.align_batch), n)
    sample = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    num = n // batch_size
    mine = [sample[j * batch_size:(j + 1) * batch_size] for j in range(dist.rank, num, dist.world_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=num_workers)
    training = ae.training
    ae.eval()  # eval numerics (no mask augmentation, no dropout), as inference
    sums = torch.zeros(2, 4, dtype=torch.float64, device=dist.device)  # sum, sum of squares over batches
    for x, _ in tqdm(loader, desc="calibrate Eq. (6)", disable=not dist.is_main):
        f_d, f_r = ae.encode_unaligned(x.to(dist.device))
        s = alignment_stats(f_r.float(), f_d.float())[0].double()  # [4]
        sums += torch.stack([s, s * s])
    sums = dist.all_reduce_mean(sums) * dist.world_size
    mean = sums[0] / num
    spread = (sums[1] / num - mean ** 2).clamp_min(0).sqrt() / mean[[1, 1, 3, 3]]  # in units of sigma
    ae.align_running.copy_(mean.float())
    ae.align_tracked.fill_(num)
    ae.train(training)
    return dict(stats=mean.tolist(), spread=spread.tolist(), batches=num, batch_size=batch_size, seed=seed)


# ----------------------------------------------------------------------------------
# LPIPS v0.1 (VGG16): perceptual loss and metric
# ----------------------------------------------------------------------------------
# LPIPS' ScalingLayer (-0.030, -0.088, -0.188) / (0.458, 0.448, 0.450) is ImageNet normalisation of (x+1)/2:
LPIPS_SHIFT = tuple(2 * m - 1 for m in IMAGENET_MEAN)
LPIPS_SCALE = tuple(2 * s for s in IMAGENET_STD)
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # torchvision vgg16.features indices of relu1_2, 2_2, 3_3, 4_3, 5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_HEAD_DROPOUT = 0.5  # the v0.1 heads' Dropout p (active only in train mode officially)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_HEADS_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/"
                   "lpips/weights/v0.1/vgg.pth")


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk (Zhang et al. 2018): the perceptual loss and metric (App. A).

    d(x, y) = sum_l mean_hw( w_l . (n_l(x) - n_l(y))^2 ), n_l = VGG16 activations at tap l
    unit-normalised over channels. Always frozen and in eval mode. The official heads are
    Dropout(0.5) + 1x1 conv. head_dropout > 0 applies that dropout (as in train mode) to
    the squared differences before the heads: the official stage-1 run trained with it on,
    because its image logger left every submodule in train mode (train_ae --lpips-dropout).
    0 (default) is exactly the LPIPS metric (the lpips package builds it in eval mode).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        layers, c_in = [], 3
        for v in VGG16_FEATURES:  # named like torchvision's vgg16().features[0:30]
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]  # conv backward needs no output
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.head_dropout = 0.0  # LPIPS_HEAD_DROPOUT for the official stage-1 loss; 0 for the metric
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never in train mode

    def taps(self, x: torch.Tensor) -> list:
        """VGG16 activations at the five LPIPS taps for images in [-1, 1]."""
        # channels_last (NHWC): oneDNN runs each conv without a layout reorder (same taps to fp32 rounding)
        h, out = ((x - self.shift) / self.scale).contiguous(memory_format=torch.channels_last), []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h.float())  # [B, C_l, H/2^l, W/2^l]; the distance in fp32
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image, [B], for x, y [B, 3, H, W] in [-1, 1]."""
        d = 0
        for f_x, f_y, lin in zip(self.taps(x), self.taps(y), self.lins):
            f_x = f_x / (f_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # eps outside the sqrt
            f_y = f_y / (f_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (f_x - f_y).pow(2)  # [B, C_l, h, w], fp32 (taps)
            if self.head_dropout:
                diff = F.dropout(diff, self.head_dropout)  # the heads' Dropout, as in train mode
            with torch.autocast(f_x.device.type, enabled=False):  # the 1x1 head in fp32 under autocast
                d = d + F.conv2d(diff, lin.weight.float()).mean((1, 2, 3))  # [B, 1, h, w] -> [B]
        return d


def _load_state(path, url: str, what: str, how: str) -> dict:
    """A state dict from `path`, or from `url` via torch.hub when path is None (needs internet)."""
    if path is None:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as e:  # offline, proxy, ...
            raise FileNotFoundError(f"no {what} path given and downloading {url} failed ({e}). "
                                    f"Fetch it and pass {how}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} not found. Fetch it from {url} and pass {how}")
    return _read_weights(path)


def load_lpips(vgg_path=None, heads_path=None) -> LPIPS:
    """LPIPS from torchvision's vgg16-397923af.pth and the LPIPS v0.1 heads vgg.pth (strict).

    vgg_path: keys features.{0,2,...,28}.{weight,bias} (classifier.* is ignored).
    heads_path: keys lin{0..4}.model.1.weight (the lpips package's weights/v0.1/vgg.pth, also
    taming-transformers' vgg_lpips; same file). A None path downloads the public file with
    torch.hub (cached in ~/.cache/torch/hub) and fails with these instructions when offline.
    """
    lp = LPIPS()
    vgg = _load_state(vgg_path, VGG16_URL, "VGG16 (torchvision IMAGENET1K_V1)",
                      "its path as vgg_path / --lpips-vgg")
    heads = _load_state(heads_path, LPIPS_HEADS_URL, "LPIPS v0.1 VGG heads (vgg.pth, 7 KB)",
                        "its path as heads_path / --lpips-heads (it also ships in `pip download "
                        "lpips --no-deps`, lpips/weights/v0.1/vgg.pth)")
    if any(k.startswith("lin") for k in vgg):
        raise ValueError(f"{vgg_path!r} holds LPIPS heads, not VGG16: pass it as heads_path / --lpips-heads")
    trunk = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
    unexpected = [k for k in vgg if not k.startswith(("features.", "classifier."))]
    expected = lp.features.state_dict().keys()
    missing = sorted(expected - trunk.keys())
    if missing or unexpected or trunk.keys() != expected:
        raise ValueError(f"{vgg_path!r} is not torchvision's vgg16 state dict: missing "
                         f"{['features.' + k for k in missing][:4]}, unexpected "
                         f"{(unexpected + ['features.' + k for k in trunk.keys() - expected])[:4]}. "
                         f"Expected keys features.{{0,2,...,28}}.{{weight,bias}} ({VGG16_URL})")
    head_keys = [f"lin{i}.model.1.weight" for i in range(len(LPIPS_CHANNELS))]
    if sorted(heads) != head_keys:
        raise ValueError(f"{heads_path!r} is not the LPIPS v0.1 heads file: keys {sorted(heads)[:6]}, "
                         f"expected exactly {head_keys} (lpips/weights/v0.1/vgg.pth)")
    try:
        lp.features.load_state_dict(trunk)
        lp.lins.load_state_dict({f"{i}.weight": heads[k] for i, k in enumerate(head_keys)})
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"LPIPS weights have the wrong shapes: {e}") from e
    return lp


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, [B], for images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.double() - y.double()).pow(2).mean((1, 2, 3))  # [B]
    return 10 * torch.log10(4 / mse.clamp_min(1e-20))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image, [B] (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K = (0.01, 0.03).

    Images in [-1, 1]; for uint8 images u pass u / 127.5 - 1. The luminance term is not
    shift-invariant, so the images are moved to [0, 2] first: with data range 2 that is
    exactly SSIM on [0, 255] with data range 255 (pytorch-msssim, skimage). Each channel
    separately, 'valid' filtering (no padding), population (co)variances, averaged over
    positions and channels, in float64.
    """
    B, C, H, W = x.shape  # batch, channels, height, width
    if min(H, W) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {H}x{W}")
    x, y = x.double() + 1, y.double() + 1  # [0, 2]: the uint8 convention, see above
    g = torch.exp(-(torch.arange(window, dtype=torch.float64, device=x.device) - window // 2) ** 2
                  / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    w = (g.transpose(1, 2) @ g).expand(C, 1, window, window)  # [C,1,k,k] separable Gaussian

    def blur(t):
        return F.conv2d(t, w, groups=C)  # [B,C,H-k+1,W-k+1]

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean((1, 2, 3))


# ----------------------------------------------------------------------------------
# PatchGAN discriminator and the stage-1 reconstruction loss (App. A)
# ----------------------------------------------------------------------------------
PERCEPTUAL_WEIGHT = 1.0  # LPIPS weight in the reconstruction loss (official)
DISC_WEIGHT = 0.5  # scale of the adaptive GAN weight (official)
ADAPTIVE_WEIGHT_MAX = 1e4  # clamp of ||grad nll|| / ||grad g|| (LDM)
ADAM_BETAS_GAN = (0.5, 0.9)  # Adam betas of both the autoencoder and the discriminator (App. A)


class PatchGAN(nn.Module):
    """PatchGAN discriminator D (Isola et al. 2017; taming's NLayerDiscriminator) of the AE loss.

    conv(s2) + LeakyReLU(0.2), three conv + BatchNorm + LeakyReLU blocks (strides 2, 2, 1;
    64 -> 128 -> 256 -> 512 channels), conv to 1 channel: one real/fake logit per 70x70 patch
    ([B, 1, 30, 30] for 256 px). Keys main.{0,2,3,5,...,11}.*
    match taming, so its weights load directly. BatchNorm uses per-process batch statistics.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, n_layers + 1):  # the last one has stride 1
            c_out = ndf * min(2**i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init (conv biases keep PyTorch's default)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # [B,3,H,W] -> [B,1,H/8-2,W/8-2] patch logits


def reconstruction_loss(x, x_hat, lpips=None, perceptual_weight: float = PERCEPTUAL_WEIGHT):
    """The LDM reconstruction term: sum over pixels of |x - x_hat| + w * LPIPS(x, x_hat), / B.

    The official loss divides by exp(logvar) and adds logvar, but logvar is in no optimiser
    and stays 0, so it is dropped. LPIPS [B] broadcasts over all 3HW pixels before the sum,
    as officially (so LPIPS weighs 3HW times more than its mean would). Returns (nll, l1,
    lpips) with l1 and lpips as batch means for logging (lpips 0 when no LPIPS is given).
    """
    B = x.shape[0]
    l1 = (x - x_hat).abs()  # [B,3,H,W]
    p = lpips(x, x_hat) if lpips is not None else torch.zeros(B, device=x.device)  # [B]
    nll = (l1 + perceptual_weight * p.view(B, 1, 1, 1)).sum() / B
    return nll, l1.mean().detach(), p.mean().detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 (E relu(1 - D(x)) + E relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator term -E D(x_hat)."""
    return -logits_fake.mean()


def adaptive_weight(grad_nll: torch.Tensor, grad_gan: torch.Tensor, disc_weight: float = DISC_WEIGHT):
    """LDM's GAN balance ||grad_W nll|| / (||grad_W g|| + 1e-4), clamped [0, 1e4], detached, x 0.5.

    grad_nll, grad_gan: the gradients of nll and g w.r.t. W, the decoder's last conv weight
    (this process's, as officially under DDP; autoencoder_backward computes them).
    """
    w = grad_nll.norm() / (grad_gan.norm() + 1e-4)
    return w.clamp(0, ADAPTIVE_WEIGHT_MAX).detach() * disc_weight


def autoencoder_backward(x_hat, x_cut, nll, g_loss, last_layer, disc_weight: float = DISC_WEIGHT,
                         scale: float = 1.0):
    """Backward of the stage-1 loss nll + lambda * g (App. A), LPIPS and D differentiated once.

    x_hat: the decoder output (in the autoencoder's graph); x_cut = x_hat.detach().requires_grad_(),
    the tensor nll and g_loss (None: no GAN term yet) were computed from. LDM's formulation
    differentiates LPIPS and D twice (autograd.grad of nll and g at W, then the full backward);
    but every gradient of the AE goes through x_hat: dL/dW = J_W^T dL/dx_hat. So dnll/dx_hat and
    dg/dx_hat are computed once each, the two last-layer gradients of the adaptive weight lambda
    come from them through the last conv alone, and J^T (dnll/dx_hat + lambda dg/dx_hat) * scale
    goes through the decoder and encoder once. Returns lambda (0 without g_loss).
    """
    grad = torch.autograd.grad(nll, x_cut)[0]  # [B, 3, H, W] dnll/dx_hat: L1 + LPIPS backward
    d_weight = torch.zeros((), device=x_hat.device)
    if g_loss is not None:
        grad_gan = torch.autograd.grad(g_loss, x_cut)[0]  # [B, 3, H, W] dg/dx_hat: D backward
        w_nll, w_gan = (torch.autograd.grad(x_hat, last_layer, g, retain_graph=True)[0]  # last conv only
                        for g in (grad, grad_gan))
        d_weight = adaptive_weight(w_nll, w_gan, disc_weight)
        grad = grad + d_weight * grad_gan
    x_hat.backward(grad * scale)  # decoder + encoder, once
    return d_weight


def gan_active(step: int, disc_start: int) -> bool:
    """Both the generator term and D training are on from iteration `disc_start` (0-based).

    Here one iteration = one AE step + one D step. The official trainer compares Lightning's
    global_step, which ticks once per optimiser step (twice per iteration), so its
    disc_start 5001 switches the GAN on near iteration 2500; the paper preset uses 2500.
    """
    return step >= disc_start


# ----------------------------------------------------------------------------------
# SiT with QK-Norm: the diffusion transformer on SVG features (Sec. 3.3, Table 5)
# ----------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim, h, w):
    """Fixed 2D sin-cos position embedding [h*w, dim] in the MAE / DiT layout.

    Tokens are row-major (n = row * w + col). The first dim/2 channels encode the column
    index and the last dim/2 the row index, each as [sin, cos] at frequencies
    1 / 10000^(k / (dim/4)). This is exactly the table the official checkpoint stores.
    """
    assert dim % 4 == 0, f"hidden size {dim} must be a multiple of 4 for the 2D sin-cos embedding"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )  # [h, w] each

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega  # [h*w, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [h*w, dim/2]

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # [h*w, dim]


def modulate(x, shift, scale):
    """adaLN modulation x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Timestep embedding (DiT): 256-d [cos, sin] sinusoid of t in [0, 1] (no x1000), then an MLP."""

    def __init__(self, hidden_size, freq_dim=256, max_period=10_000):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)  # [half]
        angles = t.float()[:, None] * freqs[None]  # [B, half]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))  # [B, D]


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (id num_classes) for classifier-free guidance dropout."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes = null

    def forward(self, y, drop=None):
        """y [B] long; drop [B] bool replaces labels by the null class (sampled if None in training)."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop is not None:
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)  # [B, D]


class SiTAttention(nn.Module):
    """Multi-head self-attention with QK-Norm (LayerNorm over head_dim on q and k, as official SVG)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads)
        self.k_norm = nn.LayerNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape  # batch, tokens, hidden
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # [B, N, 3, H, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, d]
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # [B, H, N, d]
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning: shift, scale, gate for attention and for the MLP."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SiTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")  # timm Mlp, as official
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [B, D]
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """DiT output head: LayerNorm (no affine) + adaLN shift/scale + Linear to the feature channels."""

    def __init__(self, dim, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x [B, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, C]


@dataclass
class SiTConfig:
    """SiT / DiT hyper-parameters (Table 5); presets in SIT_PRESETS."""

    in_channels: int = 392  # SVG feature channels C (384 DINO + 8 residual)
    input_size: int = 16  # feature grid h = w = image_size / PATCH_SIZE
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = NUM_CLASSES
    class_dropout_prob: float = 0.1  # labels -> null class during training (CFG)
    # Official checkpoints run time the other way (t=0 noise, predict x_0 - eps); when set,
    # forward() feeds 1 - t and negates the output, so callers always use Eq. (3)-(4).
    reversed_time: bool = False
    grad_checkpointing: bool = False  # recompute blocks in backward (less memory, ~30% slower)
    # What the network outputs. "v" (paper): the velocity. "x" (not in the paper; the tiny tier): the clean
    # features x_0, and forward() returns v = (x_t - x_0) / max(t, X_PRED_T_MIN), Eq. (3)-(4) solved for v, so
    # the loss, samplers and guidance are unchanged (JiT, Li & He 2025: x_0 lies near a low-dimensional
    # manifold, v does not, which matters when the width is small next to a token's channels).
    prediction: str = "v"


class SiT(nn.Module):
    """SVG diffusion transformer (Sec. 3.3): SiT / DiT with QK-Norm on SVG feature tokens, patch size 1."""

    def __init__(self, cfg: SiTConfig):
        super().__init__()
        if cfg.prediction not in ("v", "x") or (cfg.prediction == "x" and cfg.reversed_time):
            raise ValueError(f"SiTConfig.prediction must be 'v' or 'x' ('v' for official reversed-time weights), got "
                             f"{cfg.prediction!r} with reversed_time={cfg.reversed_time}")
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, D)  # replaces the patch embedding (official "ln1")
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        pos = sincos_pos_embed_2d(D, cfg.input_size, cfg.input_size)  # [N, D]
        self.register_buffer("pos_embed", pos[None], persistent=False)  # [1, N, D], fixed
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT init: xavier Linears, N(0, 0.02) label table and t-MLP, adaLN-Zero and zero output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y, drop_labels=None):
        """Velocity v(x_t, t, y) of Eq. (4). x [B,C,h,w], t [B] in [0,1], y [B] long -> [B,C,h,w]."""
        B, C, h, w = x.shape  # batch, feature channels, grid
        cfg, x_t, t_in = self.cfg, x, t
        if (C, h, w) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(
                f"SiT expects features [B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}], got "
                f"{list(x.shape)}: the autoencoder / image size does not match this model's SiTConfig"
            )
        if cfg.reversed_time:
            t = 1 - t
        x = self.x_embedder(x.flatten(2).transpose(1, 2)) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, drop_labels)  # [B, D]
        checkpointing = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        out = self.final_layer(x, c).transpose(1, 2).reshape(B, C, h, w)  # [B, N, C] -> [B, C, h, w]
        if cfg.prediction == "x":  # out is x_0: v = eps - x_0 = (x_t - x_0) / t by Eq. (3)
            return (x_t - out.to(x_t.dtype)) / t_in.clamp(min=X_PRED_T_MIN).view(B, 1, 1, 1).to(x_t.dtype)
        return -out if cfg.reversed_time else out


# ----------------------------------------------------------------------------------
# Flow matching (Eq. 3-5) and feature normalisation
# ----------------------------------------------------------------------------------
X_PRED_T_MIN = 0.05  # prediction "x": v = (x_t - x_0) / t with t clipped here (JiT's 0.05)


def time_shift(t, a):
    """SD3-style time shift t' = a t / (1 + (a - 1) t); a > 1 moves mass toward noise (t = 1).

    Official equivalence: the official code shifts its reversed time tau = 1 - t by
    s = 0.4 (train) / 0.15 (sample) with the same formula, and
    1 - time_shift(1 - u, s) = u / (s + (1 - s) u) = time_shift(u, 1 / s),
    so its s = 0.4 is our a = 2.5 = TRAIN_TIME_SHIFT (and 0.15 is SAMPLE_TIME_SHIFT).
    """
    return a * t / (1 + (a - 1) * t)


def sample_training_time(batch, shift=TRAIN_TIME_SHIFT, device=None, generator=None):
    """Training times t = time_shift(u, shift), u ~ U(0, 1). Returns [batch] float32."""
    u = torch.rand(batch, device=device, generator=generator)  # [B]
    return time_shift(u, shift)


LOSS_WEIGHTS = ("velocity", "x0")  # lambda(t) of Eq. (5): 1 (paper), or t^2 / (1 + t^2) (the tiny tier)


def flow_matching_loss(model, x0, y, shift=TRAIN_TIME_SHIFT, t=None, eps=None, drop_labels=None,
                       weight="velocity"):
    """Flow matching loss, Eq. (3)-(5): the mean of lambda(t) |v_pred - v|^2.

    x0 [B,C,h,w] normalised features, y [B] labels. t [B], eps [B,C,h,w] and drop_labels [B]
    (bool, labels -> null class) are drawn here from the global RNG unless given (drop_labels
    is then left to the SiT's label dropout, active in training mode only); the
    training script passes them to make the randomness a function of the global sample.
    weight "velocity": lambda(t) = 1 (the paper). "x0" (not in the paper): lambda(t) =
    t^2 / (1 + t^2). Since x_0 = x_t - t v, the velocity error is the x_0 error over t, so this
    is the x_0 error weighted 1 / (1 + t^2): it keeps the near-clean times (t -> 0), where the
    velocity loss weighs the x_0 error 1 / t^2, from drowning the noisy ones, where the layout
    is decided (the tiny tier; README).
    """
    if weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss weight must be one of {LOSS_WEIGHTS}, got {weight!r}")
    if t is None:
        t = sample_training_time(x0.shape[0], shift, x0.device)
    if eps is None:
        eps = torch.randn_like(x0)
    t_ = t.view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    x_t = (1 - t_) * x0 + t_ * eps  # Eq. (3)
    v = eps - x0  # Eq. (4)
    v_pred = model(x_t, t, y) if drop_labels is None else model(x_t, t, y, drop_labels)
    if weight == "velocity":
        return F.mse_loss(v_pred.float(), v.float())  # Eq. (5)
    lam = (t_ ** 2 / (1 + t_ ** 2)).float()  # [B, 1, 1, 1]
    return (lam * (v_pred.float() - v.float()) ** 2).mean()


def check_feature_stats(stats, channels):
    """Raise a clear error unless stats = {"mean": [C], "std": [C]} with C = channels, finite, std > 0."""
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise ValueError(f'feature stats must be a dict {{"mean": [C], "std": [C]}}, got {type(stats).__name__}')
    shapes = tuple(tuple(stats[k].shape) for k in ("mean", "std"))
    if shapes != ((channels,), (channels,)):
        got = stats["mean"].numel()
        hint = "recompute them with the autoencoder that produces these features"
        if {got, channels} == {384, 392}:
            hint = (
                "384 channels are DINO-only features (autoencoder without residual encoder), 392 are SVG "
                "features (384 DINO + 8 residual): the statistics and the autoencoder come from different "
                "feature spaces; " + hint
            )
        raise ValueError(f"feature stats have shapes {shapes} but the features have {channels} channels: {hint}")
    if not (torch.isfinite(stats["mean"]).all() and torch.isfinite(stats["std"]).all() and (stats["std"] > 0).all()):
        raise ValueError("feature stats contain non-finite values or a non-positive std; recompute them")


def load_feature_stats(source, channels=None):
    """Per-channel stats from a path or dict: native {"mean": [C], "std": [C]} or the official
    dinov3_sp_stats.pt {"dinov3_sp_mean": [1,1,C], "dinov3_sp_std": [1,1,C]}. Float32 CPU."""
    stats = load_checkpoint(source, "feature stats") if isinstance(source, (str, os.PathLike)) else source
    if isinstance(stats, dict) and {"dinov3_sp_mean", "dinov3_sp_std"} <= set(stats):
        stats = {"mean": stats["dinov3_sp_mean"].reshape(-1), "std": stats["dinov3_sp_std"].reshape(-1)}
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise ValueError(
            f"{source if isinstance(source, (str, os.PathLike)) else 'object'} is not a feature-stats file: expected "
            '{"mean", "std"} (train_dit.py) or {"dinov3_sp_mean", "dinov3_sp_std"} (official dinov3_sp_stats.pt)'
        )
    stats = {k: torch.as_tensor(stats[k]).float().reshape(-1) for k in ("mean", "std")}
    if channels is not None:
        check_feature_stats(stats, channels)
    return stats


def normalize_features(x, stats):
    """z = (x - mean) / std per channel: the space the SiT is trained and sampled in. x [B,C,h,w]."""
    if stats["mean"].numel() != x.shape[1]:
        check_feature_stats(stats, x.shape[1])  # raises the explanatory error
    return (x - stats["mean"].to(x).view(1, -1, 1, 1)) / stats["std"].to(x).view(1, -1, 1, 1)


def denormalize_features(z, stats):
    """x = z * std + mean per channel: back to autoencoder features before decoding. z [B,C,h,w]."""
    if stats["mean"].numel() != z.shape[1]:
        check_feature_stats(stats, z.shape[1])
    return z * stats["std"].to(z).view(1, -1, 1, 1) + stats["mean"].to(z).view(1, -1, 1, 1)


class FeatureStatsAccumulator:
    """Exact streaming per-channel mean / std of features over a dataset, merged across DDP ranks.

    Keeps float64 count, sum and sum of squares per channel (exact for any split of the data
    up to float64 rounding), so ranks merge with one all_reduce. std is the population std.
    """

    def __init__(self, channels, device="cpu"):
        self.channels = channels
        self.moments = torch.zeros(3, channels, dtype=torch.float64, device=device)  # count, sum, sum of squares

    def update(self, x):
        """Add a batch of features x [B, C, h, w]."""
        if x.shape[1] != self.channels:
            raise ValueError(f"features have {x.shape[1]} channels, the statistics were set up for {self.channels}")
        x = x.detach().to(self.moments.device, torch.float64).transpose(0, 1).reshape(self.channels, -1)  # [C, B*h*w]
        self.moments[0] += x.shape[1]
        self.moments[1] += x.sum(dim=1)
        self.moments[2] += x.square().sum(dim=1)

    def result(self):
        """{"mean": [C], "std": [C]} float32 CPU over everything every rank has seen."""
        moments = self.moments.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        count, total, total_sq = moments  # [C] each
        if (count == 0).any():
            raise ValueError("feature statistics over an empty dataset")
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0)
        return {"mean": mean.float().cpu(), "std": var.sqrt().float().cpu()}


# ----------------------------------------------------------------------------------
# Samplers: Euler / Heun ODE with classifier-free guidance (App. A)
# ----------------------------------------------------------------------------------
# The sampler integrates the probability-flow ODE dx_t/dt = v(x_t, t) (Eq. 4) from
# t = 1 (noise) down to t = 0 (data): x_{t - dt} = x_t - dt * v. Euler is first order
# and costs one network evaluation per step (NFE = steps, App. A); Heun is second order
# (NFE = 2 steps - 1: the last step, into t = 0, gets no correction).
# Classifier-free guidance acts on ALL feature channels, v = v_u + w (v_c - v_u), with
# the conditional and unconditional halves in one batched forward. This deliberately
# differs from the DiT lineage's forward_with_cfg, which guides only the first 3
# channels (DiT issue #41): our scales mean what they mean in RAE, REPA and the
# official SVG sampler. w = 1 is the conditional model and skips the unconditional pass.

# heun: the official research sampler's Heun, a trapezoid correction on every step, the last one
# (into t = 0) included: 2 x steps evaluations. heun-edm: EDM's variant (Karras et al. 2022),
# no correction on the last step: 2 x steps - 1 evaluations.
SAMPLER_METHODS = ("euler", "heun", "heun-edm")
# interval: guide only while t_lo <= t <= t_hi (a t-window; the official research code's
# "interval" mode means something else: guide every k-th step)
CFG_MODES = ("constant", "interval")
EDIT_TIME_SHIFT = 1 / 0.4  # App. C "timestep shift 0.4" (official, reversed time)


def ode_time_grid(steps, shift=SAMPLE_TIME_SHIFT, t_start=1.0):
    """Decreasing times t_0 = t_start > ... > t_steps = 0: a uniform grid through time_shift."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"time shift must be a finite number > 0 (1 = no shift), got {shift}")
    # Shifts compose by multiplying a (they scale the odds t / (1 - t)), so 1 / a inverts:
    # the uniform grid starts where the shifted grid reaches t_start.
    u_start = time_shift(t_start, 1 / shift)
    u = np.linspace(u_start, 0.0, steps + 1)  # [steps + 1], float64
    t = time_shift(u, shift)
    t[0], t[-1] = t_start, 0.0  # exact endpoints despite rounding in the shift
    return t.tolist()


def guided_velocity(model, x, t, y, cfg_scale=1.0, null_class=NUM_CLASSES):
    """Classifier-free guidance on all channels: v = v_u + w (v_c - v_u)."""
    B = x.shape[0]  # batch
    t_b = torch.full((B,), t, device=x.device, dtype=x.dtype)  # [B]
    if cfg_scale == 1.0:
        return model(x, t_b, y)  # w = 1 is exactly the conditional model
    y_null = torch.full_like(y, null_class)  # [B]
    v = model(torch.cat([x, x]), torch.cat([t_b, t_b]), torch.cat([y, y_null]))  # [2B, C, h, w]
    v_c, v_u = v.chunk(2)  # 2 x [B, C, h, w]
    return v_u + cfg_scale * (v_c - v_u)


def _check_labels(y, batch, null_class):
    if y.dtype != torch.long or y.shape != (batch,):
        raise ValueError(f"y must be a LongTensor of shape [{batch}], "
                         f"got {y.dtype} {tuple(y.shape)}")
    if batch and (int(y.min()) < 0 or int(y.max()) > null_class):
        raise ValueError(f"class ids must be in [0, {null_class}] ({null_class} = null class), "
                         f"got min {int(y.min())} max {int(y.max())}")


@torch.no_grad()
def sample_ode(model, noise, y, steps, shift=SAMPLE_TIME_SHIFT, method="euler", cfg_scale=1.0,
               cfg_mode="constant", cfg_interval=(0.0, 1.0), zero_init_steps=0,
               null_class=NUM_CLASSES, return_trajectory=False, t_start=1.0, progress=False,
               after_step=None):
    """ODE sampler from x_{t_start} (noise) to x_0 (App. A), with classifier-free guidance.

    model(x [B,C,h,w], t [B], y [B]) -> v [B,C,h,w]. zero_init_steps: CFG-Zero* zero-init
    (Fan et al. 2025; App. A "skips the first step"): the velocity of the first k steps is
    set to 0, so x stays the initial noise while t moves on, and no network is run.
    after_step(i, x) -> x runs after step i (x is then at t_{i+1}); editing uses it.
    Returns x_0 [B,C,h,w], or with return_trajectory the states on the whole time grid
    [steps + 1, B, C, h, w] (ode_time_grid order, x_{t_start} first).
    """
    if method not in SAMPLER_METHODS:
        raise ValueError(f"method must be one of {SAMPLER_METHODS}, got {method!r}")
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number (1 = no guidance), got {cfg_scale}")
    t_lo, t_hi = cfg_interval
    if not 0 <= t_lo <= t_hi <= 1:
        raise ValueError(f"cfg_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {cfg_interval}")
    ts = ode_time_grid(steps, shift, t_start)  # steps + 1 times, decreasing
    if not 0 <= zero_init_steps <= steps:
        raise ValueError(f"zero_init_steps must be in [0, steps={steps}], got {zero_init_steps}")
    _check_labels(y, noise.shape[0], null_class)

    def velocity(x, t):
        inside = cfg_mode == "constant" or t_lo <= t <= t_hi
        return guided_velocity(model, x, t, y, cfg_scale if inside else 1.0, null_class)

    x = noise
    trajectory = [x]
    for i in tqdm(range(steps), desc="sampling", disable=not progress):
        t, t_next = ts[i], ts[i + 1]
        dt = t - t_next  # > 0: time runs 1 -> 0
        if i >= zero_init_steps:  # zero-init steps leave x unchanged (v = 0)
            v = velocity(x, t)
            x_next = x - dt * v  # Euler step
            if method == "heun" or (method == "heun-edm" and t_next > 0):  # trapezoid correction
                x_next = x - dt * 0.5 * (v + velocity(x_next, t_next))
            x = x_next
        if after_step is not None:
            x = after_step(i, x)
        if return_trajectory:
            trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


@torch.no_grad()
def invert_ode(model, x0, y, steps, shift=SAMPLE_TIME_SHIFT, t_end=1.0, null_class=NUM_CLASSES,
               return_trajectory=False):
    """Euler ODE inversion, data -> noise (t: 0 -> t_end), x_{t + dt} = x_t + dt v (App. C).

    Uses the reversed sample_ode time grid, so a trajectory [steps + 1, B, C, h, w] is
    indexed like sample_ode's (entry 0 at t_end, the last entry is x0 at t = 0).
    No guidance: y may be the null class for an unconditional inversion.
    """
    _check_labels(y, x0.shape[0], null_class)
    ts = ode_time_grid(steps, shift, t_end)[::-1]  # increasing, 0 -> t_end
    x = x0
    trajectory = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = guided_velocity(model, x, t, y, 1.0, null_class)
        x = x + (t_next - t) * v  # Euler step up in t
        trajectory.append(x)
    return torch.stack(trajectory[::-1]) if return_trajectory else x


def lerp(x0, x1, lam):
    """Linear interpolation of two noise tensors, Eq. (7)."""
    return (1 - lam) * x0 + lam * x1


def slerp(x0, x1, lam, eps=1e-6):
    """Spherical linear interpolation, Eq. (8); theta from the flattened tensors."""
    a, b = x0.flatten().double(), x1.flatten().double()  # [N], [N]
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = math.acos(float(cos.clamp(-1.0, 1.0)))
    if theta < eps:  # (nearly) parallel: sin(theta) -> 0, Eq. (8) tends to Eq. (7)
        return lerp(x0, x1, lam)
    w0, w1 = math.sin((1 - lam) * theta), math.sin(lam * theta)
    return (w0 * x0 + w1 * x1) / math.sin(theta)  # Eq. (8)


def gaussian_blur_mask(mask, sigma):
    """Separable 2D Gaussian blur of a [B, 1, h, w] mask, replicate-padded at the borders; sigma 0: none."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"blur sigma must be a finite number >= 0 (in feature cells), got {sigma}")
    if sigma == 0:
        return mask
    r = math.ceil(3 * sigma)
    d = torch.arange(-r, r + 1, dtype=mask.dtype, device=mask.device)  # [2r + 1]
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    k = k / k.sum()  # [2r + 1]
    m = F.pad(mask, (r, r, r, r), mode="replicate")  # [B, 1, h + 2r, w + 2r]
    m = F.conv2d(m, k.view(1, 1, 1, -1))  # [B, 1, h + 2r, w]
    return F.conv2d(m, k.view(1, 1, -1, 1))  # [B, 1, h, w]


@torch.no_grad()
def edit_features(model, x0, y, edit_mask, noise, t_edit, steps=100, shift=EDIT_TIME_SHIFT,
                  cfg_scale=4.0, blur_sigma=1.0, source_y=None, null_class=NUM_CLASSES):
    """SDEdit-style class-conditional editing with trajectory inversion (App. C).

    x0 [B,C,h,w] normalised features, edit_mask [B,1,h,w] in {0,1} (1 = regenerate),
    noise [B,C,h,w]. 1) invert x0 to t_edit (Euler, source_y or the null class),
    recording the trajectory; 2) at t_edit put noise where the Gaussian-softened mask
    is on; 3) sample to t = 0 under the new class y, after each step pulling preserved
    cells back to the inverted trajectory with weight
        keep(t) = (t / t_edit) (1 - blur(m)) + (1 - t / t_edit) (1 - m),
    i.e. the soft seam fades linearly in t into the hard box: early steps blend across
    the border, and at t = 0 the cells outside the box are exactly x0.
    """
    if not 0 < t_edit <= 1:
        raise ValueError(f"t_edit must be in (0, 1], got {t_edit}")
    if source_y is None:
        source_y = torch.full_like(y, null_class)
    trajectory = invert_ode(model, x0, source_y, steps, shift, t_edit, null_class,
                            return_trajectory=True)  # [steps + 1, B, C, h, w]
    ts = ode_time_grid(steps, shift, t_edit)
    soft = gaussian_blur_mask(edit_mask, blur_sigma)  # [B, 1, h, w]

    def keep(i):  # weight of the inverted trajectory at t_i, [B, 1, h, w]
        fade = ts[i] / t_edit  # 1 at t_edit -> 0 at t = 0
        return fade * (1 - soft) + (1 - fade) * (1 - edit_mask)

    def pull_back(i, x):  # after step i, x is at t_{i+1}
        return keep(i + 1) * trajectory[i + 1] + (1 - keep(i + 1)) * x

    x = keep(0) * trajectory[0] + (1 - keep(0)) * noise  # App. C: noise in the masked region
    return sample_ode(model, x, y, steps, shift, cfg_scale=cfg_scale, null_class=null_class,
                      t_start=t_edit, after_step=pull_back)


# ----------------------------------------------------------------------------------
# Presets (Table 5) and checkpoint loading
# ----------------------------------------------------------------------------------
SIT_PRESETS = {  # Table 5 (S from the official research configs); in_channels / input_size set per autoencoder
    "SiT-S": SiTConfig(hidden_size=384, depth=12, num_heads=6),
    "SiT-B": SiTConfig(hidden_size=768, depth=12, num_heads=12),
    "SiT-L": SiTConfig(hidden_size=1024, depth=24, num_heads=16),
    "SiT-XL": SiTConfig(hidden_size=1152, depth=28, num_heads=16),
    "SiT-tiny": SiTConfig(hidden_size=128, depth=4, num_heads=4),  # CPU tests and the tiny pipeline
}


def official_sit_config(state_dict):
    """SiTConfig of an official SVG DiT state dict (read from its tensor shapes; reversed time)."""
    for key in ("ln1.weight", "pos_embed", "y_embedder.embedding_table.weight", "blocks.0.attn.q_norm.weight"):
        if key not in state_dict:
            raise KeyError(f"not an official SVG DiT state dict: key {key!r} is missing")
    hidden, in_channels = state_dict["ln1.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    return SiTConfig(
        in_channels=in_channels,
        input_size=math.isqrt(tokens),
        hidden_size=hidden,
        depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
        num_heads=hidden // state_dict["blocks.0.attn.q_norm.weight"].shape[0],
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        reversed_time=True,
    )


def import_official_sit(state_dict, cfg=None):
    """SiT from the official SVG DiT weights (the {"ema": ...} dict's inner state dict), eval mode.

    Renames ln1 -> x_embedder, keeps the first C of the 2C learn_sigma outputs of
    final_layer.linear (the official loss and sampler use only those), checks pos_embed
    against ours, and sets reversed_time (official t=0 is noise and it predicts x_0 - eps).
    """
    inferred = official_sit_config(state_dict)
    cfg = inferred if cfg is None else SiTConfig(**{**asdict(cfg), "reversed_time": True})
    runtime = {"class_dropout_prob", "grad_checkpointing"}  # settings the weights do not determine
    if {k: v for k, v in asdict(cfg).items() if k not in runtime} != {
        k: v for k, v in asdict(inferred).items() if k not in runtime
    }:
        raise ValueError(f"official weights have config {inferred}, which does not match the given {cfg}")
    model = SiT(cfg)
    C = cfg.in_channels
    sd = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            if not torch.allclose(value.float().reshape(model.pos_embed.shape), model.pos_embed, atol=1e-5):
                raise ValueError("official pos_embed differs from the 2D sin-cos table: unexpected checkpoint layout")
            continue
        if key.startswith("final_layer.linear."):
            if value.shape[0] not in (C, 2 * C):
                raise ValueError(f"{key} has {value.shape[0]} outputs, expected {C} or {2 * C} (learn_sigma)")
            value = value[:C]  # learn_sigma: outputs C..2C-1 were never used
        sd[key.replace("ln1.", "x_embedder.", 1) if key.startswith("ln1.") else key] = value
    load_strict(model, sd, "the official SVG DiT checkpoint")
    return model.eval()


def stage2_kind(ckpt, path):
    """"native" (a train_dit.py checkpoint) or "official" (the SVG-XL file {"ema": DiT state dict})."""
    if isinstance(ckpt, dict) and "sit_config" in ckpt:
        return "native"
    if isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict) and "ln1.weight" in ckpt["ema"]:
        return "official"
    raise ValueError(f"{path} is not a stage-2 checkpoint: expected a train_dit.py checkpoint (key 'sit_config') "
                     "or the official SVG-XL file {'ema': DiT state dict}")


def load_generator(path, ae=None, stats=None, trust_pickle=False):
    """(EMA SiT in eval, feature stats, SVGAutoencoder) for sampling, all on CPU and frozen.

    path: a train_dit.py checkpoint (carries everything; ae / stats must be None), or the
    official SVG-XL file {"ema": DiT state dict}, which needs ae = the stage-1 checkpoint it
    was trained with (official Lightning .ckpt or native) and stats = dinov3_sp_stats.pt.
    Files load weights-only (load_checkpoint); weights with NaN / inf are refused (load_strict).
    The autoencoder encodes (editing) with the Eq. (6) mode the SiT's features were made with
    (align_stats of a train_dit.py checkpoint); an official autoencoder encodes with frozen
    statistics once calibrated (calibrate_alignment), which stand in for its training batches.
    """
    ckpt = load_checkpoint(path, "stage-2 checkpoint", trust_pickle)
    if stage2_kind(ckpt, path) == "native":
        if ae is not None or stats is not None:
            raise ValueError(f"{path} is a train_dit.py checkpoint with its own autoencoder and stats; drop ae/stats")
        model = SiT(SiTConfig(**ckpt["sit_config"]))
        load_strict(model, ckpt["ema"], f"the EMA weights of {path}")
        autoencoder = load_autoencoder({"ae_config": ckpt["ae_config"], "ae": ckpt["ae"]})
        autoencoder.align_stats = ckpt.get("align_stats", "batch")  # the Eq. (6) mode its features had
        if "feature_stats" not in ckpt:
            raise ValueError(f"{path} has no feature statistics ('feature_stats': per-channel mean / std of the "
                             "SVG features the SiT was trained on), so samples cannot be denormalised: use a "
                             "checkpoint written by train_dit.py, which stores them")
        stats = load_feature_stats(ckpt["feature_stats"], model.cfg.in_channels)
    else:  # official
        if ae is None or stats is None:
            raise ValueError(
                f"{path} is an official SVG DiT checkpoint: it holds only the diffusion weights. Also pass "
                "ae=<stage-1 checkpoint it was trained with (official SVG autoencoder .ckpt from HF howlin/SVG)> "
                "and stats=<dinov3_sp_stats.pt from the root of github.com/shiml20/SVG>"
            )
        model = import_official_sit(ckpt["ema"])
        autoencoder = load_autoencoder(ae, trust_pickle=trust_pickle)
        stats = load_feature_stats(stats, model.cfg.in_channels)
    if autoencoder.feature_dim != model.cfg.in_channels:
        raise ValueError(
            f"the autoencoder makes {autoencoder.feature_dim}-channel features but the SiT expects "
            f"{model.cfg.in_channels}: pass the stage-1 checkpoint the generator was trained with"
        )
    model.eval().requires_grad_(False)
    return model, stats, autoencoder


# ----------------------------------------------------------------------------------
# Data: image folders, ADM centre crop, a built-in synthetic dataset
# ----------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # matched case-insensitively


WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale PNG / TIFF


def open_image(path, exif_transpose=False):
    """An image file as an 8-bit RGB PIL image, with every failure a ValueError naming the file.

    Modes: RGB as is; L, 1, P, CMYK, YCbCr, LA, RGBA via PIL's convert("RGB") (alpha dropped,
    as torchvision's loader does); 16-bit grayscale (I;16*, I) scaled by 255 / 65535 (convert
    would clip it to white); 16-bit RGB(A) PNGs are read by PIL as 8-bit already. Float images
    (F) are refused. EXIF orientation is ignored unless exif_transpose (ADM / torchvision read
    training and reference images the same way). Pillow's decompression-bomb guard stays on:
    files over Image.MAX_IMAGE_PIXELS are refused, naming the limit.
    """
    try:
        with Image.open(path) as im:
            if exif_transpose:
                from PIL import ImageOps
                im = ImageOps.exif_transpose(im)
            if im.mode in WIDE_GRAY_MODES:
                gray = np.asarray(im).astype(np.float64) * (255 / 65535)  # [H, W] in 0..255
                return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8)).convert("RGB")
            if im.mode == "F":
                raise ValueError("floating-point (mode F) images are not supported: save it as 8- or 16-bit")
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL's documented route for palettes with transparency
            return im.convert("RGB")  # forces the full decode, so truncated files fail here
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {e} Resize the file, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad image files
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from e


def _resize_short_side(pil_image, image_size: int):
    """ADM resize: BOX-halve while the short side is >= 2 * size, then BICUBIC to short side = size."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    return pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM centre crop (Dhariwal & Nichol 2021): resize the short side, crop the centre. HWC uint8."""
    arr = np.array(_resize_short_side(pil_image, image_size))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def random_crop_arr(pil_image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Stage-1 training crop: short side = size by the ADM resize above, then a random window.

    The official trainer uses albumentations' SmallestMaxSize (one cv2 resize) + RandomCrop;
    the resize here is ADM's BOX-halving + BICUBIC instead (same geometry, other filter).
    """
    arr = np.array(_resize_short_side(pil_image, image_size))
    top = int(rng.integers(arr.shape[0] - image_size + 1))
    left = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[top:top + image_size, left:left + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> [3, H, W] float in [-1, 1] (the image convention of this file)."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1  # [3,H,W]


class ImageFolder(torch.utils.data.Dataset):
    """Images on disk for both stages: class sub-folders (ImageNet train) or one flat folder.

    Layout: root/<class>/**/<image> with classes sorted by name -> labels 0..K-1 (like
    torchvision), or root/<image> (label 0). Files are found by extension, case-insensitive.
    crop: "center" = ADM centre crop (stage 2, evaluation), "random" = the official AE
    training crop. flip: random horizontal flip. Random crops and flips are drawn from
    (seed, epoch, index), so they do not depend on workers or world size and resume exactly;
    call set_epoch(e) each epoch. Files are read by open_image (accepted modes there). An
    empty class folder is an error. on_error: "raise" stops at an unreadable file naming it;
    "skip" warns once per file (with its path), counts it in `num_skipped` (over all DataLoader
    workers) and returns the next readable image instead, so an epoch never crashes.
    """

    def __init__(self, root, image_size: int, crop: str = "center", flip: bool = False,
                 on_error: str = "skip", seed: int = 0):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist: pass a folder of class "
                                    f"sub-folders (e.g. imagenet/train) or of images, or 'synthetic'")
        self.root, self.image_size, self.crop, self.flip = root, image_size, crop, flip
        self.on_error, self.seed, self.epoch = on_error, seed, 0
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
        top_files = self.find_images(root, recursive=False)
        if subdirs and top_files:
            raise ValueError(f"{root!r} holds both images and sub-folders: use class sub-folders "
                             f"only (labels by folder) or a flat folder of images (label 0)")
        self.classes = subdirs or [os.path.basename(os.path.normpath(root))]
        if subdirs:
            self.samples = [(p, label) for label, c in enumerate(subdirs)
                            for p in self.find_images(os.path.join(root, c), recursive=True)]
        else:
            self.samples = [(p, 0) for p in top_files]
        if not self.samples:
            raise FileNotFoundError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {root!r}")
        empty = sorted(set(subdirs) - {subdirs[label] for _, label in self.samples}) if subdirs else []
        if empty:
            raise FileNotFoundError(f"class folders without images in {root!r}: {empty[:5]}"
                                    f"{' ...' if len(empty) > 5 else ''} would be classes no image has; "
                                    "remove them or add their images")
        # Skips counted across DataLoader worker processes (shared memory, inherited by workers).
        self._skipped, self._warned = multiprocessing.Value("q", 0), set()

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far, by this process and its DataLoader workers."""
        return self._skipped.value

    @staticmethod
    def find_images(folder, recursive: bool) -> list:
        """Image files (svg.IMAGE_EXTENSIONS, any case) in `folder`, sorted; recursive: sub-folders too."""
        if not recursive:
            names = (e.path for e in os.scandir(folder) if e.is_file())
        else:
            names = (os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
        return sorted(p for p in names if p.lower().endswith(IMAGE_EXTENSIONS))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple:
        """(image [3, H, W] in [-1, 1], label) for one index; raises on an unreadable file."""
        path, label = self.samples[index]
        pil = open_image(path)  # ValueError naming the file
        rng = np.random.default_rng((self.seed, self.epoch, index))
        arr = (random_crop_arr(pil, self.image_size, rng) if self.crop == "random"
               else center_crop_arr(pil, self.image_size))
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr), label

    def __getitem__(self, index: int) -> tuple:
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return self.load(i)
            except (OSError, ValueError) as e:  # open_image names the file
                path = self.samples[i][0]
                if self.on_error == "raise":
                    raise RuntimeError(str(e)) from e
                with self._skipped.get_lock():
                    self._skipped.value += 1
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({e.__cause__ or e}); using the next one")
        raise RuntimeError(f"no readable image in {self.root!r}")


SYNTHETIC_SHAPES = ("disc", "square", "triangle", "stripes", "ring", "cross", "diamond", "checker")
SYNTHETIC_COLOURS = ((-0.6, -0.2, 0.5), (0.9, 0.7, -0.5))  # background (blue), shape (yellow), in [-1, 1]


class SyntheticImages(torch.utils.data.Dataset):
    """A built-in class-labelled image set (no download): one shape type per class.

    Image i has label i % num_classes and shape SYNTHETIC_SHAPES[label], drawn in SYNTHETIC_COLOURS
    (a yellow shape on a blue background), with its position and size (and the stripes' angle and
    period) drawn from (seed, i): the same every time. Two fixed colours, because the tiny tier's
    SiT must learn the shapes in minutes: with a random background gradient and shape colour per
    image, its samples were judged the requested class 60% of the time after 4000 steps and 72.5%
    after 16000 (two colours: 97.5% after 4000; README, tiny tier).
    """

    def __init__(self, num_images: int, image_size: int, num_classes: int = 4, seed: int = 0):
        if not 1 <= num_classes <= len(SYNTHETIC_SHAPES):
            raise ValueError(f"SyntheticImages has {len(SYNTHETIC_SHAPES)} shape classes "
                             f"{SYNTHETIC_SHAPES}; num_classes={num_classes} is out of range")
        self.num_images, self.image_size = num_images, image_size
        self.num_classes, self.seed = num_classes, seed
        self.classes = list(SYNTHETIC_SHAPES[:num_classes])

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng((self.seed, index))
        S = self.image_size
        y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S  # pixel grid i / S in [0, 1)
        angle = rng.uniform(0, 2 * np.pi)  # direction of the stripes
        r = rng.uniform(0.15, 0.35)
        cx, cy = rng.uniform(r, 1 - r, size=2)
        dx, dy = x - cx, y - cy
        shape = SYNTHETIC_SHAPES[label]
        if shape == "disc":
            mask = dx**2 + dy**2 < r**2
        elif shape == "square":
            mask = np.maximum(abs(dx), abs(dy)) < r
        elif shape == "triangle":
            mask = (dy < r) & (abs(dx) < (dy + r) / 2)
        elif shape == "stripes":
            period = rng.uniform(0.08, 0.2)
            mask = np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period) > 0
        elif shape == "ring":
            mask = (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (0.6 * r) ** 2)
        elif shape == "cross":
            mask = (np.minimum(abs(dx), abs(dy)) < r / 3) & (np.maximum(abs(dx), abs(dy)) < r)
        elif shape == "diamond":
            mask = abs(dx) + abs(dy) < r
        else:  # checker
            cell = r / 2
            mask = (np.maximum(abs(dx), abs(dy)) < r) & ((np.floor(dx / cell) + np.floor(dy / cell)) % 2 == 0)
        background, shape_colour = (np.array(c, np.float32)[:, None, None] for c in SYNTHETIC_COLOURS)
        img = np.where(mask[None], shape_colour, background)  # [3,S,S]
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), label  # [3,S,S] in [-1,1]


def build_dataset(spec: str, image_size: int, *, crop: str = "center", flip: bool = False,
                  on_error: str = "skip", seed: int = 0, num_images: int = 1024,
                  num_classes: int = 4):
    """"synthetic" -> SyntheticImages(num_images, image_size, num_classes, seed); else a folder.

    crop/flip/on_error apply to folders; num_images/num_classes to the synthetic set.
    """
    if spec == "synthetic":
        return SyntheticImages(num_images, image_size, num_classes, seed)
    return ImageFolder(spec, image_size, crop=crop, flip=flip, on_error=on_error, seed=seed)


# ----------------------------------------------------------------------------------
# Script plumbing: distributed setup, precision, EMA, resumable sampler, checkpoints
# ----------------------------------------------------------------------------------
PRECISIONS = ("fp32", "tf32", "bf16")  # the one precision switch of every script


def argument_type(name, parse, ok, need):
    """An argparse type: parse(text), refused with "must be <need>" unless ok(value)."""
    def check(text):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value
    check.__name__ = name  # argparse names it in "invalid <name> value"
    return check


positive_int = argument_type("positive_int", int, lambda v: v >= 1, "an integer >= 1")  # sizes, counts, intervals
nonnegative_int = argument_type("nonnegative_int", int, lambda v: v >= 0,
                                "an integer >= 0")  # train_ae --steps 0 writes the initial state (--init-from)
finite_float = argument_type("finite_float", float, math.isfinite, "a finite number")  # no nan / inf
positive_float = argument_type("positive_float", finite_float, lambda v: v > 0, "> 0")  # learning rates, shifts
nonnegative_float = argument_type("nonnegative_float", finite_float, lambda v: v >= 0, ">= 0")


@dataclass
class Dist:
    """Where this process sits in a torchrun job (a single process when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # only rank 0 prints and writes

    @property
    def initialized(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self):
        if self.initialized:
            torch.distributed.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order (a one-element list without a process group)."""
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (the tensor itself without a process group)."""
        if not self.initialized:
            return x
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        return x / self.world_size

    def close(self):
        if self.initialized:
            torch.distributed.destroy_process_group()


def init_distributed() -> Dist:
    """torchrun (env RANK/WORLD_SIZE/LOCAL_RANK) -> a process group, NCCL on CUDA, gloo on CPU.

    Plain `python script.py` -> one process, no process group, cuda:0 if present.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo")
    return Dist(rank, world_size, local_rank, device)


def set_seed(seed: int):
    """Seed python, numpy and torch (CPU and every CUDA device). Scripts pass seed * world + rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_precision(precision: str):
    """fp32: exact fp32 matmuls; tf32 and bf16: TF32 for the fp32 matmuls/convs that remain."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast(precision: str, device):
    """The one autocast context: bf16 autocast for "bf16" (CUDA or CPU), a no-op otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The raw module under DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float):
    """DiT-style EMA: ema = decay * ema + (1 - decay) * model, parameters and float buffers.

    decay = 0 copies the model (the sync done once at start). Integer buffers (BatchNorm's
    num_batches_tracked) are copied. `model` may be DDP / compiled; `ema` is a raw copy.
    """
    src = dict(unwrap(model).named_parameters())
    src.update(unwrap(model).named_buffers())
    dst = dict(ema.named_parameters())
    dst.update(ema.named_buffers())
    if src.keys() != dst.keys():
        raise ValueError(f"EMA and model differ in tensors: {sorted(src.keys() ^ dst.keys())[:5]}")
    floats = [name for name, e in dst.items() if e.is_floating_point()]
    ema_f, model_f = [dst[n] for n in floats], [src[n].detach() for n in floats]
    if decay == 0:
        torch._foreach_copy_(ema_f, model_f)  # the exact sync at start
    else:  # one fused multi-tensor pass instead of two kernels per tensor (~800 for SiT-XL)
        torch._foreach_lerp_(ema_f, model_f, 1 - decay)  # ema + (1 - decay) (model - ema)
    for name, e in dst.items():
        if not e.is_floating_point():
            e.copy_(src[name])


def apply_preset(args, preset: dict):
    """Fill every flag left unset (None) on the command line from the preset's defaults; the
    names filled are recorded in args.preset_defaults (what the user did not choose)."""
    filled = [key for key, value in preset.items() if getattr(args, key, None) is None]
    for key in filled:
        setattr(args, key, preset[key])
    args.preset_defaults = filled
    return args


def check_init_from(parser, args, example_out):
    """App. H: --init-from starts a new run (weights only, step 0) in its own --out; --resume continues one."""
    if args.init_from and args.resume:
        parser.error("--init-from starts a new run from another run's weights (step 0, fresh optimizers); --resume "
                     "continues a run exactly. Pass one of them: --resume to continue this run, --init-from with a "
                     "new --out to start a new one")
    if args.init_from and args.out is None:
        parser.error(f"--init-from starts a new run: give it its own --out (e.g. {example_out}), not the folder of "
                     "the run it starts from")
    if args.init_from and os.path.realpath(args.init_from).startswith(os.path.realpath(args.out) + os.sep):
        parser.error(f"--init-from {args.init_from} lies inside --out {args.out}: a new run needs its own folder "
                     f"(e.g. {example_out}); --overwrite there would delete the file it starts from")


CHECKPOINT_GLOB = "[0-9]" * 7 + ".pt"  # <out>/checkpoints/NNNNNNN.pt, named by step


def latest_checkpoint(out):
    """The newest <out>/checkpoints/NNNNNNN.pt (scripts name checkpoints by step), or None."""
    paths = sorted(glob.glob(os.path.join(out, "checkpoints", CHECKPOINT_GLOB)))
    return paths[-1] if paths else None


def atomic_write(path, write):
    """write(f) into a temp file in the same folder, fsync, then os.replace onto `path`.

    A crash at any point leaves either the old file or the new one, never a partial file
    (a killed writer may leave a `<name>.<random>.tmp`, see remove_stale_tmp). The temp
    name is unique, so concurrent writers never collide, and the file gets the mode an
    ordinary open() would (0666 minus the umask), not mkstemp's 0600.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX; not on Windows)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj, path):
    """torch.save(obj) to `path` atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_tmp(folder):
    """Delete the `*.tmp` files that killed atomic_write calls left in `folder`; returns their names.
    Call it only while no other process writes there (a trainer holding its RunLock)."""
    stale = sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), "*.tmp")))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return stale


def file_sha256(path, chunk=1 << 24):
    """sha256 of a file's bytes: records which weights produced an output, whatever the path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class RunLock:
    """An exclusive lock on an output folder (<out>/run.lock, flock) held while a run writes there.

    A second run on the same folder is refused with the holder's pid and host. The operating
    system drops the lock when the holder exits, even on kill -9, so `--resume auto` after a
    crash just works. A lock taken again in the same process (tests calling main() twice)
    replaces the earlier one.
    """

    FILE = "run.lock"
    _held = {}  # path -> open file, this process's locks

    def __init__(self, out):
        import fcntl  # POSIX; this project runs on Linux / macOS
        self.path = os.path.abspath(os.path.join(out, self.FILE))
        os.makedirs(out, exist_ok=True)
        old = RunLock._held.pop(self.path, None)
        if old is not None:
            old.close()
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown pid"
            f.close()
            raise RuntimeError(f"{out!r} is in use by another run ({holder}; lock file {self.path}): wait for "
                               "it to finish, stop it, or pick another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        RunLock._held[self.path] = self.file = f

    def release(self):
        if RunLock._held.get(self.path) is self.file:
            del RunLock._held[self.path]
        self.file.close()  # closing drops the flock


def claim_output(out, fresh, overwrite, log):
    """Lock <out> (RunLock) for this run and clean up after killed saves. A fresh run (one that
    writes checkpoints without resuming) into a folder holding another run's checkpoints is
    refused, since same-step files would be replaced and `--resume auto` would then mix the two
    runs; overwrite=True deletes those checkpoints first. Returns the lock (.release() at the end)."""
    lock = RunLock(out)
    folder = os.path.join(out, "checkpoints")
    for path in remove_stale_tmp(folder):
        log(f"removed {path}: a partial checkpoint of a killed save")
    old = sorted(glob.glob(os.path.join(glob.escape(folder), CHECKPOINT_GLOB)))
    if old and fresh:
        if not overwrite:
            lock.release()
            raise FileExistsError(
                f"{out!r} already holds checkpoints of another run ({os.path.basename(old[0])} .. "
                f"{os.path.basename(old[-1])}): continue it with --resume auto, pick another --out, or pass "
                "--overwrite to delete them and start fresh")
        for path in old:
            os.remove(path)
        log(f"--overwrite: deleted {len(old)} checkpoints of an earlier run in {folder}")
    return lock


def resume_lr(args, optimizers, log):
    """After an optimizer state is loaded on resume: an explicit --lr replaces the checkpoint's in
    every param group; without one (args.preset_defaults, apply_preset) the checkpoint's lr goes
    on. Either way args.lr then records the lr in use."""
    old = optimizers[0].param_groups[0]["lr"]
    if "lr" in args.preset_defaults:
        args.lr = old
    elif args.lr != old:
        log(f"--lr {args.lr} replaces the checkpoint's lr {old}")
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = args.lr


def skipped_note(dataset):
    """' | N unreadable images skipped so far' for a log line once an ImageFolder skipped any, else ''."""
    skipped = getattr(dataset, "num_skipped", 0)
    return f" | {skipped} unreadable images skipped so far (rank 0)" if skipped else ""


def resume_checkpoint(resume, out, log, what="checkpoint", trust_pickle=False):
    """(path, checkpoint dict) to resume from, or (None, None) for a fresh run.

    resume: None, a path, or "auto" = the newest readable <out>/checkpoints/NNNNNNN.pt; an
    unreadable newest one (a damaged disk, a copy cut short) is reported and the one before
    it is tried.
    """
    if resume is None:
        return None, None
    if resume != "auto":
        return resume, load_checkpoint(resume, what, trust_pickle)
    paths = sorted(glob.glob(os.path.join(glob.escape(out), "checkpoints", CHECKPOINT_GLOB)))
    if not paths:
        log(f"--resume auto: no checkpoint in {out}/checkpoints, starting fresh")
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path, what, trust_pickle)
        except ValueError as e:
            log(f"--resume auto: skipping {path}: {e}")
    if paths:
        raise ValueError(f"--resume auto: none of the {len(paths)} checkpoints in {out}/checkpoints is readable")
    return None, None


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA), loadable with weights_only."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableSampler(torch.utils.data.Sampler):
    """Distributed sampler whose data order is a function of (seed, epoch) and resumes exactly.

    Epoch e visits a permutation of the dataset drawn from seed + e. Rank r takes positions
    r, r + W, r + 2W, ... of it, so with per-rank batch b = G / W the k-th global batch is
    always permutation positions [kG, (k+1)G): the same images for any world size W.
    drop_last=True trims the permutation to a multiple of W; False pads it by wrapping.

    The DataLoader reads indices ahead of training, so progress is reported by the loop:
    call `advance(n)` after each consumed per-rank batch of n items, and `set_epoch(e + 1)`
    when an epoch's loader is exhausted. `state_dict()` then holds the exact next batch.
    """

    def __init__(self, num_items: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if num_items < world_size:
            raise ValueError(f"{num_items} items cannot be split over {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_items, self.world_size, self.rank = num_items, world_size, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_samples = (num_items // world_size if drop_last  # per rank, per epoch
                            else math.ceil(num_items / world_size))
        self.epoch, self.position = 0, 0

    def indices(self) -> list:
        """This rank's indices for the current epoch, from its start."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.world_size
        order = (order * math.ceil(total / self.num_items))[:total]  # trim or wrap-pad
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.position:])

    def __len__(self) -> int:
        return self.num_samples - self.position

    def set_epoch(self, epoch: int):
        self.epoch, self.position = epoch, 0

    def advance(self, n: int):
        self.position += n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict):
        """Resume at the next batch; a different world size continues at the same global batch."""
        if (state["seed"], state["num_items"]) != (self.seed, self.num_items):
            raise ValueError(
                f"sampler state is for seed {state['seed']} / {state['num_items']} items, this run "
                f"has seed {self.seed} / {self.num_items} items: resume with the same data and seed")
        consumed = state["position"] * state["world_size"]  # global items consumed this epoch
        if consumed % self.world_size:
            raise ValueError(f"cannot resume {consumed} consumed items on {self.world_size} ranks: "
                             f"use a world size that divides it (it was {state['world_size']})")
        self.epoch, self.position = state["epoch"], consumed // self.world_size


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 pixels, same shape and device: floor(127.5 x + 128) as DiT's sample export.

    The one quantisation of the project: PNGs, the FID export (sample.py) and the uint8
    images the metrics see (eval.py) all go through it.
    """
    return (127.5 * images.detach().float().clamp(-1, 1) + 128).clamp(0, 255).to(torch.uint8)


def save_image_grid(rows, path, pad: int = 2):
    """Write images in [-1, 1] as one PNG: `rows` is a list of [N, 3, H, W] tensors, one per row."""
    rows = [to_uint8(r).cpu() for r in rows]
    N, _, H, W = rows[0].shape
    grid = torch.full((3, len(rows) * (H + pad) + pad, N * (W + pad) + pad), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            grid[:, top:top + H, left:left + W] = im
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # [H_grid, W_grid, 3]
