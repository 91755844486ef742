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
# <<foundation: building blocks>>


# ----------------------------------------------------------------------------------
# DINOv3 ViT: the frozen semantic encoder F_D (Sec. 3.3, Fig. 3)
# ----------------------------------------------------------------------------------
# <<foundation: dinov3>>


# ----------------------------------------------------------------------------------
# Residual encoder F_R and distribution alignment (Sec. 3.3, Eq. 6)
# ----------------------------------------------------------------------------------
# <<foundation: residual encoder and alignment>>


# ----------------------------------------------------------------------------------
# SVG decoder: the LDM / VA-VAE convolutional decoder (Sec. 3.3)
# ----------------------------------------------------------------------------------
# <<foundation: decoder>>


# ----------------------------------------------------------------------------------
# SVG autoencoder: DINO + residual encoder + decoder (Fig. 3)
# ----------------------------------------------------------------------------------
# <<foundation: autoencoder and official import>>


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


class SiTMlp(nn.Module):
    """Transformer MLP (timm Mlp): Linear -> tanh-GELU -> Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning: shift, scale, gate for attention and for the MLP."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SiTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SiTMlp(dim, int(dim * mlp_ratio))
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


class SiT(nn.Module):
    """SVG diffusion transformer (Sec. 3.3): SiT / DiT with QK-Norm on SVG feature tokens, patch size 1."""

    def __init__(self, cfg: SiTConfig):
        super().__init__()
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
        cfg = self.cfg
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
        v = self.final_layer(x, c).transpose(1, 2).reshape(B, C, h, w)  # [B, N, C] -> [B, C, h, w]
        return -v if cfg.reversed_time else v


# ----------------------------------------------------------------------------------
# Flow matching (Eq. 3-5) and feature normalisation
# ----------------------------------------------------------------------------------
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


def flow_matching_loss(model, x0, y, shift=TRAIN_TIME_SHIFT, t=None, eps=None, drop_labels=None):
    """Flow matching loss, Eq. (3)-(5) with lambda(t) = 1: mean squared error of the velocity.

    x0 [B,C,h,w] normalised features, y [B] labels. t [B], eps [B,C,h,w] and drop_labels [B]
    (bool, labels -> null class) are drawn here from the global RNG unless given; the
    training script passes them to make the randomness a function of the global sample.
    """
    if t is None:
        t = sample_training_time(x0.shape[0], shift, x0.device)
    if eps is None:
        eps = torch.randn_like(x0)
    t_ = t.view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    x_t = (1 - t_) * x0 + t_ * eps  # Eq. (3)
    v = eps - x0  # Eq. (4)
    v_pred = model(x_t, t, y) if drop_labels is None else model(x_t, t, y, drop_labels)
    return F.mse_loss(v_pred.float(), v.float())  # Eq. (5)


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
    stats = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, os.PathLike)) else source
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
# <<sampling: samplers>>


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
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_generator(path, ae=None, stats=None):
    """(EMA SiT in eval, feature stats, SVGAutoencoder) for sampling, all on CPU and frozen.

    path: a train_dit.py checkpoint (carries everything; ae / stats must be None), or the
    official SVG-XL file {"ema": DiT state dict}, which needs ae = the stage-1 checkpoint it
    was trained with (official Lightning .ckpt or native) and stats = dinov3_sp_stats.pt.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own / the authors' files
    if isinstance(ckpt, dict) and "sit_config" in ckpt:
        if ae is not None or stats is not None:
            raise ValueError(f"{path} is a train_dit.py checkpoint with its own autoencoder and stats; drop ae/stats")
        model = SiT(SiTConfig(**ckpt["sit_config"]))
        model.load_state_dict(ckpt["ema"], strict=True)
        autoencoder = load_autoencoder({"ae_config": ckpt["ae_config"], "ae": ckpt["ae"]})
        stats = load_feature_stats(ckpt["feature_stats"], model.cfg.in_channels)
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict) and "ln1.weight" in ckpt["ema"]:
        if ae is None or stats is None:
            raise ValueError(
                f"{path} is an official SVG DiT checkpoint: it holds only the diffusion weights. Also pass "
                "ae=<stage-1 checkpoint it was trained with (official SVG autoencoder .ckpt from HF howlin/SVG)> "
                "and stats=<dinov3_sp_stats.pt from the root of github.com/shiml20/SVG>"
            )
        model = import_official_sit(ckpt["ema"])
        autoencoder = load_autoencoder(ae)
        stats = load_feature_stats(stats, model.cfg.in_channels)
    else:
        raise ValueError(
            f"{path} is not a stage-2 checkpoint: expected a train_dit.py checkpoint (key 'sit_config') "
            "or the official SVG-XL file {'ema': DiT state dict}"
        )
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
# <<stage1: data>>


# ----------------------------------------------------------------------------------
# Script plumbing: distributed setup, precision, EMA, resumable sampler, checkpoints
# ----------------------------------------------------------------------------------
# <<stage1: plumbing>>
