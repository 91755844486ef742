"""Evaluation for SVG (arXiv 2510.15301, Sec. 4.1, Tables 1-4, App. B; Figs. 4a, 10-12, Apps. E, G).

    torchrun --nproc_per_node=8 eval.py fid --samples samples.npz \
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 eval.py recon --ae ae.pt --data /imagenet/val \
        --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth --inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 eval.py probe --ae ae.pt --data /imagenet/train --val-data /imagenet/val
    python eval.py pca --ae ae.pt --data /imagenet/val                      # Fig. 11-12, App. G
    python eval.py pca-sit --ckpt dit.pt --classes 207 360 387 974          # Fig. 11-12, App. G
    python eval.py tsne --ae ae.pt --data /imagenet/val  # Fig. 4a / 10, App. E; titles from ae.pt.probe.json
    torchrun --nproc_per_node=8 eval.py sweep --ckpt CKPT --ref VIRTUAL_imagenet256_labeled.npz \
        --inception pt_inception-2015-12-05-6726825d.pth --steps 5 10 25 --cfg-scales 1 1.5   # Table 2, Fig. 13
    python eval.py curves runs/svg_xl                                                        # Fig. 14
    torchrun --nproc_per_node=8 eval.py calibrate --ae epoch=000040.ckpt --data /imagenet/train --out ae_cal.pt
    python eval.py bench-fid
    python eval.py shapes --ckpt runs/dit_tiny/checkpoints/0006000.pt    # the tiny tier's number

Sections, top to bottom: the FID InceptionV3 -> image sources -> DDP-aware feature
extraction -> metrics (Frechet distance, Inception Score, precision/recall, PSNR, SSIM)
-> reference statistics -> reconstruction evaluation -> linear probe -> feature-space
pictures (PCA maps, t-SNE) -> sweeps and training curves -> the synthetic-shapes score of
the tiny tier -> CLI (including `calibrate`: frozen Eq. (6) statistics for an autoencoder
without them).

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
- recon / probe encode with the autoencoder's frozen Eq. (6) statistics (--align-stats batch:
  the official per-batch ones) in training-like batches (svg.training_like_batches), gathered
  back by index: the numbers do not depend on the world size, and batches never follow the
  folder's class order.
- Linear probe: the spatial mean of the SVG feature map (mean-pooled patch tokens), DINO-only
  = its first dino_dim channels, SVG = all channels; no CLS token, as SVG has none.
- FID-N names its sample count: FID-10K and the like are biased upward against FID-50K and
  are not comparable with the paper's numbers (sweeps and train_dit.py's online FID).
- Shapes score (tiny tier, no Inception weights needed): a small CNN (ShapeJudge) trained on
  the fly on real synthetic shapes names the class of each sample; the score is the share
  of samples judged to be the requested class, plus the Frechet distance between the judge's
  pooled features of samples and of real images (other images than those it trained on).
- gFID uses ADM's reference batch (`VIRTUAL_imagenet256_labeled.npz`, mu/sigma computed
  by the TF evaluator on ImageNet train). rFID uses the 256x256 ADM centre crops of the
  validation images as reference, never the VIRTUAL batch.
"""

import argparse
import dataclasses
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

import sample
import svg
from sample import sample_noise  # the shapes score samples exactly as sample.py does

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_SIZE = 299  # TF FID graph input resolution
INCEPTION_RESIZE = "bilinear to 299x299, align_corners=False, no antialias, before scaling to [-1, 1] (pytorch-fid)"
IS_SPLITS = 10  # Inception Score splits (Salimans et al. 2016; ADM: 5000-image chunks of 50k)
PROBE_LR, PROBE_WEIGHT_DECAY = 5e-4, 1e-2  # App. B linear classifier, AdamW
ALIGN_STATS_HELP = ("Eq. (6) statistics: the autoencoder's frozen running statistics (default: every image gets "
                    "the same features in any batch), or each batch's (official), in training-like batches")
PR_NEIGHBOURS = 3  # k of the improved precision/recall manifolds (Kynkaanniemi et al. 2019, ADM)
PAPER_FID_SAMPLES = 50_000  # FID-50K, every gFID of the paper
TRAINING_METRICS = "metrics.jsonl"  # train_dit.py's machine-readable log next to log.txt (Fig. 14)
PLOT_HINT = 'the sweep and curve PNGs need matplotlib: pip install -e ".[toy]"  (or: pip install matplotlib)'


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
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: no extra tensor per unit


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
        # channels_last (NHWC): oneDNN runs each conv without a layout reorder (1.2-1.6x on a CPU);
        # the same features up to fp32 rounding (3e-8 against pytorch-fid: another summation order)
        x = self.preprocess(images).contiguous(memory_format=torch.channels_last)  # [B, 3, 299, 299]
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
        state = svg.load_checkpoint(path, "FID Inception weights")  # weights only; errors name the file
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
        im = svg.open_image(self.files[i])  # 8-bit RGB whatever the file's mode; errors name the file
        if im.size != self.size:
            raise ValueError(f"{self.files[i]} is {im.size[0]}x{im.size[1]} but {self.files[0]} is "
                             f"{self.size[0]}x{self.size[1]}: samples for FID must all have one size")
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # [3, H, W] uint8


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


def gather_rows(parts, index, dist, n):
    """Rows computed on every rank -> [n, ...] in dataset order.

    parts: this rank's list of [k_i, ...] tensors for the dataset items listed in `index`
    (a list of [k_i] index tensors); any rank may have none.
    """
    x = torch.cat(parts) if parts else None
    idx = torch.cat(index).to(dist.device) if index else None
    meta = dist.all_gather_object(None if x is None else (len(x), tuple(x.shape[1:]), x.dtype))
    m, tail, dtype = max(k for k, _, _ in filter(None, meta)), *next(filter(None, meta))[1:]
    if x is None:
        x, idx = torch.zeros(0, *tail, dtype=dtype, device=dist.device), torch.zeros(0, dtype=torch.long,
                                                                                    device=dist.device)
    if dist.initialized:
        x = torch.cat([x, x.new_zeros(m - len(x), *tail)])  # [m, ...]; padding rows have index -1
        idx = torch.cat([idx, idx.new_full((m - len(idx),), -1)])
        xs, ids = [torch.empty_like(x) for _ in range(dist.world_size)], [torch.empty_like(idx) for _ in meta]
        torch_dist.all_gather(xs, x.contiguous())
        torch_dist.all_gather(ids, idx.contiguous())
        x, idx = torch.cat(xs), torch.cat(ids)
    keep = idx >= 0
    out = x.new_zeros(n, *tail)
    out[idx[keep]] = x[keep]
    return out


def encoder_batches(ae, dataset, dist, batch_size, num_workers, seed=0):
    """(dataset indices [k], images [k, 3, H, W], labels [k]) of this rank's training-like batches
    (svg.training_like_batches; the stage-1 batch size when Eq. (6) uses batch statistics), so
    every image is encoded in the same batch for any world size, never in a one-class batch. Each
    batch's images are all encoded; `k` counts those it owns (the last batch wraps around)."""
    batches = svg.training_like_batches(len(dataset), ae.encode_batch_size(batch_size), dist, seed)
    data = torch.utils.data.DataLoader(dataset, batch_sampler=[b for b, _ in batches], num_workers=num_workers)
    for (index, keep), (x, y) in zip(batches, data):
        yield torch.tensor(index[:keep]), x, torch.as_tensor(y), keep


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


def generation_metrics(pool3, logits, ref, device="cpu", fid_method="eigh"):
    """(FID against ref's mu / sigma, IS mean, IS std) of samples' pool3 [N, 2048] and logits [N, 1008]."""
    fid = frechet_distance(*feature_statistics(pool3, device), ref["mu"], ref["sigma"], method=fid_method)
    return (fid, *inception_score(logits))


def fid_name(n):
    """FID-50K, FID-10K, FID-20: the metric's name carries its sample count."""
    return f"FID-{n // 1000}K" if n % 1000 == 0 else f"FID-{n}"


def fid_count_note(n):
    return (f"{fid_name(n)} is not comparable with the paper's FID-50K: FID is biased by the sample count "
            f"(upward for fewer samples); compare it only with {fid_name(n)} against the same reference")


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
        try:  # atomic, with a unique temp name: never a half-written cache, no clash between runs
            svg.atomic_write(cache, lambda f: np.savez(f, pool3=pool3.numpy(), key=np.array(key)))
        except OSError as e:
            print(f"could not cache reference features at {cache} ({e}); they will be recomputed next time")
            cache = "not cached"
    return pool3.numpy(), cache


def check_reference(path):
    """Fail fast (before any Inception pass) unless `path` is a usable FID reference."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"reference {path} not found; for ImageNet 256 gFID download VIRTUAL_imagenet256_labeled.npz from "
            "the ADM evaluation suite (openai/guided-diffusion, evaluations/README.md) and pass it with --ref"
        )
    if path.endswith(".npz") and os.path.isfile(path):
        with np.load(path) as data:
            files = set(data.files)
        if {"mu", "sigma"} <= files:
            return  # an ADM reference batch
    open_images(path)  # a folder of images or an .npz with uint8 arr_0, else a clear error


def check_finite_metrics(results):
    """A NaN / inf metric is an error, never a number in a results file."""
    bad = {k: v for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise ValueError(f"non-finite metrics {bad}: the samples or reference hold NaN / inf features "
                         "(e.g. images from a diverged model, or a broken reference file)")


def reference_statistics(path, inception, dist, batch_size=100, num_workers=4, need_features=True):
    """dict(mu, sigma, features or None, source, num) for an ADM reference batch or images.

    An .npz with `mu`/`sigma` (ADM's VIRTUAL_imagenet256_labeled.npz) provides them as
    computed by the TF evaluator; its `arr_0` images, when present, give the pool3
    features for precision/recall. Any other .npz (arr_0) or image folder is run
    through the Inception network once and cached next to itself.
    """
    check_reference(path)
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
    Inception statistics of all reconstructions with those of all originals. Batches are
    training-like (encoder_batches): the numbers do not depend on the world size.
    """
    pool3_x, pool3_rec, per_image, index = [], [], [], []
    batches = encoder_batches(ae, dataset, dist, batch_size, num_workers)
    for idx, x, _, keep in tqdm(batches, desc="reconstruction", disable=not dist.is_main):
        x = x.to(dist.device)
        with svg.autocast(precision, dist.device):
            rec = ae.decode(ae.encode(x))[:keep]  # [k, 3, H, W]
        x = x[:keep]
        index.append(idx)
        u_x, u_rec = svg.to_uint8(x), svg.to_uint8(rec)  # [B, 3, H, W] uint8
        pool3_x.append(inception(u_x)[0])
        pool3_rec.append(inception(u_rec)[0])
        lp = lpips(u_x.float() / 127.5 - 1, u_rec.float() / 127.5 - 1)  # [B]
        per_image.append(torch.stack([*psnr_ssim(u_x, u_rec), lp.double()], 1))  # [B, 3]
    n = len(dataset)
    pool3_x = gather_rows(pool3_x, index, dist, n).cpu()  # [N, 2048]
    pool3_rec = gather_rows(pool3_rec, index, dist, n).cpu()  # [N, 2048]
    per_image = gather_rows(per_image, index, dist, n).cpu()  # [N, 3]
    rfid = frechet_distance(*feature_statistics(pool3_x, dist.device), *feature_statistics(pool3_rec, dist.device))
    mean_psnr, mean_ssim, mean_lpips = per_image.mean(0).tolist()
    return dict(rfid=rfid, psnr=mean_psnr, ssim=mean_ssim, lpips=mean_lpips, num_images=n)


# ----------------------------------------------------------------------------------
# Linear probe on frozen features (Table 4, App. B classification)
# ----------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(ae, dataset, dist, batch_size=64, num_workers=4, precision="fp32"):
    """Spatially mean-pooled SVG features [N, C] (DINO channels first) and labels [N], in dataset
    order, from training-like batches (encoder_batches: independent of the world size)."""
    feats, labels, index = [], [], []
    for idx, x, y, keep in tqdm(encoder_batches(ae, dataset, dist, batch_size, num_workers),
                                desc="probe features", disable=not dist.is_main):
        with svg.autocast(precision, dist.device):
            z = ae.encode(x.to(dist.device))[:keep]  # [k, C, h, w]
        feats.append(z.float().mean((2, 3)))  # [k, C]
        labels.append(y[:keep].to(dist.device))
        index.append(idx)
    n = len(dataset)
    return gather_rows(feats, index, dist, n), gather_rows(labels, index, dist, n)


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
# Feature-space pictures: PCA feature maps (Fig. 11-12, App. G), t-SNE (Fig. 4a, Fig. 10, App. E)
# ----------------------------------------------------------------------------------
PCA_COMPONENTS = 3  # one per RGB channel (DINOv3's feature-map pictures)
PCA_QUANTILE = 0.01  # robust per-component min-max: the 1% / 99% quantiles map to 0 / 1
TSNE_PANEL_INCHES, TSNE_DPI = 4, 100  # each t-SNE panel is 400 x 400 px
TSNE_SPACES = ("svg", "dino")  # the feature spaces `eval.py probe` scores (keys of its json)


def pca_project(tokens, k=PCA_COMPONENTS):
    """Fig. 11-12 (App. G): tokens [N, C] -> scores [N, k] on their first k principal components.

    Centre over all N tokens, take the top-k right singular vectors of the centred matrix
    (float64 SVD), and project. Returns (scores [N, k] float32, variances [k], components
    [k, C]); each component's sign is fixed so that its largest loading is positive.
    """
    N, C = tokens.shape  # tokens (all patches of all images), channels
    if N < 2 or min(N, C) < k:
        raise ValueError(f"PCA with {k} components needs at least {k} channels and tokens, got [N={N}, C={C}]")
    x = tokens.double()
    x = x - x.mean(0)  # [N, C], centred
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh [min(N, C), C], rows by decreasing s
    components = vh[:k]  # [k, C]
    components = components * components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    return (x @ components.T).float(), s[:k] ** 2 / (N - 1), components  # [N, k], [k], [k, C]


def pca_rgb(feature_maps, k=PCA_COMPONENTS, quantile=PCA_QUANTILE):
    """Feature maps [B, C, h, w] -> RGB [B, 3, h, w] in [0, 1]: PCA fitted over all B h w patches.

    Each component is scaled on its own, robustly: its `quantile` and 1 - `quantile` over
    the whole set map to 0 and 1 (clamped), so one colour means the same in every image.
    """
    B, C, h, w = feature_maps.shape  # images, channels, grid
    scores, _, _ = pca_project(feature_maps.permute(0, 2, 3, 1).reshape(-1, C), k)  # [B h w, k]
    lo, hi = torch.quantile(scores, torch.tensor([quantile, 1 - quantile]), dim=0)  # [k] each
    rgb = ((scores - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)  # [B h w, k]
    return rgb.reshape(B, h, w, k).permute(0, 3, 1, 2)  # [B, k, h, w]


def feature_spaces(ae, z):
    """The named spaces of an SVG feature map z [B, C, h, w]: "svg" (all C), "dino" (F_D), "residual" (F_R-hat)."""
    dino_dim = ae.dino.embed_dim
    spaces = {"svg": z, "dino": z[:, :dino_dim]}  # DINO channels first (svg.py conventions)
    if z.shape[1] > dino_dim:
        spaces["residual"] = z[:, dino_dim:]  # [B, 8, h, w]
    else:
        del spaces["svg"]  # a DINO-only autoencoder: "svg" would repeat "dino"
    return spaces


def spread_subset(dataset, num):
    """`num` items evenly spread over a dataset (class folders are sorted, so this spans classes)."""
    indices = np.linspace(0, len(dataset) - 1, min(num, len(dataset))).round().astype(int)
    return torch.utils.data.Subset(dataset, indices.tolist())


def pca_panel(rgb, size):
    """PCA colours [B, 3, h, w] in [0, 1] -> [B, 3, size, size] in [-1, 1] (nearest: one block per patch)."""
    return F.interpolate(rgb, size=(size, size), mode="nearest") * 2 - 1


@torch.no_grad()
def pca_feature_maps(ae, images, spaces, precision="fp32"):
    """Fig. 11-12 (App. G): images [B, 3, H, W] -> one PNG row per image: the image, then the PCA RGB of each space."""
    with svg.autocast(precision, images.device):
        z = ae.encode(images).float()  # [B, C, h, w]
    available = feature_spaces(ae, z)
    missing = [s for s in spaces if s not in available]
    if missing:
        raise ValueError(f"feature spaces {missing} do not exist for this autoencoder (it has {list(available)})")
    columns = [images.clamp(-1, 1).cpu()] + [pca_panel(pca_rgb(available[s]), images.shape[-1]).cpu() for s in spaces]
    return [torch.stack(row) for row in zip(*columns)]  # B rows of [1 + len(spaces), 3, H, W]


@torch.no_grad()
def sit_hidden_states(model, noise, y, steps, block, keep, shift=svg.SAMPLE_TIME_SHIFT, cfg_scale=1.0):
    """Sample with the Euler ODE and record block `block`'s output tokens at the steps in `keep` (Fig. 11-12).

    Step i evaluates the SiT once, at t_i of svg.ode_time_grid. A forward hook keeps the
    conditional half of the batch (CFG doubles it). Returns (x_0 [B, C, h, w], hidden
    states [len(keep), B, N, D] in the order of `keep`).
    """
    B = noise.shape[0]  # batch
    calls, states = [0], {}

    def record(module, args, out):
        if calls[0] in keep:
            states[calls[0]] = out[:B].float().cpu()  # [B, N, D]
        calls[0] += 1

    hook = model.blocks[block].register_forward_hook(record)
    try:
        x0 = svg.sample_ode(model, noise, y, steps, shift=shift, cfg_scale=cfg_scale, null_class=model.cfg.num_classes)
    finally:
        hook.remove()
    return x0, torch.stack([states[i] for i in keep])  # [len(keep), B, N, D]


def require_viz():
    """t-SNE needs the optional extra `viz` (scikit-learn, matplotlib): a clear error before any work."""
    try:
        import matplotlib  # noqa: F401
        import sklearn.manifold  # noqa: F401
    except ImportError as e:
        raise ImportError(f"eval.py tsne needs scikit-learn and matplotlib ({e}): pip install -e '.[viz]' "
                          "(or pip install scikit-learn matplotlib)") from e


def tsne_embed(features, perplexity=30.0, seed=0):
    """2-D t-SNE (van der Maaten & Hinton 2008) of features [N, D] with scikit-learn (optional extra `viz`)."""
    from sklearn.manifold import TSNE  # optional extra `viz`, checked by require_viz

    perplexity = min(perplexity, (len(features) - 1) / 3)  # sklearn requires perplexity < N
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features.double().cpu().numpy())  # [N, 2]


def dataset_labels(dataset):
    """Class label of every item without loading images (svg.ImageFolder / svg.SyntheticImages)."""
    if hasattr(dataset, "samples"):
        return [label for _, label in dataset.samples]
    return [i % dataset.num_classes for i in range(len(dataset))]


def class_subset(dataset, num_classes, per_class, seed=0):
    """Fig. 4a / 10: `num_classes` random classes x `per_class` random images each (paper: 100 x 100, 20 x 100)."""
    labels = torch.tensor(dataset_labels(dataset))
    g = torch.Generator().manual_seed(seed)
    present = labels.unique()
    if num_classes > len(present):
        raise ValueError(f"asked for {num_classes} classes but the data has {len(present)}")
    chosen = present[torch.randperm(len(present), generator=g)[:num_classes]].sort().values
    indices = []
    for c in chosen.tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than --per-class {per_class}")
        indices += members[torch.randperm(len(members), generator=g)[:per_class]].sort().values.tolist()
    return torch.utils.data.Subset(dataset, indices)


def space_title(cfg, space):
    """Panel name of a feature space: SVG / SVG w/o alignment (Table 4 row 2) / DINO-only / DINO layer k (Table 6)."""
    if space == "dino":
        return "DINO-only" if cfg.dino_layer is None else f"DINO layer {cfg.dino_layer}"
    name = "SVG" if cfg.align != "none" else "SVG w/o alignment"
    return name if cfg.dino_layer is None else f"{name} (DINO layer {cfg.dino_layer})"


def plot_tsne(panels, labels, path):
    """One row of t-SNE scatter panels, each class a colour; panels = [(title, points [N, 2])]."""
    import matplotlib  # optional extra `viz`
    from matplotlib.figure import Figure  # no pyplot global state

    _, colour = np.unique(np.asarray(labels), return_inverse=True)  # class ids -> 0..K-1
    num_classes = int(colour.max()) + 1
    if num_classes <= 20:  # qualitative palettes, one entry per class
        colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"](colour)  # [N, 4]
    else:  # paper: 100 classes
        colours = matplotlib.colormaps["turbo"](colour / (num_classes - 1))  # [N, 4]
    fig = Figure(figsize=(TSNE_PANEL_INCHES * len(panels), TSNE_PANEL_INCHES), dpi=TSNE_DPI)
    for i, (title, points) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(points[:, 0], points[:, 1], c=colours, s=4, linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=TSNE_DPI)  # exactly (4 x panels) x 4 inches at 100 dpi


# ----------------------------------------------------------------------------------
# Sweeps and training curves (Table 2, Fig. 13, Fig. 14): `sample.py export` in memory
# ----------------------------------------------------------------------------------
@torch.no_grad()
def score_generator(gen, sampler, inception, ref, dist, batch_size=100, fid_method="eigh"):
    """FID / IS of the samples `sample.py export` would write with settings `sampler`
    (sample.export_config), made in memory and scored as `eval.py fid` scores the npz.

    Each rank makes its export shards (sample.export_in_memory: same noise, labels, ODE,
    decode and uint8 quantisation), runs them through the Inception network in fp32, and
    rank 0 gathers the features back in sample order. The precision switch is the one each
    script sets: the sampler's for sampling, fp32 for Inception. Returns dict on rank 0, else None.
    """
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # restored at the end
    bar = tqdm(total=sampler.num_samples, desc=f"{fid_name(sampler.num_samples)} samples", unit="img",
               disable=not dist.is_main)
    shards, parts = sample.export_in_memory(gen, sampler, dist, bar), []
    while True:
        svg.setup_precision(sampler.precision)  # as `sample.py export` runs
        item = next(shards, None)
        if item is None:
            break
        ids, images = item  # [n], uint8 [n, H, W, 3]
        svg.setup_precision("fp32")  # as `eval.py fid` runs
        for i in range(0, len(ids), batch_size):
            x = images[i:i + batch_size].permute(0, 3, 1, 2).contiguous()  # [b, 3, H, W] uint8, as NpzImages
            p, l = inception(x.to(dist.device))
            parts.append((ids[i:i + batch_size], p.float().cpu(), l.float().cpu()))
    bar.close()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    parts = [part for rank_parts in dist.all_gather_object(parts) for part in rank_parts]
    if not dist.is_main:
        return None
    order = torch.tensor([i for ids, _, _ in parts for i in ids]).argsort()  # back to sample order
    pool3 = torch.cat([p for _, p, _ in parts])[order]  # [N, 2048]
    logits = torch.cat([l for _, _, l in parts])[order]  # [N, 1008]
    fid, is_mean, is_std = generation_metrics(pool3, logits, ref, dist.device, fid_method)
    r = dict(fid=fid, inception_score=is_mean, inception_score_std=is_std, num_samples=len(pool3),
             metric=fid_name(len(pool3)))
    check_finite_metrics(r)  # a NaN score is an error, in a sweep as in `eval.py fid`
    return r


def pyplot():
    """matplotlib.pyplot (Agg), or an ImportError that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
    return plt


def model_name(model):
    """Table 2's "Method" and "#Params" of a SiT: SVG-<preset> (SVG-XL, SVG-B, ...) and e.g. "675M"."""
    cfg = model.cfg
    name = next((k.replace("SiT", "SVG") for k, p in svg.SIT_PRESETS.items()
                 if (p.hidden_size, p.depth, p.num_heads) == (cfg.hidden_size, cfg.depth, cfg.num_heads)), "SVG")
    n = sum(p.numel() for p in model.parameters())
    return name, f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def cfg_label(w):
    return "w/o CFG" if w == 1 else f"w/ CFG {w:g}"


def sweep_tables(rows, method, params, metric):
    """Markdown: Table 2 (rows: steps; columns: FID per guidance scale) and Fig. 13's numbers
    (rows: guidance scale; columns: FID and IS per step count)."""
    steps = sorted({r["steps"] for r in rows})
    scales = sorted({r["cfg_scale"] for r in rows})
    cell = {(r["steps"], r["cfg_scale"]): r for r in rows}
    table2 = [f"| Method | #Params | Steps | {' | '.join(f'{metric} {cfg_label(w)}' for w in scales)} |",
              "|" + "---|" * (3 + len(scales))]
    table2 += [f"| {method} | {params} | {n} | " + " | ".join(f"{cell[n, w]['fid']:.2f}" for w in scales) + " |"
               for n in steps]
    fig13 = [f"| cfg scale | {' | '.join(f'{metric} ({n} steps) | IS ({n} steps)' for n in steps)} |",
             "|" + "---|" * (1 + 2 * len(steps))]
    fig13 += [f"| {w:g} | " + " | ".join(f"{cell[n, w]['fid']:.2f} | {cell[n, w]['inception_score']:.2f}"
                                          for n in steps) + " |" for w in scales]
    return table2, fig13


def plot_cfg_curve(rows, metric, title, path):
    """Fig. 13: FID and IS against the guidance scale, one line per step count."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for n in sorted({r["steps"] for r in rows}):
        line = sorted((r["cfg_scale"], r["fid"], r["inception_score"]) for r in rows if r["steps"] == n)
        w, fid, score = zip(*line)
        axes[0].plot(w, fid, "o-", label=f"{n} steps")
        axes[1].plot(w, score, "o-", label=f"{n} steps")
    for ax, ylabel in zip(axes, (metric, "Inception Score")):
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_training_metrics(path):
    """train_dit.py's metrics.jsonl (a run folder or the file) -> (loss records, FID records),
    each sorted by step; a step logged twice (a resumed run) keeps its last record."""
    if os.path.isdir(path):
        path = os.path.join(path, TRAINING_METRICS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: train_dit.py writes {TRAINING_METRICS} next to log.txt "
                                "(FID records only with --fid-every)")
    loss, fid = {}, {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            (fid if "fid" in record else loss)[record["step"]] = record
    return [loss[k] for k in sorted(loss)], [fid[k] for k in sorted(fid)]


def plot_training_curves(runs, path):
    """Fig. 14: training loss and online FID-N against the step, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    metrics = set()
    for name, (loss, fid) in runs.items():
        axes[0].plot([r["step"] for r in loss], [r["loss"] for r in loss], label=name)
        if fid:
            axes[1].plot([r["step"] for r in fid], [r["fid"] for r in fid], "o-", label=name)
            metrics |= {r["metric"] for r in fid}
    axes[0].set_ylabel("flow-matching loss")
    axes[1].set_ylabel(" / ".join(sorted(metrics)) + " (EMA)" if metrics else "no FID records (--fid-every)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend()
    if metrics - {fid_name(PAPER_FID_SAMPLES)}:
        axes[1].set_title("not comparable with FID-50K", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    check_reference(args.ref)  # everything checked before the expensive pass
    if len(samples) < 2:
        raise ValueError(f"{args.samples} holds {len(samples)} image(s): FID needs at least 2 (50,000 for FID-50K)")
    pool3, logits = inception_features(samples, inception, dist, args.batch_size, args.num_workers, desc="samples")
    ref = reference_statistics(args.ref, inception, dist, args.batch_size, args.num_workers)
    if not dist.is_main:
        return
    n, net = len(samples), network_note(inception)
    fid, is_mean, is_std = generation_metrics(pool3, logits, ref, dist.device, args.fid_method)
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
    check_finite_metrics(results)
    if n != PAPER_FID_SAMPLES:
        lines.append(f"note: {fid_count_note(n)}")
    write_results(results, lines, args.out or args.samples.rstrip(os.sep) + ".fid.json", dist)


def run_recon(args, dist):
    """rFID / PSNR / SSIM / LPIPS of a stage-1 autoencoder on a validation folder."""
    ae = svg.load_autoencoder(args.ae, trust_pickle=args.trust_pickle).to(dist.device)
    ae.align_stats = args.align_stats
    image_size = args.image_size or ae.cfg.image_size
    dataset = svg.build_dataset(args.data, image_size, on_error="raise")  # ADM centre crop, no flip
    if args.num_images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.num_images, len(dataset))))
    inception = load_inception(args.inception).to(dist.device)
    lpips = svg.load_lpips(args.lpips_vgg, args.lpips_heads).to(dist.device)
    r = evaluate_reconstruction(ae, dataset, inception, lpips, dist, args.batch_size, args.num_workers, args.precision)
    n, net = r["num_images"], network_note(inception)
    ref = f"the {n} ADM centre crops at {image_size}px of {args.data} (not the VIRTUAL gFID batch)"
    r.update(autoencoder=args.ae, data=args.data, image_size=image_size, reference=ref, align_stats=args.align_stats,
             network=inception.weights_name, resize=INCEPTION_RESIZE,
             ssim_convention="RGB per channel, Gaussian 11 / 1.5, valid, data range 255",
             lpips_network="VGG16 + v0.1 heads on uint8-quantised images")
    lines = [
        f"rFID {r['rfid']:.4f}: {n} reconstructions vs {ref}; {net}",
        f"PSNR {r['psnr']:.3f} dB, SSIM {r['ssim']:.4f}, LPIPS {r['lpips']:.4f}: mean over {n} uint8 images",
    ]
    check_finite_metrics(r)
    write_results(r, lines, args.out or args.ae + ".recon.json", dist)


def run_probe(args, dist):
    """Table 4 classification: linear probes on DINO-only vs SVG features."""
    ae = svg.load_autoencoder(args.ae, trust_pickle=args.trust_pickle).to(dist.device)
    ae.align_stats = args.align_stats
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
             epochs=args.epochs, optimizer=f"AdamW lr {PROBE_LR} wd {PROBE_WEIGHT_DECAY}", align_stats=args.align_stats)
    lines = [
        f"linear probe {name}: top-1 {r[name]['top1']:.2f}% top-5 {r[name]['top5']:.2f}% "
        f"({r[name]['channels']} channels, {r['num_train']} train / {r['num_val']} val images, "
        f"{r['num_classes']} classes)"
        for name in ("dino", "svg") if name in r
    ]
    write_results(r, lines, args.out or args.ae + ".probe.json", dist)


def single_process(command, dist):
    if dist.world_size > 1:
        raise ValueError(f"`eval.py {command}` runs in one process: start it with `python eval.py {command} ...`")


def run_pca(args, dist):
    """Fig. 11-12 (App. G): PCA feature maps of the chosen spaces of a stage-1 autoencoder, as one PNG."""
    single_process("pca", dist)
    ae = svg.load_autoencoder(args.ae, trust_pickle=args.trust_pickle).to(dist.device)
    ae.align_stats = args.align_stats
    image_size = args.image_size or ae.cfg.image_size
    dataset = spread_subset(svg.build_dataset(args.data, image_size, on_error="raise"), args.num_images)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(dist.device)  # [B, 3, H, W]
    rows = pca_feature_maps(ae, images, args.spaces, args.precision)
    out = args.out or args.ae + ".pca.png"
    svg.save_image_grid(rows, out)
    print(f"PCA feature maps (first {PCA_COMPONENTS} components as RGB, fitted over all {len(images)} x "
          f"{(image_size // svg.PATCH_SIZE) ** 2} patches per space, {PCA_QUANTILE:.0%}/{1 - PCA_QUANTILE:.0%} "
          f"quantile scaling): columns image, {', '.join(args.spaces)}; wrote {out}")


def run_pca_sit(args, dist):
    """Fig. 11-12 (App. G): PCA of a SiT block's hidden states at several t along an Euler sampling trajectory."""
    single_process("pca-sit", dist)
    model, stats, ae = svg.load_generator(args.ckpt, ae=args.ae, stats=args.stats,
                                         trust_pickle=args.trust_pickle)  # EMA SiT, frozen
    model, ae = model.to(dist.device), ae.to(dist.device)
    cfg, depth = model.cfg, len(model.blocks)
    block = depth // 2 if args.block is None else args.block
    if not 0 <= block < depth:
        raise ValueError(f"--block {block} is out of range: this SiT has blocks 0..{depth - 1}")
    bad = [c for c in args.classes if not 0 <= c < cfg.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside [0, {cfg.num_classes}) for this checkpoint")
    y = torch.tensor(args.classes, device=dist.device)  # [B]
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(y), cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)  # [B, C, h, w]
    times = svg.ode_time_grid(args.steps, args.shift)[:args.steps]  # t of each evaluation
    picks = [min(range(args.steps), key=lambda i: abs(times[i] - t)) for t in args.times]  # nearest evaluated t
    with svg.autocast(args.precision, dist.device):
        x0, states = sit_hidden_states(model, noise.to(dist.device), y, args.steps, block, picks, args.shift,
                                       args.cfg_scale)  # states [len(picks), B, N, D]
        images = ae.decode(svg.denormalize_features(x0.float(), stats)).float().clamp(-1, 1).cpu()  # [B, 3, H, W]
    B, h = len(y), cfg.input_size
    columns = [pca_panel(pca_rgb(s.transpose(1, 2).reshape(B, -1, h, h)), images.shape[-1])  # [B, 3, H, W]
               for s in states]  # one PCA per t, fitted over the B h w tokens at that t
    out = args.out or args.ckpt + ".pca-sit.png"
    svg.save_image_grid([torch.stack(row) for row in zip(*columns, images)], out)
    shown = ", ".join(f"{times[i]:.3f}" for i in picks)
    print(f"SiT block {block} hidden states, PCA per t over {B} x {h * h} tokens; columns t = {shown}, then the "
          f"sample ({args.steps} Euler steps, cfg {args.cfg_scale}); wrote {out}")


def run_tsne(args, dist):
    """Fig. 4a / Fig. 10 (App. E): t-SNE of pooled features, one panel per space, titled with its probe top-1."""
    require_viz()
    probe_files = args.probe or [path + ".probe.json" for path in args.ae]  # where `eval.py probe` writes
    if len(probe_files) != len(args.ae):
        raise ValueError(f"--probe needs one json per --ae: got {len(probe_files)} for {len(args.ae)}")
    panels, titles, labels = [], set(), None
    for path, probe_file in zip(args.ae, probe_files):
        ae = svg.load_autoencoder(path, trust_pickle=args.trust_pickle).to(dist.device)
        ae.align_stats = args.align_stats
        image_size = args.image_size or ae.cfg.image_size
        dataset = svg.build_dataset(args.data, image_size, on_error="raise")  # as `eval.py probe`
        subset = class_subset(dataset, args.num_classes, args.per_class, args.seed)
        feats, labels = pooled_features(ae, subset, dist, args.feature_batch_size, args.num_workers,
                                        args.precision)  # [N, C], [N]: the probe's pooling
        probe = None
        if os.path.isfile(probe_file):
            with open(probe_file) as f:
                probe = json.load(f)
        dino_dim = ae.dino.embed_dim
        for space in args.spaces:
            channels = dino_dim if space == "dino" else feats.shape[1]
            title = space_title(ae.cfg, space)
            if (space == "svg" and channels == dino_dim) or title in titles:
                continue  # a DINO-only autoencoder's "svg" is its "dino"; one panel per distinct space
            titles.add(title)
            top1 = None
            if probe is not None:
                if probe.get("align_stats", args.align_stats) != args.align_stats:
                    raise ValueError(f"{probe_file} was written with --align-stats {probe['align_stats']}, this "
                                     f"t-SNE encodes with {args.align_stats}: pass the same mode to both")
                if probe.get(space, {}).get("channels") != channels:
                    raise ValueError(f"{probe_file} has no {channels}-channel '{space}' probe: it was written for "
                                     f"another autoencoder than {path}; rerun `eval.py probe --ae {path}`")
                top1 = probe[space]["top1"]
            panels.append(dict(space=space, title=title, top1=top1, autoencoder=path, probe=probe_file,
                               features=feats[:, :channels]))
    if not dist.is_main:
        return
    labels = labels.cpu().numpy()
    plotted = []
    for p in panels:
        label = f"top-1 {p['top1']:.2f}%" if p["top1"] is not None else "no probe json"
        plotted.append((f"{p['title']}: {label}", tsne_embed(p.pop("features"), args.perplexity, args.seed)))
        p["panel_title"] = plotted[-1][0]
    out = args.out or args.ae[0] + ".tsne.png"
    plot_tsne(plotted, labels, out)
    n = len(labels)
    lines = [f"t-SNE panel '{p['panel_title']}' ({p['autoencoder']})" for p in panels]
    lines += [f"{args.num_classes} classes x {args.per_class} images = {n} points per panel, spatial-mean "
              f"pooled features; wrote {out}"]
    lines += [f"no probe json for {p['autoencoder']}: run `eval.py probe --ae {p['autoencoder']}` first to title "
              f"the panel with its linear-probe top-1" for p in panels if p["top1"] is None]
    results = dict(panels=panels, num_classes=args.num_classes, per_class=args.per_class, num_points=n,
                   data=args.data, png=out, perplexity=args.perplexity, seed=args.seed)
    write_results(results, lines, os.path.splitext(out)[0] + ".json", dist)


def run_sweep(args, dist):
    """Table 2 (few-step generation, model scaling) and Fig. 13 (CFG): FID / IS of one checkpoint
    at each step count x guidance scale, `sample.py export`'s samples made in memory, against one
    reference statistics pass."""
    out = args.out or args.ckpt + ".sweep"
    if len(args.cfg_scales) > 1:
        pyplot()  # fail before sampling, not after (on every rank: none starts alone)
    gen = sample.load_gen(args.ckpt, args.ae, args.stats, dist.device, args.trust_pickle)
    inception = load_inception(args.inception).to(dist.device)
    ref = reference_statistics(args.ref, inception, dist, args.batch_size, args.num_workers, need_features=False)
    method, params = model_name(gen.model)
    metric = fid_name(args.num_samples)
    rows = []
    for steps in args.steps:
        for w in args.cfg_scales:
            # App. A: the guided setting adds CFG-Zero*'s zero-init; w = 1 is export's plain default
            zero_init = args.zero_init_steps if w != 1 else 0
            sampler = sample.export_config(args.sampler_args, num_samples=args.num_samples, steps=steps,
                                           cfg_scale=w, zero_init_steps=zero_init)
            r = score_generator(gen, sampler, inception, ref, dist, args.batch_size, args.fid_method)
            if dist.is_main:
                rows.append(dict(r, steps=steps, cfg_scale=w, zero_init_steps=zero_init,
                                 sampler=sample.in_process_settings(sampler)))
                print(f"{steps} steps, cfg {w:g} (zero-init {zero_init}): {metric} {r['fid']:.4f}, "
                      f"IS {r['inception_score']:.3f}")
    if not dist.is_main:
        return
    table2, fig13 = sweep_tables(rows, method, params, metric)
    export = " ".join(["sample.py export", args.sampler_args]).strip()
    source = (f"{args.ckpt}, {metric} vs {ref['source']}; {network_note(inception)}; other sampler settings: "
              f"`{export}`'s defaults")
    lines = [f"Table 2 layout: {source}", *table2, "", "Fig. 13 (FID / IS against the guidance scale):", *fig13]
    if args.num_samples != PAPER_FID_SAMPLES:
        lines.append(f"note: {fid_count_note(args.num_samples)}")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if len(args.cfg_scales) > 1:
        plot_cfg_curve(rows, metric, f"Fig. 13: {method}, {metric}, {os.path.basename(args.ckpt)}", out + ".png")
        lines.append(f"wrote {out}.png")
    results = dict(rows=rows, checkpoint=args.ckpt, method=method, params=params, reference=ref["source"],
                   network=inception.weights_name, resize=INCEPTION_RESIZE, fid_method=args.fid_method)
    write_results(results, lines + [f"wrote {out}.md"], out + ".json", dist)


def run_curves(args):
    """Fig. 14: training loss and online FID-N against the step from train_dit.py's metrics.jsonl."""
    pyplot()
    runs = {os.path.basename(os.path.normpath(p)): read_training_metrics(p) for p in args.runs}
    plot_training_curves(runs, args.out)
    for name, (loss, fid) in runs.items():
        last = f"last loss {loss[-1]['loss']:.4f} at step {loss[-1]['step']}" if loss else "no loss records"
        best = min(fid, key=lambda r: r["fid"]) if fid else None
        print(f"{name}: {last}" + (f"; best {best['metric']} {best['fid']:.2f} at step {best['step']}" if best else ""))
        if fid and fid[0]["num_samples"] != PAPER_FID_SAMPLES:
            print(f"  note: {fid_count_note(fid[0]['num_samples'])}")
    print(f"wrote {args.out}")


def run_calibrate(args, dist):
    """Frozen Eq. (6) statistics for a checkpoint without them (the official .ckpt): a new stage-1 checkpoint."""
    ckpt = svg.load_checkpoint(args.ae, "--ae", args.trust_pickle)  # the authors' .ckpt or our own file
    ae = svg.load_autoencoder(ckpt).to(dist.device)
    if ae.cfg.align != "batch" or ae.residual is None:
        raise ValueError(f"{args.ae} does not align with batch statistics (align={ae.cfg.align!r}, use_residual="
                         f"{ae.cfg.use_residual}): it has no Eq. (6) statistics to calibrate")
    dataset = svg.build_dataset(args.data, ae.cfg.image_size, on_error="raise")  # ADM centre crop, no flip
    with svg.autocast(args.precision, dist.device):
        r = svg.calibrate_alignment(ae, dataset, args.num_images, args.batch_size, args.seed, dist, args.num_workers)
    step = ckpt.get("step", ckpt.get("global_step"))
    if dist.is_main:
        svg.atomic_save({"ae_config": dataclasses.asdict(ae.cfg), "ae": {k: v.cpu() for k, v in ae.state_dict().items()},
                         "step": step, "calibration": dict(r, source=args.ae, data=args.data)}, args.out)
    names = ("mu_R", "sigma_R", "mu_D", "sigma_D")
    lines = [f"Eq. (6) statistics from {r['batches']} batches of {r['batch_size']} images of {args.data} (seed "
             f"{args.seed}): " + ", ".join(f"{k} {v:.5f}" for k, v in zip(names, r["stats"])),
             "one batch's statistics stray from these by (std over batches / the matching sigma) "
             + ", ".join(f"{k} {v:.2%}" for k, v in zip(names, r["spread"])),
             f"wrote {args.out}: encodes with these frozen statistics by default"]
    write_results(dict(r, source=args.ae, data=args.data, out=args.out), lines,
                  os.path.splitext(args.out)[0] + ".calibration.json", dist)


def run_shapes(args, dist):
    """Tiny tier: requested-class accuracy and judge-feature FD of class-conditional samples.

    Rows: real synthetic images (the ceiling), stage-1 reconstructions of them, the SiT at
    its initialisation (untrained: the floor, ~1 / num_classes), and the checkpoint's EMA SiT.
    """
    if dist.world_size > 1:
        raise ValueError("`eval.py shapes` runs on one process: python eval.py shapes ...")
    ckpt = svg.load_checkpoint(args.ckpt, "--ckpt", args.trust_pickle)  # weights only unless trusted
    if not (isinstance(ckpt, dict) and "sit_config" in ckpt):
        raise ValueError(f"{args.ckpt} is not a train_dit.py checkpoint: `shapes` scores generators trained on the "
                         "built-in synthetic shapes (train_dit.py --preset tiny)")
    data = ckpt["args"].get("data")
    if data not in (None, "synthetic"):
        raise ValueError(f"{args.ckpt} was trained on --data {data!r}: `shapes` scores generators trained on the "
                         "synthetic shapes only (use `eval.py fid` for image folders)")
    gen = sample.load_gen(args.ckpt, None, None, dist.device, args.trust_pickle)  # EMA SiT, frozen, on the device
    model, ae = gen.model, gen.ae
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
    with torch.no_grad():
        recon = torch.cat([svg.to_uint8(ae.decode(ae.encode(real_u[i:i + 64].float().to(device) / 127.5 - 1))).cpu()
                           for i in range(0, n, 64)])  # [n, 3, H, W]
    # sample.py's sampler (per-index noise from --seed, Euler ODE + CFG, decode), as `sample.py grid`
    sampler = sample.export_config(seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale,
                                   batch_size=args.batch_size)
    noise = sample_noise(range(n), sample.feature_shape(gen), args.seed)  # [n, C, h, w]
    rows = {"real": real_u, "reconstruction": recon,
            "untrained": svg.to_uint8(sample.generate(argparse.Namespace(**{**vars(gen), "model": untrained.to(device)}),
                                                      noise, labels, sampler, device)).cpu(),
            "trained": svg.to_uint8(sample.generate(gen, noise, labels, sampler, device)).cpu()}
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

    def trusting(p):  # every command that reads --ae / --ckpt: a refused file's error names this flag
        p.add_argument("--trust-pickle", action="store_true", help=svg.TRUST_PICKLE_HELP)

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
    trusting(p)
    p.add_argument("--data", required=True, help="validation image folder (ImageNet val), or 'synthetic'")
    p.add_argument("--inception", required=True, help=f"path to {INCEPTION_FILE}")
    p.add_argument("--lpips-vgg", required=True, help="VGG16 trunk weights for LPIPS")
    p.add_argument("--lpips-heads", required=True, help="LPIPS v0.1 linear heads (vgg.pth)")
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's image_size")
    p.add_argument("--num-images", type=int, default=None, help="evaluate only the first N images (default all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch per rank")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32",
                   help="autoencoder precision (bf16 autocast); tf32 and bf16 also allow TF32 in Inception and LPIPS")
    p.add_argument("--align-stats", choices=svg.ALIGN_STATS_MODES, default="frozen", help=ALIGN_STATS_HELP)

    p = common(sub.add_parser("probe", help="linear probe top-1/top-5, DINO-only vs SVG features (Table 4)"))
    p.add_argument("--ae", required=True, help="stage-1 checkpoint (train_ae.py) or official .ckpt")
    trusting(p)
    p.add_argument("--data", required=True, help="labelled training folder (class subfolders), or 'synthetic'")
    p.add_argument("--val-data", default=None, help="held-out folder (default: hold out --holdout of --data)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of --data held out without --val-data")
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's image_size")
    p.add_argument("--epochs", type=int, default=30, help="App. B: 30")
    p.add_argument("--batch-size", type=int, default=3072, help="classifier batch (App. B: 3072)")
    p.add_argument("--feature-batch-size", type=int, default=64, help="images per encoder batch per rank")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32", help="autoencoder precision")
    p.add_argument("--align-stats", choices=svg.ALIGN_STATS_MODES, default="frozen", help=ALIGN_STATS_HELP)
    p.add_argument("--seed", type=int, default=0)

    p = common(sub.add_parser("calibrate", help="frozen Eq. (6) statistics for an autoencoder without them "
                                                "(the official .ckpt), written to a new stage-1 checkpoint"))
    p.add_argument("--ae", required=True, help="official SVG autoencoder .ckpt or train_ae.py checkpoint")
    trusting(p)
    p.add_argument("--data", required=True, help="training images (ImageNet train), or 'synthetic'")
    p.add_argument("--num-images", type=int, default=svg.CALIBRATION_IMAGES, help="fixed seeded sample of --data")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: the checkpoint's stage-1 per-GPU batch, 64 officially)")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32", help="autoencoder precision")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pca", help="Fig. 11-12 (App. G): PCA feature maps of SVG / DINO / residual as RGB")
    p.add_argument("--out", default=None, help="output PNG (default: AE.pca.png)")
    p.add_argument("--ae", required=True, help="stage-1 checkpoint (train_ae.py) or official .ckpt")
    p.add_argument("--data", required=True, help="image folder, or 'synthetic'")
    p.add_argument("--num-images", type=int, default=8, help="images, evenly spread over the data; one row each")
    p.add_argument("--align-stats", choices=svg.ALIGN_STATS_MODES, default="frozen", help=ALIGN_STATS_HELP)
    p.add_argument("--spaces", nargs="+", choices=("svg", "dino", "residual"), default=["svg", "dino", "residual"],
                   help="columns after the image: SVG (392 ch), DINO-only (384), residual-only (8)")
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's image_size")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32", help="autoencoder precision")
    trusting(p)

    p = sub.add_parser("pca-sit", help="Fig. 11-12 (App. G): PCA of SiT hidden states along sampling")
    p.add_argument("--out", default=None, help="output PNG (default: CKPT.pca-sit.png)")
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint (train_dit.py, or the official SVG-XL .pt)")
    p.add_argument("--ae", default=None, help="official SVG-XL only: its autoencoder .ckpt (HF howlin/SVG)")
    p.add_argument("--stats", default=None, help="official SVG-XL only: dinov3_sp_stats.pt (shiml20/SVG)")
    p.add_argument("--classes", type=int, nargs="+", default=[207, 360, 387, 974], help="one row per class id")
    p.add_argument("--block", type=int, default=None, help="0-based SiT block whose output is shown (default: middle)")
    p.add_argument("--times", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1],
                   help="columns: the evaluated step times nearest to these t (t = 1 noise, 0 data)")
    p.add_argument("--steps", type=int, default=25, help="Euler steps (App. A: 25)")
    p.add_argument("--shift", type=float, default=svg.SAMPLE_TIME_SHIFT, help="sampling time shift a")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance w (the conditional half is shown)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32")
    trusting(p)

    p = sub.add_parser("tsne", help="Fig. 4a / 10 (App. E): t-SNE of pooled features, titled with probe top-1")
    p.add_argument("--out", default=None, help="output PNG (default: first AE.tsne.png); titles and top-1 in .json")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--ae", nargs="+", required=True,
                   help="stage-1 checkpoints: SVG, align=none (Table 4), dino_layer=k (Table 6), ...")
    p.add_argument("--align-stats", choices=svg.ALIGN_STATS_MODES, default="frozen",
                   help=ALIGN_STATS_HELP + "; the same as the probe jsons were written with")
    p.add_argument("--probe", nargs="+", default=None,
                   help="`eval.py probe` json per --ae (default: AE.probe.json, where probe writes it)")
    p.add_argument("--data", required=True, help="labelled folder (class subfolders), or 'synthetic'")
    p.add_argument("--num-classes", type=int, default=20, help="random classes (paper: 100 and 20)")
    p.add_argument("--per-class", type=int, default=100, help="random images per class (paper: 100)")
    p.add_argument("--spaces", nargs="+", choices=TSNE_SPACES, default=list(TSNE_SPACES),
                   help="svg: all channels; dino: the first 384 (DINO-only)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--image-size", type=int, default=None, help="default: the autoencoder's image_size")
    p.add_argument("--feature-batch-size", type=int, default=64, help="images per encoder batch per rank")
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32", help="autoencoder precision")
    p.add_argument("--seed", type=int, default=0)
    trusting(p)

    p = sub.add_parser("sweep", help="Table 2 / Fig. 13: FID / IS of a checkpoint over step counts and "
                                     "guidance scales (one reference pass), table + PNG")
    p.add_argument("--out", default=None, help="output prefix for .json, .md, .png (default: <ckpt>.sweep)")
    p.add_argument("--num-workers", type=int, default=4, help="loader workers of the reference pass")
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint (train_dit.py, or the official SVG-XL .pt)")
    p.add_argument("--ae", default=None, help="official SVG-XL only: its autoencoder .ckpt")
    p.add_argument("--stats", default=None, help="official SVG-XL only: dinov3_sp_stats.pt")
    p.add_argument("--ref", required=True, help="VIRTUAL_imagenet256_labeled.npz, or an .npz / folder of images")
    p.add_argument("--inception", required=True, help=f"path to {INCEPTION_FILE}")
    p.add_argument("--steps", type=svg.positive_int, nargs="+", default=[5, 10, 25],
                   help="Euler step counts (Table 2: 5, 10, 25)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5],
                   help="guidance scales; 1 = w/o CFG (Table 2: 1 and 1.5; Fig. 13: a range)")
    p.add_argument("--zero-init-steps", type=int, default=1,
                   help="CFG-Zero* zero-init steps of the guided runs (App. A: 1 with cfg 1.5); cfg 1 uses 0")
    p.add_argument("--num-samples", type=svg.positive_int, default=PAPER_FID_SAMPLES,
                   help=f"samples per setting (FID-50K in the paper; >= {IS_SPLITS} for the IS splits)")
    p.add_argument("--sampler-args", default="",
                   help='other `sample.py export` flags, e.g. "--batch-size 250 --precision bf16" (default: '
                        "export's defaults: shift 1/0.15, Euler, balanced labels, seed 0)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch per rank")
    p.add_argument("--fid-method", choices=["eigh", "sqrtm"], default="eigh")
    trusting(p)

    p = sub.add_parser("curves", help="Fig. 14: training loss and online FID against the step (PNG)")
    p.add_argument("runs", nargs="+", help="train_dit.py output folders (or their metrics.jsonl)")
    p.add_argument("--out", default="training_curves.png", help="output PNG")

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
    trusting(p)

    p = sub.add_parser("bench-fid", help="time the FID statistics and matrix square root on random features")
    p.add_argument("--num", type=int, default=50000, help="feature vectors per set")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "bench-fid":
        return run_bench_fid(args)
    if args.command == "curves":
        return run_curves(args)
    if args.command == "sweep" and args.num_samples < IS_SPLITS:
        parser.error(f"--num-samples {args.num_samples}: the Inception Score needs at least {IS_SPLITS} samples")
    dist = svg.init_distributed()
    svg.setup_precision("fp32" if args.command in ("fid", "sweep", "shapes") else args.precision)  # exact fp32
    result = {"fid": run_fid, "recon": run_recon, "probe": run_probe, "pca": run_pca, "pca-sit": run_pca_sit,
              "tsne": run_tsne, "sweep": run_sweep, "calibrate": run_calibrate,
              "shapes": run_shapes}[args.command](args, dist)
    dist.close()
    return result


if __name__ == "__main__":
    main()
