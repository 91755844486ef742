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
    python train_dit.py --preset tiny --ae runs/ae-tiny/checkpoints/0002400.pt --extract --cache runs/cache-tiny
    python train_dit.py --preset tiny --ae runs/ae-tiny/checkpoints/0002400.pt --cache runs/cache-tiny

Randomness: horizontal flips are part of the dataset (item k = image k mod N, flipped when
k >= N), and the noise, time and label dropout of a step are drawn for the whole global
batch from a generator seeded by (seed, step), each rank taking its samples' rows. So a
run does not depend on the number of GPUs, and resuming needs no generator state.
"""

import argparse
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import svg

NO_BAD_STEP = 2**62  # "no non-finite loss yet" in the device-side NaN tracker
SYNTHETIC_DATA = dict(num_images=2048, num_classes=4)  # --data synthetic: train_ae.py tiny's 2048 images
PRESETS = {
    # Table 5 (SVG-XL): 7M steps x 256 = the released 1400-epoch model; official fp32 + TF32.
    "paper": dict(model="SiT-XL", data=None, global_batch=256, lr=1e-4, steps=7_000_000, ema_decay=svg.EMA_DECAY,
                  log_every=100, ckpt_every=50_000, precision="tf32", num_workers=8, out="runs/svg_xl"),
    # CPU tier, trained from the feature cache (--extract first): a cached step is 47 ms of CPU time at
    # batch 64, encoding the batch on the fly would add 60 ms (DINO block 0 + F_R at 32 px), so the cache
    # is the fast path here (~2.3x per step). EMA 0.999 averages the last ~1000 steps; the paper's 0.9999
    # would leave the EMA 82% at its initialisation after 2000 steps (0.9999^2000).
    "tiny": dict(model="SiT-tiny", data="synthetic", global_batch=64, lr=1e-3, steps=2000, ema_decay=0.999,
                 log_every=100, ckpt_every=500, precision="fp32", num_workers=0, out="runs/dit_tiny"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="defaults for every unset flag")
    p.add_argument("--ae", help="stage-1 autoencoder checkpoint (train_ae.py output or official SVG .ckpt)")
    p.add_argument("--data", help='image folder with class sub-folders, or "synthetic"')
    p.add_argument("--cache", help="feature cache folder: written by --extract, else trained from")
    p.add_argument("--extract", action="store_true", help="encode --data (both flips) into --cache, then exit")
    p.add_argument("--cache-dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--stats", help="feature stats file (native or official dinov3_sp_stats.pt) instead of computing")
    p.add_argument("--out", help="output folder: checkpoints/NNNNNNN.pt, log.txt, feature_stats.pt")
    p.add_argument("--model", choices=sorted(svg.SIT_PRESETS))
    p.add_argument("--image-size", type=int, help="default: the autoencoder's training size")
    p.add_argument("--global-batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--grad-clip", type=float, help="clip the global grad norm (official: none)")
    p.add_argument("--ema-decay", type=float, help="EMA decay per step (paper: 0.9999; sampling uses the EMA)")
    p.add_argument("--precision", choices=list(svg.PRECISIONS))
    p.add_argument("--compile", action="store_true", help="torch.compile the model forward")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute SiT blocks in backward")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--resume", help='checkpoint path, or "auto" = the latest in <out>/checkpoints (fresh if none)')
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    svg.apply_preset(args, PRESETS[args.preset])
    if args.ae is None:
        p.error("--ae is required: the stage-1 autoencoder checkpoint the features come from (train_ae.py output "
                "or the official SVG autoencoder .ckpt). The official release never loads it and trains on a "
                "random residual encoder; this script refuses to.")
    if args.cache is None and args.data is None:
        p.error("pass --data (an image folder, e.g. imagenet/train) or --cache (a folder written by --extract)")
    if args.extract and (args.cache is None or args.data is None):
        p.error("--extract needs --data (images to encode) and --cache (folder to write)")
    return args


def load_trained_autoencoder(path):
    """Frozen stage-1 autoencoder; refuses a checkpoint saved before any training step."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ae {path!r} not found: pass the stage-1 checkpoint written by train_ae.py "
                                "or the official SVG autoencoder .ckpt (HF repo howlin/SVG)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own / the authors' file
    trained_steps = ckpt.get("step", ckpt.get("global_step")) if isinstance(ckpt, dict) else None
    if trained_steps == 0:
        raise ValueError(f"--ae {path!r} was saved at step 0: its residual encoder and decoder are random "
                         "weights. Train the autoencoder first (train_ae.py) or pass a trained checkpoint")
    return svg.load_autoencoder(ckpt)


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


def shard(n, dist):
    """This rank's contiguous share of range(n) (every item exactly once over all ranks)."""
    bounds = np.linspace(0, n, dist.world_size + 1).astype(int)
    return range(bounds[dist.rank], bounds[dist.rank + 1])


@torch.no_grad()
def compute_feature_stats(ae, images, dist, batch, num_workers):
    """Exact per-channel stats of the 2N (image, flip) training features, split over ranks."""
    loader = DataLoader(Subset(FlippedPairs(images), shard(2 * len(images), dist)), batch_size=batch,
                        num_workers=num_workers, pin_memory=dist.device.type == "cuda")
    acc = svg.FeatureStatsAccumulator(ae.feature_dim, dist.device)
    for x, _ in tqdm(loader, desc="feature stats", disable=not dist.is_main):
        acc.update(ae.encode(x.to(dist.device, non_blocking=True)))
    return acc.result()


@torch.no_grad()
def extract_features(args, dist, ae, images, log):
    """Write the feature cache: both flips of every image, stats, meta. Atomic (a .partial folder
    renamed at the end); every rank fills its shard of one shared memory-mapped array."""
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
    mine = shard(N, dist)
    loader = DataLoader(Subset(images, mine), batch_size=args.global_batch // dist.world_size,
                        num_workers=args.num_workers, pin_memory=dist.device.type == "cuda")
    acc = svg.FeatureStatsAccumulator(C, dist.device)
    i = mine.start
    for x, y in tqdm(loader, desc="extract", disable=not dist.is_main):
        x = x.to(dist.device, non_blocking=True)
        f = ae.encode(torch.cat([x, x.flip(-1)]))  # [2B, C, h, w]
        acc.update(f)
        f = f.view(2, -1, *f.shape[1:]).transpose(0, 1)  # [B, 2, C, h, w]
        if args.cache_dtype == "float16":
            f = f.half()
            if not torch.isfinite(f).all():
                raise ValueError("features overflow float16: extract again with --cache-dtype bfloat16")
        else:
            f = f.bfloat16().view(torch.int16)
        features[i:i + len(y)] = f.cpu().numpy()
        labels[i:i + len(y)] = y.numpy()
        i += len(y)
    features.flush()
    labels.flush()
    stats = acc.result()  # all ranks' features
    dist.barrier()
    if dist.is_main:
        torch.save(stats, os.path.join(tmp, "stats.pt"))
        meta = dict(num_images=N, channels=C, grid=grid, dtype=args.cache_dtype, image_size=args.image_size,
                    num_classes=images.num_classes, ae_config=asdict(ae.cfg), ae_fingerprint=fingerprint(ae))
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

    log(f"train_dit.py {json.dumps(vars(args))} | {dist.world_size} process(es) on {device}")
    resume = svg.latest_checkpoint(args.out) if args.resume == "auto" else args.resume
    if args.resume == "auto" and resume is None:
        log(f"--resume auto: no checkpoint in {args.out}/checkpoints, starting fresh")
    ckpt = torch.load(resume, map_location="cpu", weights_only=False) if resume else None

    # ---------------------------------------------------------------- frozen autoencoder and data
    ae = load_trained_autoencoder(args.ae)
    ae_state = {k: v.clone() for k, v in ae.state_dict().items()}  # CPU copy for checkpoints
    if args.image_size is None:
        args.image_size = ae.cfg.image_size
    C, grid = ae.feature_dim, args.image_size // svg.PATCH_SIZE
    if args.cache is None or args.extract:
        images = svg.build_dataset(args.data, args.image_size, crop="center", flip=False, seed=args.seed,
                                   **SYNTHETIC_DATA)
        ae.to(device)
    if args.extract:
        extract_features(args, dist, ae, images, log)
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
    if ckpt is not None:
        stats = svg.load_feature_stats(ckpt["feature_stats"], C)
    elif args.stats is not None:
        stats = svg.load_feature_stats(args.stats, C)
    elif args.cache is not None:
        stats = svg.load_feature_stats(os.path.join(args.cache, "stats.pt"), C)
    else:
        stats = compute_feature_stats(ae, images, dist, local_batch, args.num_workers)
        if dist.is_main:
            svg.atomic_save(stats, os.path.join(args.out, "feature_stats.pt"))
    stats_dev = {k: v.to(device) for k, v in stats.items()}
    sampler = svg.ResumableSampler(len(train_set), dist.world_size, dist.rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0, drop_last=True)
    log(f"data: {len(train_set) // 2} images x 2 flips, {num_classes} classes, features [{C}, {grid}, {grid}], "
        f"{'cache ' + args.cache if args.cache else 'encoded on the fly'}")

    # ---------------------------------------------------------------- model, EMA, optimizer
    cfg = svg.SiTConfig(**{**asdict(svg.SIT_PRESETS[args.model]), "in_channels": C, "input_size": grid,
                           "num_classes": num_classes, "grad_checkpointing": args.grad_checkpointing})
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
    if ckpt is None:
        svg.update_ema(ema, raw, decay=0)  # EMA starts as an exact copy
    else:
        if ckpt["sit_config"] != asdict(cfg):
            raise ValueError(f"{resume} has sit_config {ckpt['sit_config']}, this run builds {asdict(cfg)}")
        if any(not torch.equal(v, ckpt["ae"][k]) for k, v in ae_state.items()):
            raise ValueError(f"{resume} was trained on features of a different autoencoder than --ae {args.ae}")
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])  # never re-initialised after resume
        opt.load_state_dict(ckpt["opt"])
        sampler.load_state_dict(ckpt["sampler"])
        svg.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        log(f"resumed from {resume} at step {step}")
    del ckpt
    raw.train()

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

    def stop_if_nonfinite():
        # The NaN/inf check is a device-side running minimum of the first bad step, read only here
        # (log and checkpoint steps): no per-step host sync, the exact step is still named, and no
        # checkpoint is ever written after a bad step, so the last one on disk is good.
        bad = first_bad.clone()
        if dist.initialized:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        if bad.item() != NO_BAD_STEP:
            msg = (f"non-finite loss (NaN/inf) first at step {bad.item()}: training stopped. Last good checkpoint: "
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
                                  svg.TRAIN_TIME_SHIFT, cfg.class_dropout_prob)
        with svg.autocast(args.precision, device):
            loss = svg.flow_matching_loss(forward, x0, y, t=t, eps=eps, drop_labels=drop)
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
            stop_if_nonfinite()  # once per log or checkpoint step, never per training step
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = dist.all_reduce_mean(loss_sum).item() / window_steps
            elapsed = time.time() - window_start
            log(f"step {step:7d} | loss {mean_loss:.4f} | {window_steps / elapsed:.2f} steps/s | "
                f"{window_steps * local_batch / elapsed:.1f} img/s per process")
            loss_sum.zero_()
            window_start, window_steps = time.time(), 0
        if step % args.ckpt_every == 0 or step == args.steps:
            if dist.is_main:
                last_ckpt = os.path.join(args.out, "checkpoints", f"{step:07d}.pt")
                svg.atomic_save({
                    "model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "sit_config": asdict(cfg), "feature_stats": stats, "ae_config": asdict(ae.cfg),
                    "ae": ae_state, "sampler": sampler.state_dict(), "rng": svg.rng_state(),
                    "args": vars(args),
                }, last_ckpt)
                log(f"saved {last_ckpt}")

    # ---------------------------------------------------------------- teardown
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main()
