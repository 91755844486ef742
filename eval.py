"""Evaluation for SVG (arXiv 2510.15301, Sec. 4.1, Tables 1-4, App. B).

    torchrun --nproc_per_node=8 eval.py fid --samples samples.npz \
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 eval.py recon --ae ae.pt --data /imagenet/val \
        --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth --inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 eval.py probe --ae ae.pt --data /imagenet/train --val-data /imagenet/val
    python eval.py bench-fid
    python eval.py shapes --ckpt runs/dit_tiny/checkpoints/0002000.pt    # the tiny tier's number

Sections, top to bottom: the FID InceptionV3 -> image sources -> DDP-aware feature
extraction -> metrics (Frechet distance, Inception Score, precision/recall, PSNR, SSIM)
-> reference statistics -> reconstruction evaluation -> linear probe -> the synthetic-shapes
score of the tiny tier -> CLI.

Conventions, stated once here:
- The Inception network is pytorch-fid's port of the 2015 TensorFlow FID graph
  (Heusel et al. 2017; weights `pt_inception-2015-12-05-6726825d.pth`). Its input is
  RGB in [0, 1] (or uint8), resized FIRST to 299x299 (bilinear, align_corners=False,
  no antialias) and then scaled to [-1, 1]. Features are pool3 (2048-d); the Inception
  Score uses the 1008 logits without the fc bias. PyTorch-Inception FID differs from
  the TensorFlow ADM evaluator by a few hundredths (see the README).
- Every statistic (mean, covariance, Frechet distance, IS) is computed in float64;
  covariances are unbiased (N - 1).
- Images that are scored are uint8, as they would be saved to PNG / npz:
  u = round((x + 1) * 127.5) clamped to [0, 255] for x in [-1, 1].
- Inception Score: 10 contiguous, unshuffled splits (= ADM's 5000-image chunks at 50k).
- Linear probe: the spatial mean of the SVG feature map (mean-pooled patch tokens), DINO-only
  = its first dino_dim channels, SVG = all channels; no CLS token, as SVG has none.
- Shapes score (tiny tier, no Inception weights needed): a small CNN (ShapeJudge) trained on
  the fly on real synthetic shapes names the class of each sample; the score is the share
  of samples judged to be the requested class, plus the Frechet distance between the judge's
  pooled features of samples and of real images (other images than those it trained on).
- gFID uses ADM's reference batch (`VIRTUAL_imagenet256_labeled.npz`, mu/sigma computed
  by the TF evaluator on ImageNet train). rFID uses the 256x256 ADM centre crops of the
  validation images as reference, never the VIRTUAL batch.
"""

import argparse
import hashlib
import json
import math
import os
import time
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import svg
from sample import decode, sample_noise  # the shapes score samples exactly as sample.py does

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_SIZE = 299  # TF FID graph input resolution
INCEPTION_RESIZE = "bilinear to 299x299, align_corners=False, no antialias, before scaling to [-1, 1] (pytorch-fid)"
IS_SPLITS = 10  # Inception Score splits (Salimans et al. 2016; ADM: 5000-image chunks of 50k)
PROBE_LR, PROBE_WEIGHT_DECAY = 5e-4, 1e-2  # App. B linear classifier, AdamW
PR_NEIGHBOURS = 3  # k of the improved precision/recall manifolds (Kynkaanniemi et al. 2019, ADM)


# ----------------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid's port of the TF graph; torchvision Inception3 names)
# ----------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """Inception unit: conv without bias, BatchNorm (eps 1e-3, as TF), ReLU."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """TF's 3x3 average pool: padding is excluded from the mean (FID-specific)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)  # [B, 224 + pool_features, 35, 35]


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)  # [B, 768, 17, 17]


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17): factorised 7x7 branches."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)  # [B, 768, 17, 17]


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # [B, 1280, 8, 8]


class InceptionE(nn.Module):
    """Mixed_7b/c (8x8): expanded filter banks; Mixed_7c pools with max (TF graph quirk)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool  # "avg" for Mixed_7b, "max" for Mixed_7c
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # [B, 768, 8, 8]
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # [B, 768, 8, 8]
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)  # [B, 2048, 8, 8]


class FIDInceptionV3(nn.Module):
    """The FID / IS feature network (TF 2015 InceptionV3 graph as ported by pytorch-fid)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes; only its weight is used (IS)

    def preprocess(self, images):
        """uint8 or [0, 1] float [B, 3, H, W] -> [-1, 1] float [B, 3, 299, 299]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255
        else:
            x = images.float()
            lo, hi = x.aminmax()
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"Inception expects float images in [0, 1] (or uint8), got range [{lo:.3f}, {hi:.3f}]; "
                    "convert [-1, 1] images with (x + 1) / 2"
                )
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1  # [B, 3, 299, 299]

    def forward(self, images):
        """Return pool3 features [B, 2048] and the unbiased logits [B, 1008] (IS)."""
        x = self.preprocess(images)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))  # [B, 64, 73, 73]
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # [B, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B, 288, 35, 35]
        x = self.Mixed_6a(x)  # [B, 768, 17, 17]
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # [B, 768, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 2048, 8, 8]
        pool3 = self.avgpool(x).flatten(1)  # [B, 2048]
        logits = pool3 @ self.fc.weight.T  # [B, 1008], no bias (TF softmax/logits/MatMul)
        return pool3, logits


def load_inception(path=None):
    """Strictly load pytorch-fid's FID Inception weights (eval, frozen).

    A local path is always used as given. Without one, the file is fetched from the
    pytorch-fid GitHub release into the torch hub cache (or read from that cache).
    """
    if path is None:
        try:
            state = torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu", progress=True)
        except Exception as e:
            raise RuntimeError(
                f"could not download the FID Inception weights ({type(e).__name__}: {e}). Fetch "
                f"{INCEPTION_URL} on a machine with internet and pass it with --inception /path/to/{INCEPTION_FILE}"
            ) from e
        source = INCEPTION_URL
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Download {INCEPTION_URL} "
                f"and pass the file with --inception /path/to/{INCEPTION_FILE}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        source = path
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RuntimeError(
            f"{source} is not pytorch-fid's {INCEPTION_FILE} state dict: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise RuntimeError(f"{source}: shape mismatch in {bad[:10]}")
    model.load_state_dict(state, strict=True)
    model.weights_name = os.path.basename(source)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------
# Image sources: ADM-style .npz (arr_0 uint8 NHWC) or a folder of PNG / JPEG
# ----------------------------------------------------------------------------------
def _npz_member_offset(path, name):
    """Byte offset of an uncompressed member's .npy data in an .npz, or None."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        return info.header_offset + 30 + name_len + extra_len


def open_npz_array(path, key="arr_0"):
    """Memory-map an array in an .npz written by np.savez (loads it when compressed)."""
    with np.load(path) as data:
        if key not in data.files:
            raise KeyError(f"{path} has no '{key}' array (found {data.files}); "
                           "samples must be saved as arr_0 uint8 NHWC")
    offset = _npz_member_offset(path, key + ".npy")
    if offset is None:
        return np.load(path)[key]
    with open(path, "rb") as f:
        f.seek(offset)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        data_start = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=data_start)


class NpzImages(torch.utils.data.Dataset):
    """Images of an ADM-style .npz: `arr_0` uint8 [N, H, W, 3] (what sample.py writes)."""

    def __init__(self, path):
        self.path = path
        self.images = open_npz_array(path)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"{path}: arr_0 must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}"
            )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # [3, H, W] uint8


class FolderImages(torch.utils.data.Dataset):
    """Image files under a folder (svg.IMAGE_EXTENSIONS), uncropped, as uint8 [3, H, W] (samples)."""

    def __init__(self, root):
        self.path = root
        self.files = svg.ImageFolder.find_images(root, recursive=True)  # svg.IMAGE_EXTENSIONS, sorted
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(svg.IMAGE_EXTENSIONS)} images under {root}")
        with Image.open(self.files[0]) as im:
            self.size = im.size  # every sample must share it (batches are stacked)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            if im.size != self.size:
                raise ValueError(f"{self.files[i]} is {im.size[0]}x{im.size[1]} but {self.files[0]} is "
                                 f"{self.size[0]}x{self.size[1]}: samples for FID must all have one size")
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # [3, H, W] uint8


def open_images(path):
    """An ADM-style .npz or a folder of images, as a dataset of uint8 [3, H, W]."""
    if os.path.isdir(path):
        return FolderImages(path)
    if path.endswith(".npz") and os.path.isfile(path):
        return NpzImages(path)
    raise FileNotFoundError(f"{path} is neither a folder of PNG/JPEG images nor an existing .npz file")


# ----------------------------------------------------------------------------------
# DDP-aware extraction: each rank a strided slice, gathered back in dataset order
# ----------------------------------------------------------------------------------
def rank_slice(dataset, dist):
    """Items rank, rank + W, rank + 2W, ... of a dataset."""
    return torch.utils.data.Subset(dataset, range(dist.rank, len(dataset), dist.world_size))


def gather_strided(x, dist, n):
    """Concatenate per-rank rows of strided slices back into dataset order: [n, ...]."""
    if dist.world_size == 1:
        return x
    per_rank = math.ceil(n / dist.world_size)
    x = torch.cat([x, x.new_zeros(per_rank - len(x), *x.shape[1:])])  # [per_rank, ...]
    parts = [torch.empty_like(x) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, x.contiguous())
    rows = torch.stack(parts, 1)  # [per_rank, W, ...]: row j of rank r is item j * W + r
    return rows.flatten(0, 1)[:n]  # [n, ...]; padding lands after index n


def loader(dataset, batch_size, num_workers):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


@torch.no_grad()
def inception_features(dataset, inception, dist, batch_size=100, num_workers=4, desc="inception"):
    """pool3 [N, 2048] and unbiased logits [N, 1008] (float32, CPU) of uint8 image datasets."""
    pool3, logits = [], []
    for images in tqdm(loader(rank_slice(dataset, dist), batch_size, num_workers), desc=desc, disable=not dist.is_main):
        p, l = inception(images.to(dist.device))
        pool3.append(p.float())
        logits.append(l.float())
    pool3 = gather_strided(torch.cat(pool3), dist, len(dataset))
    logits = gather_strided(torch.cat(logits), dist, len(dataset))
    return pool3.cpu(), logits.cpu()


# ----------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------
def feature_statistics(features, device="cpu"):
    """mu [D] and unbiased covariance [D, D] in float64 (numpy) of features [N, D]; the GEMM runs on `device`."""
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    f = torch.as_tensor(features, device=device).double()
    mu = f.mean(0)  # [D]
    centred = f - mu  # [N, D]
    sigma = centred.T @ centred / (len(f) - 1)  # [D, D], unbiased
    return mu.cpu().numpy(), sigma.cpu().numpy()


def trace_sqrt_product_eigh(sigma1, sigma2):
    """tr sqrt(S1 S2) = sum sqrt(eig(R^T S2 R)) for any R with R R^T = S1 (symmetric PSD form).

    R is the Cholesky factor of S1 (or its eigen square root when S1 is singular, e.g.
    fewer images than 2048); negative round-off eigenvalues are clipped to 0.
    """
    try:
        r = np.linalg.cholesky(sigma1)  # [D, D], S1 = R R^T
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma1)
        r = v * np.sqrt(np.clip(w, 0, None))  # [D, D], S1 = R R^T
    m = r.T @ sigma2 @ r  # [D, D], symmetric, same eigenvalues as S1 S2
    return np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum()


def trace_sqrt_product_sqrtm(sigma1, sigma2, eps=1e-6):
    """tr sqrtm(S1 S2) as in TTUR / pytorch-fid / ADM (scipy.linalg.sqrtm)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        print(f"FID: sqrtm(S1 S2) is singular; adding {eps} to the diagonals of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return np.trace(covmean)


def frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh"):
    """FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) (Heusel et al. 2017), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"FID statistics disagree: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    trace_sqrt = {"eigh": trace_sqrt_product_eigh, "sqrtm": trace_sqrt_product_sqrtm}[method]
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt(sigma1, sigma2))


def inception_score(logits, splits=IS_SPLITS):
    """IS = exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous chunks, float64 (mean, std).

    Split i is images [i N / splits, (i + 1) N / splits) in the given order, without
    shuffling: for N = 50k this is exactly the ADM evaluator's 5000-image chunks.
    """
    log_p = torch.as_tensor(logits).double().log_softmax(1)  # [N, 1008]
    n = len(log_p)
    if n < splits:
        raise ValueError(f"Inception Score needs at least {splits} images for {splits} splits, got {n}")
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]  # [n_i, 1008]
        log_marginal = part.exp().mean(0).log()  # [1008], log p(y)
        kl = (part.exp() * (part - log_marginal)).sum(1)  # [n_i]
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def pairwise_sq_dists(a, b):
    """Squared Euclidean distances [Na, Nb] of rows of a [Na, D] and b [Nb, D]."""
    d = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T  # [Na, Nb]
    return d.clamp_min(0)


def manifold_radii(features, k=PR_NEIGHBOURS, batch_size=5000):
    """Squared distance of each feature to its k-th nearest neighbour in the set, self excluded."""
    if len(features) <= k:
        raise ValueError(f"precision/recall needs more than k={k} feature vectors, got {len(features)}")
    radii = [
        pairwise_sq_dists(features[i : i + batch_size], features).kthvalue(k + 1, dim=1).values  # self is the 1st
        for i in range(0, len(features), batch_size)
    ]
    return torch.cat(radii)  # [N]


def fraction_in_manifold(queries, features, radii, batch_size=5000):
    """Share of queries within radius of at least one manifold feature."""
    inside = [
        (pairwise_sq_dists(queries[i : i + batch_size], features) <= radii).any(1)
        for i in range(0, len(queries), batch_size)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=PR_NEIGHBOURS, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on pool3, as ADM's ManifoldEstimator."""
    real = torch.as_tensor(real, device=device).float()
    fake = torch.as_tensor(fake, device=device).float()
    precision = fraction_in_manifold(fake, real, manifold_radii(real, k))
    recall = fraction_in_manifold(real, fake, manifold_radii(fake, k))
    return precision, recall


def psnr_ssim(u_x, u_rec):
    """Per-image PSNR [B] and SSIM [B] of uint8 images [B, 3, H, W] in the uint8 convention.

    svg.psnr / svg.ssim (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, per RGB channel,
    valid positions, population variances; pytorch-msssim's `ssim(data_range=255)` and
    skimage's `structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    data_range=255)`) use data range 2 on [-1, 1] images, which svg.ssim scores on [0, 2]:
    exactly SSIM on [0, 255] with data range 255. PSNR is 10 log10(255^2 / MSE).
    """
    x, rec = u_x.float() / 127.5 - 1, u_rec.float() / 127.5 - 1  # [B, 3, H, W] in [-1, 1]
    return svg.psnr(x, rec).double(), svg.ssim(x, rec).double()


# ----------------------------------------------------------------------------------
# Reference statistics: ADM reference batch, or computed from images and cached
# ----------------------------------------------------------------------------------
def source_identity(path):
    """A string that changes when a file or a folder's images change (name, size, mtime)."""
    if os.path.isdir(path):
        files = FolderImages(path).files
        entries = [(os.path.relpath(f, path), os.path.getsize(f), os.path.getmtime(f)) for f in files]
    else:
        entries = [(os.path.basename(path), os.path.getsize(path), os.path.getmtime(path))]
    return hashlib.sha1(repr(entries).encode()).hexdigest()


def cached_features(path, inception, dist, batch_size, num_workers):
    """pool3 features of the images at `path`, cached in an .npz next to it."""
    key = hashlib.sha1(f"{source_identity(path)}|{inception.weights_name}|{INCEPTION_RESIZE}".encode()).hexdigest()
    cache = f"{path.rstrip(os.sep)}.inception-{key[:12]}.npz"
    if os.path.isfile(cache):
        return np.load(cache)["pool3"], cache
    pool3, _ = inception_features(open_images(path), inception, dist, batch_size, num_workers, desc=f"reference {path}")
    if dist.is_main:
        try:
            tmp = cache + ".tmp.npz"
            np.savez(tmp, pool3=pool3.numpy(), key=np.array(key))
            os.replace(tmp, cache)  # atomic: never a half-written cache
        except OSError as e:
            print(f"could not cache reference features at {cache} ({e}); they will be recomputed next time")
            cache = "not cached"
    return pool3.numpy(), cache


def reference_statistics(path, inception, dist, batch_size=100, num_workers=4, need_features=True):
    """dict(mu, sigma, features or None, source, num) for an ADM reference batch or images.

    An .npz with `mu`/`sigma` (ADM's VIRTUAL_imagenet256_labeled.npz) provides them as
    computed by the TF evaluator; its `arr_0` images, when present, give the pool3
    features for precision/recall. Any other .npz (arr_0) or image folder is run
    through the Inception network once and cached next to itself.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"reference {path} not found; for ImageNet 256 gFID download VIRTUAL_imagenet256_labeled.npz from "
            "the ADM evaluation suite (openai/guided-diffusion, evaluations/README.md) and pass it with --ref"
        )
    files = []
    if path.endswith(".npz") and os.path.isfile(path):
        with np.load(path) as data:
            files = data.files
    if "mu" in files and "sigma" in files:
        with np.load(path) as data:
            mu, sigma = data["mu"], data["sigma"]
        features, num = None, None
        if need_features and "arr_0" in files:
            features, _ = cached_features(path, inception, dist, batch_size, num_workers)
            num = len(features)
        return dict(mu=mu, sigma=sigma, features=features, source=f"{path} (stored mu/sigma)", num=num)
    features, cache = cached_features(path, inception, dist, batch_size, num_workers)
    mu, sigma = feature_statistics(features, dist.device)
    return dict(mu=mu, sigma=sigma, features=features, source=f"{path} (cached in {cache})", num=len(features))


# ----------------------------------------------------------------------------------
# Reconstruction: rFID, PSNR, SSIM, LPIPS of decode(encode(x)) (Tables 1, 3, 4)
# ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_reconstruction(ae, dataset, inception, lpips, dist, batch_size=32, num_workers=4, precision="fp32"):
    """Reconstruct `dataset` ((image in [-1, 1], label) pairs) and score it against itself.

    Both originals and reconstructions are quantised to uint8 first (what a PNG would
    hold); PSNR / SSIM / LPIPS are per image, then averaged. rFID compares the
    Inception statistics of all reconstructions with those of all originals.
    """
    pool3_x, pool3_rec, per_image = [], [], []
    batches = loader(rank_slice(dataset, dist), batch_size, num_workers)
    for x, _ in tqdm(batches, desc="reconstruction", disable=not dist.is_main):
        x = x.to(dist.device)
        with svg.autocast(precision, dist.device):
            rec = ae.decode(ae.encode(x))  # [B, 3, H, W]
        u_x, u_rec = svg.to_uint8(x), svg.to_uint8(rec)  # [B, 3, H, W] uint8
        pool3_x.append(inception(u_x)[0])
        pool3_rec.append(inception(u_rec)[0])
        lp = lpips(u_x.float() / 127.5 - 1, u_rec.float() / 127.5 - 1)  # [B]
        per_image.append(torch.stack([*psnr_ssim(u_x, u_rec), lp.double()], 1))  # [B, 3]
    n = len(dataset)
    pool3_x = gather_strided(torch.cat(pool3_x), dist, n).cpu()  # [N, 2048]
    pool3_rec = gather_strided(torch.cat(pool3_rec), dist, n).cpu()  # [N, 2048]
    per_image = gather_strided(torch.cat(per_image), dist, n).cpu()  # [N, 3]
    rfid = frechet_distance(*feature_statistics(pool3_x, dist.device), *feature_statistics(pool3_rec, dist.device))
    mean_psnr, mean_ssim, mean_lpips = per_image.mean(0).tolist()
    return dict(rfid=rfid, psnr=mean_psnr, ssim=mean_ssim, lpips=mean_lpips, num_images=n)


# ----------------------------------------------------------------------------------
# Linear probe on frozen features (Table 4, App. B classification)
# ----------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(ae, dataset, dist, batch_size=64, num_workers=4, precision="fp32"):
    """Spatially mean-pooled SVG features [N, C] (DINO channels first) and labels [N]."""
    feats, labels = [], []
    batches = loader(rank_slice(dataset, dist), batch_size, num_workers)
    for x, y in tqdm(batches, desc="probe features", disable=not dist.is_main):
        with svg.autocast(precision, dist.device):
            z = ae.encode(x.to(dist.device))  # [B, C, h, w]
        feats.append(z.float().mean((2, 3)))  # [B, C]
        labels.append(torch.as_tensor(y, device=dist.device))
    n = len(dataset)
    return gather_strided(torch.cat(feats), dist, n), gather_strided(torch.cat(labels), dist, n)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=30, batch_size=3072, lr=PROBE_LR,
                 weight_decay=PROBE_WEIGHT_DECAY):
    """Train a linear classifier on frozen features with AdamW (App. B); top-1 / top-5 (%) on val."""
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), device=train_x.device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        top = head(val_x).topk(min(5, num_classes), dim=1).indices  # [N_val, 5]
    top1 = (top[:, 0] == val_y).float().mean().item() * 100
    top5 = (top == val_y[:, None]).any(1).float().mean().item() * 100
    return dict(top1=top1, top5=top5)


def probe_autoencoder(ae, train_set, val_set, dist, epochs=30, batch_size=3072, feature_batch_size=64, num_workers=4,
                      precision="fp32", seed=0):
    """Table 4: linear probes on DINO-only (first dino_dim channels) vs full SVG features."""
    train_x, train_y = pooled_features(ae, train_set, dist, feature_batch_size, num_workers, precision)
    val_x, val_y = pooled_features(ae, val_set, dist, feature_batch_size, num_workers, precision)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    dino_dim = ae.dino.embed_dim
    spaces = {"dino": dino_dim}
    if train_x.shape[1] > dino_dim:
        spaces["svg"] = train_x.shape[1]
    results = {}
    for name, channels in spaces.items():
        svg.set_seed(seed)  # same head init and batch order for both feature spaces
        results[name] = linear_probe(train_x[:, :channels], train_y, val_x[:, :channels], val_y, num_classes,
                                     epochs, batch_size)
        results[name]["channels"] = channels
    return dict(results, num_train=len(train_x), num_val=len(val_x), num_classes=num_classes)


# ----------------------------------------------------------------------------------
# Class-conditional score on the synthetic shapes (the tiny tier): a small judge CNN
# ----------------------------------------------------------------------------------
# Seeds of the synthetic sets used here; the tiny tier trains both stages on seed 0 (--seed).
SHAPES_JUDGE_SEED, SHAPES_REF_SEED, SHAPES_TEST_SEED = 101, 102, 103  # judge training / FD reference / real row


SHAPES_JUDGE_SIZE = 32  # the judge sees images average-pooled to 32 px: cheap, and blind to fine texture


class ShapeJudge(nn.Module):
    """A 4-layer CNN + global average pool + linear that names the shape class of an image.

    Input: uint8 images, average-pooled to SHAPES_JUDGE_SIZE. features(): the pooled
    [B, 4 * width] activations the Frechet distance is computed on.
    """

    def __init__(self, num_classes, width=32):
        super().__init__()
        chans, layers = (3, width, 2 * width, 4 * width, 4 * width), []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
        self.trunk = nn.Sequential(*layers)  # [B, 4 width, 4, 4]
        self.head = nn.Linear(chans[-1], num_classes)

    def features(self, u):
        """uint8 images [B, 3, H, W] -> pooled features [B, 4 * width] (float32)."""
        x = F.adaptive_avg_pool2d(u.float() / 127.5 - 1, SHAPES_JUDGE_SIZE)  # [B, 3, 32, 32]
        return self.trunk(x).mean((2, 3))

    def forward(self, u):
        return self.head(self.features(u))  # [B, num_classes] logits


def synthetic_uint8(num_images, image_size, num_classes, seed):
    """The synthetic set as the judge sees it: uint8 [N, 3, S, S] (quantised like samples), labels [N]."""
    data = svg.SyntheticImages(num_images, image_size, num_classes, seed)
    images, labels = zip(*(data[i] for i in range(num_images)))
    return svg.to_uint8(torch.stack(images)), torch.tensor(labels)


def train_shape_judge(num_classes, image_size, num_images=2048, epochs=8, batch_size=64, lr=3e-3, seed=0):
    """ShapeJudge trained on real synthetic images (seed SHAPES_JUDGE_SEED), in eval mode, CPU."""
    u, y = synthetic_uint8(num_images, image_size, num_classes, SHAPES_JUDGE_SEED)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = ShapeJudge(num_classes)
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    steps = epochs * (num_images // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(num_images, generator=g)
        for i in range(0, num_images - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(judge(u[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_images(judge, u, batch_size=256):
    """Predicted classes [N] and pooled features [N, D] of uint8 images [N, 3, H, W]."""
    preds, feats = [], []
    for i in range(0, len(u), batch_size):
        f = judge.features(u[i:i + batch_size])
        feats.append(f)
        preds.append(judge.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def shape_score(judge, u, labels, ref_stats):
    """Requested-class accuracy (%) and Frechet distance to the reference on the judge's features."""
    pred, feats = judge_images(judge, u)
    return dict(accuracy=(pred == labels).float().mean().item() * 100,
                fd=frechet_distance(*feature_statistics(feats), *ref_stats),
                per_class=[(pred[labels == k] == k).float().mean().item() * 100 for k in labels.unique().tolist()])


@torch.no_grad()
def generate_uint8(model, stats, ae, labels, seed, steps, cfg_scale, batch_size, device):
    """Class-conditional samples as uint8 [N, 3, H, W]: sample.py's per-index noise, Euler ODE + CFG."""
    gen = argparse.Namespace(stats=stats, ae=ae)  # what sample.decode reads
    cfg = model.cfg
    noise = sample_noise(range(len(labels)), (cfg.in_channels, cfg.input_size, cfg.input_size), seed)  # [N, C, h, w]
    out = []
    for i in range(0, len(labels), batch_size):
        z = svg.sample_ode(model, noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device), steps,
                           cfg_scale=cfg_scale, null_class=cfg.num_classes)  # [b, C, h, w]
        out.append(svg.to_uint8(decode(gen, z)).cpu())  # [b, 3, H, W]
    return torch.cat(out)


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------
def network_note(inception):
    return f"pytorch-fid Inception {inception.weights_name}, resize {INCEPTION_RESIZE}"


def write_results(results, lines, out, dist):
    """Rank 0 prints each line and writes `results` as json."""
    if not dist.is_main:
        return
    for line in lines:
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")


def run_fid(args, dist):
    """gFID / IS / precision / recall of samples against a reference batch."""
    inception = load_inception(args.inception).to(dist.device)
    samples = open_images(args.samples)
    pool3, logits = inception_features(samples, inception, dist, args.batch_size, args.num_workers, desc="samples")
    ref = reference_statistics(args.ref, inception, dist, args.batch_size, args.num_workers)
    if not dist.is_main:
        return
    n, net = len(samples), network_note(inception)
    fid = frechet_distance(*feature_statistics(pool3, dist.device), ref["mu"], ref["sigma"], method=args.fid_method)
    is_mean, is_std = inception_score(logits)
    results = dict(fid=fid, inception_score=is_mean, inception_score_std=is_std, num_samples=n,
                   samples=args.samples, reference=ref["source"], network=inception.weights_name,
                   resize=INCEPTION_RESIZE, fid_method=args.fid_method,
                   is_splits=f"{IS_SPLITS} contiguous, unshuffled (ADM 5000-image chunks at 50k)")
    lines = [
        f"FID {fid:.4f}: {n} samples from {args.samples} vs reference {ref['source']}; {net}",
        f"IS {is_mean:.3f} +- {is_std:.3f}: {n} samples, {IS_SPLITS} contiguous splits; {net}",
    ]
    if ref["features"] is not None:
        precision, recall = precision_recall(ref["features"], pool3, device=dist.device)
        results.update(precision=precision, recall=recall, num_reference_images=ref["num"])
        lines.append(f"precision {precision:.4f} recall {recall:.4f}: {n} samples vs {ref['num']} reference images "
                     f"of {args.ref}, k={PR_NEIGHBOURS}; {net}")
    else:
        lines.append(f"precision/recall skipped: {args.ref} holds no images (arr_0)")
    if n != 50000:
        lines.append(f"note: FID-{n} is not comparable to the paper's FID-50K")
    write_results(results, lines, args.out or args.samples.rstrip(os.sep) + ".fid.json", dist)


def run_recon(args, dist):
    """rFID / PSNR / SSIM / LPIPS of a stage-1 autoencoder on a validation folder."""
    ae = svg.load_autoencoder(args.ae).to(dist.device)
    image_size = args.image_size or ae.cfg.image_size
    dataset = svg.build_dataset(args.data, image_size, on_error="raise")  # ADM centre crop, no flip
    if args.num_images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.num_images, len(dataset))))
    inception = load_inception(args.inception).to(dist.device)
    lpips = svg.load_lpips(args.lpips_vgg, args.lpips_heads).to(dist.device)
    r = evaluate_reconstruction(ae, dataset, inception, lpips, dist, args.batch_size, args.num_workers, args.precision)
    n, net = r["num_images"], network_note(inception)
    ref = f"the {n} ADM centre crops at {image_size}px of {args.data} (not the VIRTUAL gFID batch)"
    r.update(autoencoder=args.ae, data=args.data, image_size=image_size, reference=ref,
             network=inception.weights_name, resize=INCEPTION_RESIZE,
             ssim_convention="RGB per channel, Gaussian 11 / 1.5, valid, data range 255",
             lpips_network="VGG16 + v0.1 heads on uint8-quantised images")
    lines = [
        f"rFID {r['rfid']:.4f}: {n} reconstructions vs {ref}; {net}",
        f"PSNR {r['psnr']:.3f} dB, SSIM {r['ssim']:.4f}, LPIPS {r['lpips']:.4f}: mean over {n} uint8 images",
    ]
    write_results(r, lines, args.out or args.ae + ".recon.json", dist)


def run_probe(args, dist):
    """Table 4 classification: linear probes on DINO-only vs SVG features."""
    ae = svg.load_autoencoder(args.ae).to(dist.device)
    image_size = args.image_size or ae.cfg.image_size
    train_set = svg.build_dataset(args.data, image_size, on_error="raise")  # ADM centre crop, no flip
    if args.val_data:
        val_set = svg.build_dataset(args.val_data, image_size, on_error="raise")
    else:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, int(len(order) * args.holdout))
        val_set = torch.utils.data.Subset(train_set, order[:n_val])
        train_set = torch.utils.data.Subset(train_set, order[n_val:])
    r = probe_autoencoder(ae, train_set, val_set, dist, args.epochs, args.batch_size, args.feature_batch_size,
                          args.num_workers, args.precision, args.seed)
    r.update(autoencoder=args.ae, data=args.data, val_data=args.val_data or f"{args.holdout:.0%} held out of --data",
             pooling="spatial mean of the SVG feature map (patch tokens), centre crops, no augmentation",
             epochs=args.epochs, optimizer=f"AdamW lr {PROBE_LR} wd {PROBE_WEIGHT_DECAY}")
    lines = [
        f"linear probe {name}: top-1 {r[name]['top1']:.2f}% top-5 {r[name]['top5']:.2f}% "
        f"({r[name]['channels']} channels, {r['num_train']} train / {r['num_val']} val images, "
        f"{r['num_classes']} classes)"
        for name in ("dino", "svg") if name in r
    ]
    write_results(r, lines, args.out or args.ae + ".probe.json", dist)


def run_shapes(args, dist):
    """Tiny tier: requested-class accuracy and judge-feature FD of class-conditional samples.

    Rows: real synthetic images (the ceiling), stage-1 reconstructions of them, the SiT at
    its initialisation (untrained: the floor, ~1 / num_classes), and the checkpoint's EMA SiT.
    """
    if dist.world_size > 1:
        raise ValueError("`eval.py shapes` runs on one process: python eval.py shapes ...")
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)  # our own train_dit.py file
    if not (isinstance(ckpt, dict) and "sit_config" in ckpt):
        raise ValueError(f"{args.ckpt} is not a train_dit.py checkpoint: `shapes` scores generators trained on the "
                         "built-in synthetic shapes (train_dit.py --preset tiny)")
    data = ckpt["args"].get("data")
    if data not in (None, "synthetic"):
        raise ValueError(f"{args.ckpt} was trained on --data {data!r}: `shapes` scores generators trained on the "
                         "synthetic shapes only (use `eval.py fid` for image folders)")
    model, stats, ae = svg.load_generator(args.ckpt)  # EMA SiT, frozen, CPU
    K, size, device = model.cfg.num_classes, ae.cfg.image_size, dist.device
    if K > len(svg.SYNTHETIC_SHAPES):
        raise ValueError(f"{args.ckpt} has {K} classes; the synthetic set has {len(svg.SYNTHETIC_SHAPES)}")
    t0 = time.time()
    judge = train_shape_judge(K, size, args.judge_images, args.judge_epochs, seed=args.seed)
    n = args.per_class * K
    ref_u, _ = synthetic_uint8(n, size, K, SHAPES_REF_SEED)
    ref_stats = feature_statistics(judge_images(judge, ref_u)[1])
    real_u, labels = synthetic_uint8(n, size, K, SHAPES_TEST_SEED)  # labels: i % K, balanced
    with torch.random.fork_rng(devices=[]):  # train_dit.py's init: SiT(cfg) right after manual_seed(--seed)
        torch.manual_seed(ckpt["args"]["seed"])
        untrained = svg.SiT(model.cfg).eval().requires_grad_(False)
    model, ae = model.to(device), ae.to(device)
    with torch.no_grad():
        recon = torch.cat([svg.to_uint8(ae.decode(ae.encode(real_u[i:i + 64].float().to(device) / 127.5 - 1))).cpu()
                           for i in range(0, n, 64)])  # [n, 3, H, W]
    sampling = dict(steps=args.steps, cfg_scale=args.cfg_scale, batch_size=args.batch_size, device=device)
    rows = {"real": real_u, "reconstruction": recon,
            "untrained": generate_uint8(untrained.to(device), stats, ae, labels, args.seed, **sampling),
            "trained": generate_uint8(model, stats, ae, labels, args.seed, **sampling)}
    results = {name: shape_score(judge, u, labels, ref_stats) for name, u in rows.items()}
    results.update(checkpoint=args.ckpt, step=ckpt.get("step"), num_per_row=n, classes=list(svg.SYNTHETIC_SHAPES[:K]),
                   sampler=f"{args.steps} Euler steps, cfg {args.cfg_scale}, noise seed {args.seed}",
                   judge=f"ShapeJudge trained on {args.judge_images} synthetic images (seed {SHAPES_JUDGE_SEED}), "
                         f"{args.judge_epochs} epochs", seconds=time.time() - t0)
    lines = [f"{'row':15s} {'class acc %':>11s} {'FD':>9s}   per class ({', '.join(results['classes'])})"]
    lines += [f"{name:15s} {results[name]['accuracy']:11.1f} {results[name]['fd']:9.3f}   "
              + " / ".join(f"{a:.0f}" for a in results[name]["per_class"]) for name in rows]
    lines.append(f"{n} images per row ({args.per_class} per class); FD on the judge's {judge.head.in_features}-d "
                 f"features vs {n} other real images; {results['sampler']}; {results['seconds']:.0f} s")
    write_results(results, lines, args.out or args.ckpt + ".shapes.json", dist)
    return results


def run_bench_fid(args):
    """Time the FID statistics and the matrix square root step (eigh form vs scipy sqrtm)."""
    rng = np.random.default_rng(args.seed)
    mixing = rng.standard_normal((args.dim, args.dim)) / math.sqrt(args.dim)
    feats = [torch.from_numpy(rng.standard_normal((args.num, args.dim)) @ mixing).float() for _ in range(2)]
    t0 = time.perf_counter()
    (mu1, s1), (mu2, s2) = [feature_statistics(f) for f in feats]
    t_stats = (time.perf_counter() - t0) / 2
    timings, values = {}, {}
    for method in ("eigh", "sqrtm"):
        t0 = time.perf_counter()
        values[method] = frechet_distance(mu1, s1, mu2, s2, method=method)
        timings[method] = time.perf_counter() - t0
    print(f"feature statistics of {args.num} x {args.dim} features (float64): {t_stats:.2f} s per set")
    for method in timings:
        print(f"Frechet distance, {method:5s}: {timings[method]:.2f} s (FID {values[method]:.6f})")
    print(f"relative difference {abs(values['eigh'] - values['sqrtm']) / abs(values['sqrtm']):.2e}; "
          f"torch threads {torch.get_num_threads()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="SVG evaluation: gFID/IS/precision/recall, reconstruction, probe")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--out", default=None, help="json file for the results (default: next to the input)")
        p.add_argument("--num-workers", type=int, default=4)
        return p

    p = common(sub.add_parser("fid", help="gFID, IS, precision/recall of samples (.npz arr_0 or image folder)"))
    p.add_argument("--samples", required=True, help="ADM-style .npz (arr_0 uint8 NHWC) or folder of PNG/JPEG")
    p.add_argument("--ref", required=True, help="VIRTUAL_imagenet256_labeled.npz, or an .npz / folder of images")
    p.add_argument("--inception", required=True, help=f"path to {INCEPTION_FILE}")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch per rank")
    p.add_argument("--fid-method", choices=["eigh", "sqrtm"], default="eigh")

    p = common(sub.add_parser("recon", help="rFID, PSNR, SSIM, LPIPS of a stage-1 autoencoder"))
    p.add_argument("--ae", required=True, help="stage-1 checkpoint (train_ae.py) or official .ckpt")
    p.add_argument("--data", required=True, help="validation image folder (ImageNet val), or 'synthetic'")
    p.add_argument("--inception", required=True, help=f"path to {INCEPTION_FILE}")
    p.add_argument("--lpips-vgg", required=True, help="VGG16 trunk weights for LPIPS")
    p.add_argument("--lpips-heads", required=True, help="LPIPS v0.1 linear heads (vgg.pth)")
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's image_size")
    p.add_argument("--num-images", type=int, default=None, help="evaluate only the first N images (default all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch per rank")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32",
                   help="autoencoder precision (bf16 autocast); tf32 and bf16 also allow TF32 in Inception and LPIPS")

    p = common(sub.add_parser("probe", help="linear probe top-1/top-5, DINO-only vs SVG features (Table 4)"))
    p.add_argument("--ae", required=True, help="stage-1 checkpoint (train_ae.py) or official .ckpt")
    p.add_argument("--data", required=True, help="labelled training folder (class subfolders), or 'synthetic'")
    p.add_argument("--val-data", default=None, help="held-out folder (default: hold out --holdout of --data)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of --data held out without --val-data")
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's image_size")
    p.add_argument("--epochs", type=int, default=30, help="App. B: 30")
    p.add_argument("--batch-size", type=int, default=3072, help="classifier batch (App. B: 3072)")
    p.add_argument("--feature-batch-size", type=int, default=64, help="images per encoder batch per rank")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32", help="autoencoder precision")
    p.add_argument("--seed", type=int, default=0)

    p = common(sub.add_parser("shapes", help="tiny tier: requested-class accuracy + judge FD of samples of a "
                                            "generator trained on the synthetic shapes"))
    p.add_argument("--ckpt", required=True, help="train_dit.py checkpoint trained on --data synthetic")
    p.add_argument("--per-class", type=int, default=100, help="samples (and real images) per class")
    p.add_argument("--steps", type=int, default=25, help="Euler steps (as sample.py grid)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance (as sample.py grid)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per forward")
    p.add_argument("--judge-images", type=int, default=2048, help="synthetic images the judge CNN is trained on")
    p.add_argument("--judge-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="judge init / batch order and sample noise")

    p = sub.add_parser("bench-fid", help="time the FID statistics and matrix square root on random features")
    p.add_argument("--num", type=int, default=50000, help="feature vectors per set")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "bench-fid":
        return run_bench_fid(args)
    dist = svg.init_distributed()
    svg.setup_precision(args.precision if args.command in ("recon", "probe") else "fp32")  # fid, shapes: exact fp32
    result = {"fid": run_fid, "recon": run_recon, "probe": run_probe, "shapes": run_shapes}[args.command](args, dist)
    dist.close()
    return result


if __name__ == "__main__":
    main()
