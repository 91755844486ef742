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
from tqdm import tqdm

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
# <<stage2: sit>>


# ----------------------------------------------------------------------------------
# Flow matching (Eq. 3-5) and feature normalisation
# ----------------------------------------------------------------------------------
# <<stage2: flow matching and feature stats>>


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

SAMPLER_METHODS = ("euler", "heun")
CFG_MODES = ("constant", "interval")  # interval: guide only while t_lo <= t <= t_hi
EDIT_TIME_SHIFT = 1 / 0.4  # App. C "timestep shift 0.4" (official, reversed time)


def time_shift(t, a):
    """SD3-style time shift in this file's convention: t' = a t / (1 + (a - 1) t)."""
    return a * t / (1 + (a - 1) * t)


def ode_time_grid(steps, shift=SAMPLE_TIME_SHIFT, t_start=1.0):
    """Decreasing times t_0 = t_start > ... > t_steps = 0: a uniform grid through time_shift."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
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
            if method == "heun" and t_next > 0:  # trapezoid correction, none into t = 0
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
    """Separable 2D Gaussian blur of a [B, 1, h, w] mask, replicate-padded at the borders."""
    if sigma <= 0:
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
# <<stage2: presets and loading>>


# ----------------------------------------------------------------------------------
# Data: image folders, ADM centre crop, a built-in synthetic dataset
# ----------------------------------------------------------------------------------
# <<stage1: data>>


# ----------------------------------------------------------------------------------
# Script plumbing: distributed setup, precision, EMA, resumable sampler, checkpoints
# ----------------------------------------------------------------------------------
# <<stage1: plumbing>>
