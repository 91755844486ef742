"""Stage 2 of SVG: train the diffusion transformer (SiT with QK-Norm) on frozen SVG features.

Sec. 3.3 and Table 5 of arXiv 2510.15301: flow matching (Eq. 3-5, svg.flow_matching_loss)
on per-channel normalised features of the frozen stage-1 autoencoder, AdamW lr 1e-4,
global batch 256, EMA 0.9999. Features come either from the autoencoder on the fly
(like the official code, which forgets to load the autoencoder: here --ae is required)
or from a cache written once with --extract.

    # the paper's SVG-XL on 8 GPUs, encoding on the fly
    torchrun --nproc_per_node=8 train_dit.py --preset paper --data /imagenet/train --ae ae.pt --out runs/svg_xl
    # or: extract once (both flips), then train from the cache
    torchrun --nproc_per_node=8 train_dit.py --preset paper --data /imagenet/train --ae ae.pt --extract --cache /cache/in256
    torchrun --nproc_per_node=8 train_dit.py --preset paper --cache /cache/in256 --ae ae.pt --out runs/svg_xl
    # CPU, minutes: synthetic images and a tiny stage-1 checkpoint, from the cache (the fast path here)
    python train_dit.py --preset tiny --ae runs/ae-tiny/checkpoints/0000600.pt --extract --cache runs/cache-tiny
    python train_dit.py --preset tiny --ae runs/ae-tiny/checkpoints/0000600.pt --cache runs/cache-tiny
    # App. H: a new run at 512 px (25 epochs) from the 256 px weights, on the 512 px autoencoder
    torchrun --nproc_per_node=8 train_dit.py --preset paper --data /imagenet/train --ae runs/ae-512/ae.pt \
        --init-from runs/svg_xl/checkpoints/1501367.pt --out runs/svg_xl_512 --steps 125114
    # Fig. 14: also score the EMA model every 10K steps on FID-10K (not comparable with FID-50K)
    torchrun --nproc_per_node=8 train_dit.py ... --fid-every 10000 --fid-ref VIRTUAL_imagenet256_labeled.npz \
        --fid-inception pt_inception-2015-12-05-6726825d.pth

Eq. (6) statistics (--align-stats): "frozen" (default) encodes with the running statistics the
autoencoder kept in stage 1, so every image gets the same features in any batch, cached or on
the fly; "batch" uses each batch's statistics, as the official code (bit for bit with it). The
feature statistics pass and --extract encode in training-like batches either way: a seeded
permutation of the images cut into batches (of the stage-1 per-GPU size with --align-stats
batch, where the batch matters; of the per-process batch when frozen), the flips as batches of
their own, assigned to ranks round robin, so features never follow the folder's class order
(one class per batch) and do not depend on the number of processes.

Randomness: horizontal flips are part of the dataset (item k = image k mod N, flipped when
k >= N), and the noise, time and label dropout of a step are drawn for the whole global
batch from a generator seeded by (seed, step), each rank taking its samples' rows. So a
run does not depend on the number of GPUs, and resuming needs no generator state.

Logs: log.txt (text) and metrics.jsonl (one json record per line: the loss at each log step,
the online FID with --fid-every), which `python eval.py curves <out>` plots (Fig. 14). The
online FID-N is exactly what `sample.py export --num-samples N <--fid-sampler-args>` of that
step's checkpoint followed by `eval.py fid` reports: the same in-memory export (sample.py),
the same Inception pass (eval.py). FID-N for N < 50K is biased upward and is not comparable
with the paper's FID-50K.
"""

import argparse
import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import eval as ev
import sample
import svg

NO_BAD_STEP = 2**62  # "no non-finite loss yet" in the device-side NaN tracker
SYNTHETIC_DATA = dict(num_images=2048, num_classes=4)  # --data synthetic: train_ae.py tiny's 2048 images
PRESETS = {
    # Table 5 (SVG-XL): 7M steps x 256 = the released 1400-epoch model; official fp32 + TF32.
    "paper": dict(model="SiT-XL", data=None, global_batch=256, lr=1e-4, steps=7_000_000, ema_decay=svg.EMA_DECAY,
                  log_every=100, ckpt_every=50_000, precision="tf32", num_workers=8, out="runs/svg_xl", prediction="v",
                  loss_weight="velocity", time_shift=svg.TRAIN_TIME_SHIFT),
    # CPU tier, trained from the feature cache (--extract first): encoding each batch on the fly would cost
    # more than the SiT step. prediction "x" (not in the paper, svg.SiTConfig): with v-prediction SiT-tiny's
    # loss stalls (1.17 after 2000 steps), because v = eps - x_0 has full rank in all 392 channels of a token
    # and the SiT is 128 wide; x_0 does not (README, tiny tier). loss_weight "x0", time_shift 8 (not in the
    # paper): the x_0 error weighted 1 / (1 + t^2) instead of 1 / t^2, at times shifted toward noise, where
    # the shapes are laid out; with the paper's weight and shift 2.5 the samples were judged right 73% of the
    # time after 4000 steps, with these 97.5% (svg.flow_matching_loss). 6000 steps for a margin (89.5% after
    # 4000 in a run on a longer stage 1). EMA 0.995 averages the last ~200 steps; the paper's 0.9999 would
    # leave the EMA 55% at its initialisation after 6000 steps (0.9999^6000).
    "tiny": dict(model="SiT-tiny", data="synthetic", global_batch=32, lr=1e-3, steps=6000, ema_decay=0.995,
                 log_every=100, ckpt_every=1000, precision="fp32", num_workers=0, out="runs/dit_tiny", prediction="x",
                 loss_weight="x0", time_shift=8.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="defaults for every unset flag")
    p.add_argument("--ae", help="stage-1 autoencoder checkpoint (train_ae.py output or official SVG .ckpt)")
    p.add_argument("--data", help='image folder with class sub-folders, or "synthetic"')
    p.add_argument("--cache", help="feature cache folder: written by --extract, else trained from")
    p.add_argument("--extract", action="store_true", help="encode --data (both flips) into --cache, then exit")
    p.add_argument("--cache-dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--align-stats", choices=svg.ALIGN_STATS_MODES, default="frozen",
                   help="Eq. (6) statistics when encoding: the autoencoder's frozen running statistics, or each "
                        "batch's (official)")
    p.add_argument("--stats", help="feature stats file (native or official dinov3_sp_stats.pt) instead of computing")
    p.add_argument("--out", help="output folder: checkpoints/NNNNNNN.pt, log.txt, feature_stats.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in an --out that holds another run's checkpoints, DELETING them")
    p.add_argument("--model", choices=sorted(svg.SIT_PRESETS))
    p.add_argument("--image-size", type=svg.positive_int, help="default: the autoencoder's training size")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="unreadable images in --data")
    p.add_argument("--global-batch", type=svg.positive_int)
    p.add_argument("--lr", type=svg.positive_float, help="AdamW lr; on --resume the checkpoint's unless given")
    p.add_argument("--steps", type=svg.positive_int, help="total optimizer steps")
    p.add_argument("--grad-clip", type=float, help="clip the global grad norm (official: none)")
    p.add_argument("--ema-decay", type=svg.argument_type("ema_decay", float, lambda d: 0 <= d < 1, "in [0, 1)"), help="EMA decay per step (paper: 0.9999; sampling uses the EMA)")
    p.add_argument("--precision", choices=list(svg.PRECISIONS))
    p.add_argument("--compile", action="store_true", help="torch.compile the model forward")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute SiT blocks in backward")
    p.add_argument("--prediction", choices=("v", "x"), help="what the SiT outputs: v (paper) or x_0, turned into v "
                   "(not in the paper; JiT. svg.SiTConfig.prediction)")
    p.add_argument("--loss-weight", choices=svg.LOSS_WEIGHTS, help="lambda(t) of Eq. (5): velocity = 1 (paper) or "
                   "x0 = t^2 / (1 + t^2) (not in the paper; svg.flow_matching_loss)")
    p.add_argument("--time-shift", type=svg.positive_float, help="training time shift a of t = a u / (1 + (a - 1) u) "
                   f"(paper: {svg.TRAIN_TIME_SHIFT}, the official 0.4 in reversed time)")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--log-every", type=svg.positive_int)
    p.add_argument("--ckpt-every", type=svg.positive_int)
    p.add_argument("--resume", help='checkpoint path, or "auto" = the newest readable in <out>/checkpoints '
                                    '(fresh if none)')
    p.add_argument("--trust-pickle", action="store_true", help=svg.TRUST_PICKLE_HELP)
    p.add_argument("--init-from", metavar="PATH", help="App. H: start a NEW run (step 0, fresh AdamW, own --out) "
                   "from the model and EMA weights of a train_dit.py checkpoint or the official SVG-XL file, "
                   "e.g. trained at 256 px; the sin-cos table follows --ae's grid, feature stats are recomputed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-every", type=int, help="Fig. 14: every K steps (and at the end) score the EMA model on "
                   "FID-N, IS, logged to metrics.jsonl; needs --fid-ref and --fid-inception")
    p.add_argument("--fid-samples", type=int, default=10_000, help="N of the online FID-N (default FID-10K: NOT "
                   "comparable with the paper's FID-50K, which `sample.py export` + `eval.py fid` compute)")
    p.add_argument("--fid-ref", help="online FID reference: VIRTUAL_imagenet256_labeled.npz, or an .npz / image folder")
    p.add_argument("--fid-inception", help=f"online FID network: path to {ev.INCEPTION_FILE}")
    p.add_argument("--fid-sampler-args", default="", help='`sample.py export` flags of the online samples, e.g. '
                   '"--cfg-scale 1.5 --zero-init-steps 1" (default: export\'s: 25 Euler steps, cfg 1, balanced '
                   "labels, seed 0); the online number is that export's `eval.py fid`")
    args = p.parse_args(argv)
    svg.check_init_from(p, args, "runs/svg_xl_512")
    svg.apply_preset(args, PRESETS[args.preset])
    if args.fid_every is not None:
        if args.fid_every < 1 or args.fid_ref is None or args.fid_inception is None:
            p.error("--fid-every K needs K >= 1, --fid-ref (reference .npz or images) and --fid-inception "
                    f"({ev.INCEPTION_FILE})")
        if args.fid_samples < ev.IS_SPLITS:
            p.error(f"--fid-samples {args.fid_samples}: the Inception Score needs at least {ev.IS_SPLITS} samples")
        try:
            sample.export_config(args.fid_sampler_args, num_samples=args.fid_samples)
        except (ValueError, SystemExit) as e:
            p.error(f"--fid-sampler-args {args.fid_sampler_args!r} are not valid `sample.py export` flags ({e})")
    if args.ae is None:
        p.error("--ae is required: the stage-1 autoencoder checkpoint the features come from (train_ae.py output "
                "or the official SVG autoencoder .ckpt). The official release never loads it and trains on a "
                "random residual encoder; this script refuses to.")
    if args.cache is None and args.data is None:
        p.error("pass --data (an image folder, e.g. imagenet/train) or --cache (a folder written by --extract)")
    if args.extract and (args.cache is None or args.data is None):
        p.error("--extract needs --data (images to encode) and --cache (folder to write)")
    if args.image_size is not None and args.image_size % svg.PATCH_SIZE:
        p.error(f"--image-size {args.image_size} must be a multiple of {svg.PATCH_SIZE} (the patch size)")
    return args


def load_trained_autoencoder(path, trust_pickle=False):
    """Frozen stage-1 autoencoder; refuses a checkpoint saved before any training step."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ae {path!r} not found: pass the stage-1 checkpoint written by train_ae.py "
                                "or the official SVG autoencoder .ckpt (HF repo howlin/SVG)")
    ckpt = svg.load_checkpoint(path, "--ae", trust_pickle)  # weights only unless trusted
    trained_steps = ckpt.get("step", ckpt.get("global_step")) if isinstance(ckpt, dict) else None
    if trained_steps == 0:
        raise ValueError(f"--ae {path!r} was saved at step 0: its residual encoder and decoder are random "
                         "weights. Train the autoencoder first (train_ae.py) or pass a trained checkpoint")
    return svg.load_autoencoder(ckpt)


def init_weights(path, trust_pickle=False):
    """App. H: (SiTConfig, model state, EMA state) of a train_dit.py checkpoint or the official SVG-XL file.

    The state dicts do not depend on the image size: pos_embed is a fixed, unsaved buffer that
    SiT rebuilds for its own grid (sincos_pos_embed_2d), so 16x16 weights load into a 32x32 SiT.
    """
    ckpt = svg.load_checkpoint(path, "--init-from", trust_pickle)  # our own / the authors' file
    if svg.stage2_kind(ckpt, f"--init-from {path!r}") == "native":
        return svg.SiTConfig(**ckpt["sit_config"]), ckpt["model"], ckpt["ema"]
    state = svg.import_official_sit(ckpt["ema"]).state_dict()  # official: EMA weights only, reversed time
    return svg.official_sit_config(ckpt["ema"]), state, state


def fingerprint(module):
    """sha256 of a state dict: ties a feature cache to the exact autoencoder weights."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FlippedPairs(Dataset):
    """The training set with horizontal flips as items: k < N is image k, k >= N image k - N flipped."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return 2 * len(self.images)

    def __getitem__(self, k):
        image, label = self.images[k % len(self.images)]
        return (image.flip(-1) if k >= len(self.images) else image), label


class FeatureCache(Dataset):
    """Features written by --extract: features.npy [N, 2, C, h, w] (flip axis), labels.npy [N].

    Item k = (features of image k mod N, flipped if k >= N), as FlippedPairs. Items are the
    stored dtype (float16, or bfloat16 bits as int16); `to_float` converts a batch on device.
    """

    def __init__(self, root):
        if not os.path.isfile(os.path.join(root, "meta.json")):
            raise FileNotFoundError(f"no feature cache in {root!r}: write it first with --extract --data <images> "
                                    f"--cache {root}")
        with open(os.path.join(root, "meta.json")) as f:
            self.meta = json.load(f)
        self.root, self.features = root, None  # memmap opened lazily, once per worker
        self.labels = np.load(os.path.join(root, "labels.npy"))

    def __len__(self):
        return 2 * len(self.labels)

    def __getitem__(self, k):
        if self.features is None:
            self.features = np.load(os.path.join(self.root, "features.npy"), mmap_mode="r")
        N = len(self.labels)
        return torch.from_numpy(np.array(self.features[k % N, k // N])), int(self.labels[k % N])  # [C, h, w]

    def to_float(self, x):
        return (x.view(torch.bfloat16) if self.meta["dtype"] == "bfloat16" else x).float()


def encoded_images(ae, images, dist, batch, num_workers, seed):
    """This rank's share of every image's features: (indices [k], labels [k], F(x) [k, C, h, w],
    F(flipped x) [k, C, h, w]), encoded in training-like batches (svg.training_like_batches),
    the flipped images as a batch of their own. The same features for any world size."""
    batches = svg.training_like_batches(len(images), batch, dist, seed)
    loader = DataLoader(images, batch_sampler=[b for b, _ in batches], num_workers=num_workers,
                        pin_memory=dist.device.type == "cuda")
    for (index, keep), (x, y) in zip(batches, loader):
        x = x.to(dist.device, non_blocking=True)
        f, f_flip = ae.encode(x), ae.encode(x.flip(-1))  # [B, C, h, w] each
        yield torch.tensor(index[:keep]), y[:keep], f[:keep], f_flip[:keep]


@torch.no_grad()
def compute_feature_stats(ae, images, dist, batch, num_workers, seed=0):
    """Exact per-channel stats of the 2N (image, flip) training features, split over ranks."""
    acc = svg.FeatureStatsAccumulator(ae.feature_dim, dist.device)
    for _, _, f, f_flip in tqdm(encoded_images(ae, images, dist, ae.encode_batch_size(batch), num_workers, seed),
                                desc="feature stats", disable=not dist.is_main):
        acc.update(f)
        acc.update(f_flip)
    return acc.result()


@torch.no_grad()
def extract_features(args, dist, ae, images, log):
    """Write the feature cache: both flips of every image, stats, meta. Atomic (a .partial folder
    renamed at the end); every rank fills its images' rows of one shared memory-mapped array."""
    if os.path.exists(args.cache):
        raise FileExistsError(f"feature cache {args.cache!r} already exists: train from it with --cache, or delete "
                              "it to extract again")
    tmp = args.cache.rstrip("/") + ".partial"
    N, C, grid = len(images), ae.feature_dim, args.image_size // svg.PATCH_SIZE
    store = np.float16 if args.cache_dtype == "float16" else np.int16  # bf16 bits in int16
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier extraction
        os.makedirs(tmp)
        np.lib.format.open_memmap(os.path.join(tmp, "features.npy"), "w+", store, (N, 2, C, grid, grid))
        np.lib.format.open_memmap(os.path.join(tmp, "labels.npy"), "w+", np.int64, (N,))
        log(f"extracting {N} images x 2 flips -> {args.cache} ({N * 2 * C * grid * grid * 2 / 2**30:.1f} GiB)")
    dist.barrier()
    if not os.path.isfile(os.path.join(tmp, "features.npy")):
        raise FileNotFoundError(f"rank {dist.rank} cannot see {tmp}/features.npy written by rank 0: --cache must be "
                                "on a filesystem shared by all nodes")
    features = np.load(os.path.join(tmp, "features.npy"), mmap_mode="r+")
    labels = np.load(os.path.join(tmp, "labels.npy"), mmap_mode="r+")
    acc = svg.FeatureStatsAccumulator(C, dist.device)
    batch = ae.encode_batch_size(args.global_batch // dist.world_size)
    for index, y, f, f_flip in tqdm(encoded_images(ae, images, dist, batch, args.num_workers, args.seed),
                                    desc="extract", disable=not dist.is_main):
        acc.update(f)
        acc.update(f_flip)
        f = torch.stack([f, f_flip], 1)  # [k, 2, C, h, w]
        if args.cache_dtype == "float16":
            f = f.half()
            if not torch.isfinite(f).all():
                raise ValueError("features overflow float16: extract again with --cache-dtype bfloat16")
        else:
            f = f.bfloat16().view(torch.int16)
        features[index.numpy()] = f.cpu().numpy()
        labels[index.numpy()] = y.numpy()
    features.flush()
    labels.flush()
    stats = acc.result()  # all ranks' features
    dist.barrier()
    if dist.is_main:
        torch.save(stats, os.path.join(tmp, "stats.pt"))
        meta = dict(num_images=N, channels=C, grid=grid, dtype=args.cache_dtype, image_size=args.image_size,
                    num_classes=images.num_classes, ae_config=asdict(ae.cfg), ae_fingerprint=fingerprint(ae),
                    align_stats=ae.align_stats, encode_batch=batch, seed=args.seed)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, args.cache)
        log(f"feature cache written: {args.cache}")
    dist.barrier()


def step_noise(generator, seed, step, global_batch, positions, shape, shift, dropout_prob):
    """(t, eps, drop) of this rank's samples: drawn for the whole global batch from (seed, step),
    rows taken at `positions` (the rank's places in the global batch). The same sample gets the
    same randomness for any world size; resuming needs no generator state."""
    generator.manual_seed(seed * 2**32 + step)
    device = generator.device
    t = svg.sample_training_time(global_batch, shift, device, generator)  # [G]
    eps = torch.randn(global_batch, *shape, device=device, generator=generator)  # [G, C, h, w]
    drop = torch.rand(global_batch, device=device, generator=generator) < dropout_prob  # [G]
    return t[positions], eps[positions], drop[positions]


def main(argv=None):
    # ---------------------------------------------------------------- config, distributed, seed, logger
    args = parse_args(argv)
    dist = svg.init_distributed()
    device = dist.device
    svg.setup_precision(args.precision)
    svg.set_seed(args.seed * dist.world_size + dist.rank)
    if args.global_batch % dist.world_size:
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by {dist.world_size} processes")
    local_batch = args.global_batch // dist.world_size
    if dist.is_main:
        os.makedirs(args.out, exist_ok=True)

    def log(msg):
        if dist.is_main:
            print(msg, flush=True)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def log_metrics(**record):  # metrics.jsonl next to log.txt: `eval.py curves` plots it (Fig. 14)
        if dist.is_main:
            with open(os.path.join(args.out, ev.TRAINING_METRICS), "a") as f:
                f.write(json.dumps(record) + "\n")

    fresh = args.resume is None and not args.extract  # --extract writes no checkpoints
    lock = svg.claim_output(args.out, fresh, args.overwrite, log) if dist.is_main else None  # refuses a used --out
    if fresh and dist.is_main:  # a fresh run's curves start empty (an --overwrite'n run's records go too)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, ev.TRAINING_METRICS))

    log(f"train_dit.py {json.dumps(vars(args))} | {dist.world_size} process(es) on {device}")
    resume, ckpt = svg.resume_checkpoint(args.resume, args.out, log, "--resume checkpoint", args.trust_pickle)
    init = init_weights(args.init_from, args.trust_pickle) if args.init_from else None  # App. H: (SiTConfig, model, EMA)

    # ---------------------------------------------------------------- frozen autoencoder and data
    ae = load_trained_autoencoder(args.ae, args.trust_pickle)
    ae.align_stats = args.align_stats  # every encode below (stats pass, --extract, on the fly) honours it
    ae_state = {k: v.clone() for k, v in ae.state_dict().items()}  # CPU copy for checkpoints
    if args.image_size is None:
        args.image_size = ae.cfg.image_size
    C, grid = ae.feature_dim, args.image_size // svg.PATCH_SIZE
    if args.cache is None or args.extract:
        images = svg.build_dataset(args.data, args.image_size, crop="center", flip=False, seed=args.seed,
                                   on_error=args.on_error, **SYNTHETIC_DATA)
        ae.to(device)
    if args.extract:
        extract_features(args, dist, ae, images, log)
        if dist.is_main:
            lock.release()
        dist.close()
        return
    if args.cache is None:
        train_set, num_classes = FlippedPairs(images), images.num_classes
    else:
        train_set = FeatureCache(args.cache)
        meta = train_set.meta
        if meta["ae_fingerprint"] != fingerprint(ae):
            raise ValueError(f"the cache {args.cache!r} was extracted with a different autoencoder (ae_config "
                             f"{meta['ae_config']}): pass the same --ae, or extract again")
        num_classes, grid = meta["num_classes"], meta["grid"]
        ae.align_stats = meta.get("align_stats", "batch")  # how the cached features were made (older: batch)
    if ckpt is not None:
        stats = svg.load_feature_stats(ckpt["feature_stats"], C)
    elif args.stats is not None:
        stats = svg.load_feature_stats(args.stats, C)
    elif args.cache is not None:
        stats = svg.load_feature_stats(os.path.join(args.cache, "stats.pt"), C)
    else:
        stats = compute_feature_stats(ae, images, dist, local_batch, args.num_workers, args.seed)
        if not all(torch.isfinite(v).all() for v in stats.values()):
            raise ValueError(f"the features of --ae {args.ae} on --data {args.data} are not finite (NaN/inf), so "
                             "neither are their statistics: the autoencoder is broken, not the diffusion lr")
        if dist.is_main:
            svg.atomic_save(stats, os.path.join(args.out, "feature_stats.pt"))
    stats_dev = {k: v.to(device) for k, v in stats.items()}
    sampler = svg.ResumableSampler(len(train_set), dist.world_size, dist.rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0, drop_last=True)
    if len(loader) == 0:  # drop_last would yield no batch at all and the loop would spin forever
        raise ValueError(f"{len(train_set)} training items ({len(train_set) // 2} images x 2 flips) is less than "
                         f"one global batch ({args.global_batch}): use a smaller --global-batch or more data")
    log(f"data: {len(train_set) // 2} images x 2 flips, {num_classes} classes, features [{C}, {grid}, {grid}], "
        f"{'cache ' + args.cache if args.cache else 'encoded on the fly'}")

    # ---------------------------------------------------------------- model, EMA, optimizer
    cfg = svg.SiTConfig(**{**asdict(svg.SIT_PRESETS[args.model]), "in_channels": C, "input_size": grid,
                           "num_classes": num_classes, "grad_checkpointing": args.grad_checkpointing,
                           "prediction": args.prediction})
    if ckpt is not None:  # a run started from the official weights (--init-from) keeps their reversed time
        cfg = replace(cfg, reversed_time=ckpt["sit_config"].get("reversed_time", False))
    if init is not None:  # App. H: the source run's architecture on this run's feature grid
        cfg = replace(cfg, reversed_time=init[0].reversed_time)
        free = {"input_size", "grad_checkpointing", "class_dropout_prob"}  # not fixed by the weights
        diff = [f"{k} {v} there, {getattr(cfg, k)} here" for k, v in asdict(init[0]).items()
                if k not in free and getattr(cfg, k) != v]
        if diff:
            raise ValueError(f"--init-from {args.init_from} does not fit this run ({'; '.join(diff)}): pass the same "
                             "--model and --prediction, an --ae with the same feature channels and data with the same "
                             "classes")
    with torch.random.fork_rng(devices=[]):  # init depends on --seed only, not on the world size
        torch.manual_seed(args.seed)
        raw = svg.SiT(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    # broadcast_buffers=False: the only buffer is the fixed pos_embed, no need to resend it every step
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False) if dist.initialized else raw
    forward = torch.compile(model) if args.compile else model
    # fused: one multi-tensor kernel per step instead of several per parameter (CUDA and CPU)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, betas=svg.ADAM_BETAS, weight_decay=0, fused=True)
    log(f"{args.model}: {sum(p.numel() for p in raw.parameters()):,} parameters, {cfg}")

    # ---------------------------------------------------------------- resume
    step = 0
    if init is not None:  # App. H: model and EMA weights only; AdamW, step, data order and stats start fresh
        svg.load_strict(raw, init[1], f"--init-from {args.init_from} (model)")
        svg.load_strict(ema, init[2], f"--init-from {args.init_from} (EMA)")
        log(f"initialised model and EMA from {args.init_from} ({init[0].input_size}x{init[0].input_size} -> "
            f"{grid}x{grid} features, sin-cos table rebuilt for {grid}x{grid}); step 0, fresh AdamW, feature "
            "statistics of this run's features (not the source run's)")
        init = None  # free the source weights
    elif ckpt is None:
        svg.update_ema(ema, raw, decay=0)  # EMA starts as an exact copy
    else:
        if asdict(svg.SiTConfig(**ckpt["sit_config"])) != asdict(cfg):  # older files: defaults for newer fields
            raise ValueError(f"{resume} has sit_config {ckpt['sit_config']}, this run builds {asdict(cfg)}")
        if any(k in ckpt["ae"] and not torch.equal(v, ckpt["ae"][k]) for k, v in ae_state.items()):  # older: no align_*
            raise ValueError(f"{resume} was trained on features of a different autoencoder than --ae {args.ae}")
        if ckpt.get("align_stats", "batch") != ae.align_stats:  # Eq. (6) mode of the features it trained on
            raise ValueError(f"{resume} was trained on features encoded with --align-stats "
                             f"{ckpt.get('align_stats', 'batch')}, this run encodes with {ae.align_stats}: pass "
                             f"--align-stats {ckpt.get('align_stats', 'batch')} (or a --cache made that way)")
        svg.load_strict(raw, ckpt["model"], resume)  # also refuses NaN / inf weights
        svg.load_strict(ema, ckpt["ema"], f"the EMA of {resume}")  # never re-initialised after resume
        opt.load_state_dict(ckpt["opt"])
        svg.resume_lr(args, [opt], log)  # an explicit --lr takes effect, else the checkpoint's
        sampler.load_state_dict(ckpt["sampler"])
        svg.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        log(f"resumed from {resume} at step {step}")
    del ckpt
    raw.train()

    # ---------------------------------------------------------------- online FID (Fig. 14), optional
    if args.fid_every is not None:
        fid_sampler = sample.export_config(args.fid_sampler_args, num_samples=args.fid_samples)
        inception = ev.load_inception(args.fid_inception).to(device)
        fid_ref = ev.reference_statistics(args.fid_ref, inception, dist, num_workers=args.num_workers,
                                          need_features=False)
        fid_gen = SimpleNamespace(model=ema, stats=svg.load_feature_stats(stats, C), ae=ae.to(device),
                                  num_classes=cfg.num_classes)  # what sample.load_gen rebuilds from a checkpoint
        export = " ".join(["sample.py export --num-samples", str(args.fid_samples), args.fid_sampler_args]).strip()
        log(f"online {ev.fid_name(args.fid_samples)} every {args.fid_every} steps: EMA model, `{export}` samples "
            f"scored by `eval.py fid` vs {fid_ref['source']}. Note: {ev.fid_count_note(args.fid_samples)}")

    # ---------------------------------------------------------------- training loop
    def batches():
        while True:
            for batch in loader:
                sampler.advance(len(batch[1]))  # consumed: a checkpoint after this step resumes after it
                yield batch
            sampler.set_epoch(sampler.epoch + 1)

    generator = torch.Generator(device)
    positions = torch.arange(local_batch, device=device) * dist.world_size + dist.rank  # ResumableSampler order
    loss_sum, first_bad = torch.zeros((), device=device), torch.full((), NO_BAD_STEP, device=device)
    last_ckpt, window_start, window_steps = resume, time.time(), 0

    def stop_if_nonfinite(weights=False):
        # The NaN/inf check is a device-side running minimum of the first bad step, read only here
        # (log and checkpoint steps): no per-step host sync, the exact step is still named, and no
        # checkpoint is ever written after a bad step. An update can overflow after a finite loss,
        # so before a save (weights=True) the weights themselves are checked too: the last
        # checkpoint on disk is always finite.
        bad = first_bad.clone()
        if dist.initialized:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        what = f"loss (NaN/inf) first at step {bad.item()}" if bad.item() != NO_BAD_STEP else None
        if what is None and weights:
            nonfinite = svg.nonfinite_tensors(raw.state_dict()) + svg.nonfinite_tensors(ema.state_dict())
            what = f"weights (NaN/inf in {nonfinite[:3]}) after step {step}" if nonfinite else None
        if what is not None:
            msg = (f"non-finite {what}: training stopped, nothing saved. Last good checkpoint: "
                   f"{last_ckpt or 'none written yet'}. Resume from it (--resume) with e.g. --grad-clip 1.0, "
                   "a lower --lr or --precision fp32")
            dist.close()
            raise SystemExit(msg if dist.is_main else 1)

    data = batches()
    log(f"training {args.steps} steps, global batch {args.global_batch} ({local_batch} per process), "
        f"precision {args.precision}")
    while step < args.steps:
        x, y = next(data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # No graph through the frozen encoder; it runs outside autocast, with the same numerics as
        # the statistics pass and --extract (before the cache rounds to 16 bits); ~3% of the FLOPs.
        with torch.no_grad():
            x0 = ae.encode(x) if args.cache is None else train_set.to_float(x)  # [B, C, h, w]
            x0 = svg.normalize_features(x0, stats_dev)
        t, eps, drop = step_noise(generator, args.seed, step, args.global_batch, positions, x0.shape[1:],
                                  args.time_shift, cfg.class_dropout_prob)
        with svg.autocast(args.precision, device):
            loss = svg.flow_matching_loss(forward, x0, y, t=t, eps=eps, drop_labels=drop, weight=args.loss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        svg.update_ema(ema, raw, args.ema_decay)
        step += 1
        window_steps += 1
        loss = loss.detach()
        loss_sum += loss
        first_bad = torch.where(torch.isfinite(loss), first_bad, torch.clamp(first_bad, max=step))

        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps:
            stop_if_nonfinite(weights=step % args.ckpt_every == 0 or step == args.steps)  # never per step
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = dist.all_reduce_mean(loss_sum).item() / window_steps
            elapsed = time.time() - window_start
            log(f"step {step:7d} | loss {mean_loss:.4f} | {window_steps / elapsed:.2f} steps/s | "
                f"{window_steps * local_batch / elapsed:.1f} img/s per process"
                + (svg.skipped_note(images) if args.cache is None else ""))
            log_metrics(step=step, loss=mean_loss, steps_per_s=window_steps / elapsed)
            loss_sum.zero_()
            window_start, window_steps = time.time(), 0
        if step % args.ckpt_every == 0 or step == args.steps:
            if dist.is_main:
                last_ckpt = os.path.join(args.out, "checkpoints", f"{step:07d}.pt")
                svg.atomic_save({
                    "model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "sit_config": asdict(cfg), "feature_stats": stats, "ae_config": asdict(ae.cfg),
                    "ae": ae_state, "align_stats": ae.align_stats, "sampler": sampler.state_dict(),
                    "rng": svg.rng_state(),
                    "args": vars(args),
                }, last_ckpt)
                log(f"saved {last_ckpt}")
        if args.fid_every is not None and (step % args.fid_every == 0 or step == args.steps):
            stop_if_nonfinite(weights=True)  # never score (or sample) a diverged EMA
            t0 = time.time()
            r = ev.score_generator(fid_gen, fid_sampler, inception, fid_ref, dist)
            if dist.is_main:
                log(f"step {step:7d} | {r['metric']} {r['fid']:.4f} | IS {r['inception_score']:.3f} "
                    f"(EMA, online, {time.time() - t0:.0f} s)")
                log_metrics(step=step, **r, reference=fid_ref["source"],
                            sampler=sample.in_process_settings(fid_sampler))
            window_start += time.time() - t0  # the speed log counts training time only

    # ---------------------------------------------------------------- teardown
    dist.barrier()
    if dist.is_main:
        lock.release()
    dist.close()


if __name__ == "__main__":
    main()
