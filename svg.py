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
import tempfile
import warnings
from PIL import Image

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
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # = 2 * IMAGENET_MEAN - 1: ImageNet normalisation of (x+1)/2
LPIPS_SCALE = (0.458, 0.448, 0.450)  # = 2 * IMAGENET_STD
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # torchvision vgg16.features indices of relu1_2, 2_2, 3_3, 4_3, 5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_HEADS_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/"
                   "lpips/weights/v0.1/vgg.pth")


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk (Zhang et al. 2018): the perceptual loss and metric (App. A).

    d(x, y) = sum_l mean_hw( w_l . (n_l(x) - n_l(y))^2 ), n_l = VGG16 activations at tap l
    unit-normalised over channels. Always frozen and in eval mode. The official heads are
    Dropout(0.5) + 1x1 conv and taming/LDM train with that dropout active (Lightning calls
    .train() on the loss module); we keep eval so the loss is deterministic and is exactly
    the LPIPS metric (the lpips package also builds it in eval mode by default).
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
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never in train mode

    def taps(self, x: torch.Tensor) -> list:
        """VGG16 activations at the five LPIPS taps for images in [-1, 1]."""
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h.float())  # [B, C_l, H/2^l, W/2^l]; the distance in fp32
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image, [B], for x, y [B, 3, H, W] in [-1, 1]."""
        n = x.shape[0]
        f = self.taps(torch.cat([x, y]))  # one trunk pass for both
        d = 0
        for f_l, lin in zip(f, self.lins):
            f_l = f_l / (f_l.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # eps outside the sqrt
            d = d + lin((f_l[:n] - f_l[n:]).pow(2)).mean((1, 2, 3))  # [B]
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
    return torch.load(path, map_location="cpu", weights_only=True)


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
    mse = (x.float() - y.float()).pow(2).mean((1, 2, 3))
    return 10 * torch.log10(4 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image, [B] (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K = (0.01, 0.03).

    Images in [-1, 1] (data range 2, the same constants as 255 on uint8); each channel
    separately with 'valid' filtering (no padding), averaged over pixels and channels.
    """
    x, y = x.float(), y.float()
    C = x.shape[1]
    g = torch.exp(-(torch.arange(window, dtype=torch.float32, device=x.device) - window // 2) ** 2
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

    3 stride-2/1 conv layers with BatchNorm and LeakyReLU(0.2), ndf 64: 70x70 receptive field,
    one real/fake logit per patch ([B, 1, 30, 30] for 256 px). Keys main.{0,2,3,5,...,11}.*
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


def adaptive_weight(nll, g_loss, last_layer: torch.Tensor, disc_weight: float = DISC_WEIGHT):
    """LDM's GAN balance ||grad_W nll|| / (||grad_W g|| + 1e-4), clamped [0, 1e4], detached, x 0.5.

    W is the decoder's last conv weight. Gradients are this process's (as officially under DDP).
    """
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = g_nll.norm() / (g_gan.norm() + 1e-4)
    return w.clamp(0, ADAPTIVE_WEIGHT_MAX).detach() * disc_weight


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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # matched case-insensitively


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
    """The official AE training crop (SmallestMaxSize + RandomCrop): short side = size, random window."""
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
    call set_epoch(e) each epoch. on_error: "raise" stops at an unreadable file naming it;
    "skip" warns once per file (with its path), counts it in `num_skipped` (per DataLoader
    worker process) and returns the next readable image instead, so an epoch never crashes.
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
        top_files = self._find(root, recursive=False)
        if subdirs and top_files:
            raise ValueError(f"{root!r} holds both images and sub-folders: use class sub-folders "
                             f"only (labels by folder) or a flat folder of images (label 0)")
        self.classes = subdirs or [os.path.basename(os.path.normpath(root))]
        if subdirs:
            self.samples = [(p, label) for label, c in enumerate(subdirs)
                            for p in self._find(os.path.join(root, c), recursive=True)]
        else:
            self.samples = [(p, 0) for p in top_files]
        if not self.samples:
            raise FileNotFoundError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {root!r}")
        self.num_skipped, self._warned = 0, set()

    @staticmethod
    def _find(folder, recursive: bool) -> list:
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
        with Image.open(path) as im:
            pil = im.convert("RGB")  # forces the full decode, so truncated files fail here
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
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad image files
                path = self.samples[i][0]
                if self.on_error == "raise":
                    raise RuntimeError(f"cannot read image {path!r}: {e}") from e
                self.num_skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({e}); using the next one")
        raise RuntimeError(f"no readable image in {self.root!r}")


SYNTHETIC_SHAPES = ("disc", "square", "triangle", "stripes", "ring", "cross", "diamond", "checker")


class SyntheticImages(torch.utils.data.Dataset):
    """A built-in class-labelled image set (no download): one shape type per class.

    Image i has label i % num_classes and shape SYNTHETIC_SHAPES[label], with its colours,
    position, size and background gradient drawn from (seed, i): the same every time.
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
        y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S  # pixel centres in [0, 1)
        c0, c1, fg = rng.uniform(-1, 1, size=(3, 3)).astype(np.float32)  # two bg colours, shape colour
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5) + 0.71) / 1.42  # in [0, 1]
        img = c0[:, None, None] + (c1 - c0)[:, None, None] * ramp  # [3,S,S] background gradient
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
        img = np.where(mask[None], fg[:, None, None], img)
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
    for name, e in dst.items():
        if e.is_floating_point():
            e.mul_(decay).add_(src[name].detach(), alpha=1 - decay)
        else:
            e.copy_(src[name])


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, fsync, then os.replace onto `path`.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
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


def save_image_grid(rows, path, pad: int = 2):
    """Write images in [-1, 1] as one PNG: `rows` is a list of [N, 3, H, W] tensors, one per row."""
    rows = [((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for r in rows]
    N, _, H, W = rows[0].shape
    grid = torch.full((3, len(rows) * (H + pad) + pad, N * (W + pad) + pad), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            grid[:, top:top + H, left:left + W] = im
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # [H_grid, W_grid, 3]
