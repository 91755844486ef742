"""Stage 1 of SVG (Sec. 3.3, App. A): train the residual encoder F_R and the decoder.

The frozen DINOv3 F_D and the trainable residual encoder F_R give the SVG features (Eq. 6);
the LDM decoder maps them back to pixels. Loss (official, LDM / taming): L1 + LPIPS summed
over pixels / B, plus a hinge PatchGAN with the LDM adaptive weight from --disc-start on.
One iteration = one autoencoder step, then one discriminator step on the same detached
reconstruction.

    # paper, 8 GPUs (global batch 512 = 64 per GPU, as 2 micro-batches of 32):
    torchrun --nproc_per_node=8 train_ae.py --data /path/imagenet/train \
        --val-data /path/imagenet/val --dino-weights dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth \
        --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth
    # tiny, CPU, a few minutes, no downloads (synthetic shapes, random DINO):
    python train_ae.py --preset tiny

Under DDP the residual encoder, mask token, decoder and discriminator are synchronised;
the frozen DINO is not a DDP parameter. Each rank sees its own batch in three places, as in
the official code: Eq. (6) batch statistics (align="batch"), the mask augmentation draws,
and the discriminator's BatchNorm. A W-rank run therefore equals a 1-rank run with the same
global batch only with align "image"/"none", mask_prob 0, residual_dropout 0 and before
--disc-start.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from svg import (
    ADAM_BETAS_GAN, AE_PRESETS, DISC_WEIGHT, PRECISIONS, PatchGAN, ResumableSampler,
    SVGAutoencoder, adaptive_weight, align_residual, apply_preset, atomic_save, autocast, build_dataset,
    gan_active, generator_loss, hinge_d_loss, init_distributed, latest_checkpoint, load_dinov3, load_lpips,
    load_strict, psnr, reconstruction_loss, rng_state, save_image_grid, set_rng_state, set_seed,
    setup_precision, ssim,
)

# Defaults per preset; any flag given on the command line wins.
PRESETS = {
    # App. A / official config: 256 px, 64 per GPU x 8 GPUs, lr 1e-4, 100K iterations (~40
    # ImageNet epochs, the official epoch=000040.ckpt), SmallestMaxSize + RandomCrop, no flip.
    # disc_start 2500 iterations = the official 5001 Lightning steps (two per iteration).
    # grad_accum 2: 64 images need ~80-93 GiB here (measured on an H100: 1.25 GiB per image
    # in bf16, 1.45 in fp32), so each GPU runs two micro-batches of 32.
    "paper": dict(data=None, global_batch=512, grad_accum=2, steps=100_000, lr=1e-4, disc_start=2500,
                  crop="random", num_synthetic=0, num_workers=8, num_eval=256, log_every=50,
                  sample_every=2500, eval_every=5000, ckpt_every=5000),
    # AE_PRESETS["tiny"] (32 px) on the built-in synthetic shapes, 87 ms of CPU time per iteration.
    # No PatchGAN (disc_start = steps): D's passes would cost ~60% more per iteration; e.g.
    # --disc-start 1800 turns it on for the last 600. Measured (README): held-out PSNR 17.3 dB at
    # 400 iterations, 19.2 dB at 2400, and the shapes still come back blurred; this is what limits
    # the tier's class accuracy (eval.py shapes, "reconstruction" row).
    "tiny": dict(data="synthetic", global_batch=8, grad_accum=1, steps=2400, lr=1e-3, disc_start=2400,
                 crop="center", num_synthetic=2048, num_workers=0, num_eval=16, log_every=100,
                 sample_every=400, eval_every=400, ckpt_every=1200),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--ae-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override AEConfig fields of the preset, e.g. align=none use_residual=false "
                        "(values are JSON; Table 4 ablations)")
    p.add_argument("--data", help="'synthetic' or an image folder (class sub-folders, e.g. imagenet/train)")
    p.add_argument("--val-data", help="held-out images (folder or 'synthetic'); default: the last "
                                      "--num-eval images of --data, excluded from training")
    p.add_argument("--out", help="output folder (default runs/ae-<preset>)")
    p.add_argument("--dino-weights", help="DINOv3 .pth / HF safetensors (random DINO without it: tiny "
                                          "only; a resumed run takes DINO from its checkpoint)")
    p.add_argument("--lpips-vgg", help="torchvision vgg16-397923af.pth")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 heads vgg.pth")
    p.add_argument("--global-batch", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per rank and step (memory); the "
                   "adaptive weight, Eq. (6) statistics and D's BatchNorm then see micro-batches")
    p.add_argument("--steps", type=int, help="training iterations")
    p.add_argument("--lr", type=float, help="Adam lr of the AE and the discriminator")
    p.add_argument("--disc-start", type=int, help="first iteration (0-based) with the GAN terms")
    p.add_argument("--disc-weight", type=float, default=DISC_WEIGHT)
    p.add_argument("--crop", choices=["center", "random"])
    p.add_argument("--flip", action="store_true", help="random horizontal flips (off officially)")
    p.add_argument("--num-synthetic", type=int, help="training images of the synthetic set")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="unreadable images")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--num-eval", type=int, help="held-out images for PSNR / SSIM / LPIPS")
    p.add_argument("--log-every", type=int)
    p.add_argument("--sample-every", type=int, help="reconstruction grid PNG every N iterations")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--resume", help="checkpoint path, or 'auto' = the latest in <out>/checkpoints if any")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS[args.preset])
    args.out = args.out or os.path.join("runs", f"ae-{args.preset}")
    if args.data is None:
        p.error("--data is required with --preset paper: an ImageNet-style folder such as "
                "/path/imagenet/train (class sub-folders), or 'synthetic'")
    if args.preset == "paper" and not (args.dino_weights or args.resume):
        p.error("--preset paper needs the DINOv3 weights: pass --dino-weights "
                "/path/to/dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")
    return args


def ae_config(args):
    """The preset's AEConfig with the --ae-set overrides."""
    fields = {f.name for f in dataclasses.fields(AE_PRESETS["paper"])}
    overrides = {}
    for item in args.ae_set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--ae-set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as align=none
    return dataclasses.replace(AE_PRESETS[args.preset], **overrides)


class Reconstruct(nn.Module):
    """x -> decode(encode(x)) as one forward, so DDP sees and synchronises the trainable AE."""

    def __init__(self, ae: SVGAutoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, x):
        return self.ae.decode(self.ae.encode(x))  # [B, 3, H, W] -> [B, C, h, w] -> [B, 3, H, W]


def grad_sync(module, sync: bool):
    """DDP all-reduces gradients only when `sync` (the last micro-batch); a no-op without DDP."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def dino_only(ae, z):
    """Features with F_R replaced by the mask token for every image, then aligned as in encode.

    This is what the decoder sees for a masked sample when a whole batch is masked: after
    Eq. (6) the constant token becomes mu(F_D) in every residual channel.
    """
    D = ae.dino.embed_dim
    f_r = ae.mask_token.to(z.dtype).expand(z.shape[0], -1, *z.shape[2:])  # [B, 8, h, w]
    if ae.cfg.align != "none":
        f_r = align_residual(f_r, z[:, :D], per_image=ae.cfg.align == "image")  # Eq. (6)
    return torch.cat([z[:, :D], f_r], 1)  # [B, C, h, w]


@torch.no_grad()
def evaluate(ae, lpips, images, batch, precision, device):
    """Mean PSNR / SSIM / LPIPS of clamped reconstructions of the held-out images (eval mode)."""
    ae.eval()
    scores = {"psnr": [], "ssim": [], "lpips": []}
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        with autocast(precision, device):
            x_hat = ae.decode(ae.encode(x)).float().clamp(-1, 1)
        scores["psnr"].append(psnr(x, x_hat))
        scores["ssim"].append(ssim(x, x_hat))
        if lpips is not None:
            scores["lpips"].append(lpips(x, x_hat))
    ae.train()
    return {k: torch.cat(v).mean().item() for k, v in scores.items() if v}


@torch.no_grad()
def save_reconstructions(ae, images, path, precision, device):
    """PNG rows: input | reconstruction | DINO-only decode (when the AE has a mask token)."""
    ae.eval()
    x = images.to(device)
    with autocast(precision, device):
        z = ae.encode(x)
        rows = [x, ae.decode(z)]
        if hasattr(ae, "mask_token"):
            rows.append(ae.decode(dino_only(ae, z)))
    ae.train()
    save_image_grid(rows, path)


def spread(n, k):
    """k indices evenly spaced over range(n) (all classes of a class-sorted folder, not a tail)."""
    return np.linspace(0, n - 1, k).round().astype(int).tolist() if k else []


def main(argv=None):
    # ---- config
    args = parse_args(argv)
    cfg = ae_config(args)

    # ---- distributed init, precision
    dist = init_distributed()
    device = dist.device
    setup_precision(args.precision)
    assert args.global_batch % dist.world_size == 0, \
        f"--global-batch {args.global_batch} must be divisible by the world size {dist.world_size}"
    batch = args.global_batch // dist.world_size  # per rank
    assert batch % args.grad_accum == 0, \
        f"per-rank batch {batch} must be divisible by --grad-accum {args.grad_accum}"

    # ---- output dir and logger (rank 0 only)
    if dist.is_main:
        os.makedirs(args.out, exist_ok=True)
        log_file = open(os.path.join(args.out, "log.txt"), "a")

    def log(msg):
        if dist.is_main:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    log(f"train_ae: {dist.world_size} process(es) on {device}, global batch {args.global_batch} "
        f"({batch} per rank), {args.precision}, args {vars(args)}")
    log(f"AEConfig {dataclasses.asdict(cfg)}")

    # ---- data: training images; held-out images (centre crop) for metrics and grids are
    # --num-eval images evenly spaced over --val-data, or else over --data (then excluded from
    # training). Evenly spaced: folders are sorted by class, so a tail would be a few classes.
    size = cfg.image_size
    hold_out = 0 if args.val_data else args.num_eval
    n_images = args.num_synthetic + hold_out  # used by the synthetic set only
    train_set = build_dataset(args.data, size, crop=args.crop, flip=args.flip, on_error=args.on_error,
                              seed=args.seed, num_images=n_images)
    held = set(spread(len(train_set), hold_out))
    train_subset = torch.utils.data.Subset(train_set, [i for i in range(len(train_set)) if i not in held])
    n_train = len(train_subset)
    if n_train < args.global_batch:
        raise ValueError(f"{n_train} training images is less than one global batch ({args.global_batch})")
    eval_set = build_dataset(args.val_data or args.data, size, crop="center", on_error=args.on_error,
                             seed=args.seed + bool(args.val_data),  # synthetic --val-data: other images
                             num_images=args.num_eval if args.val_data else n_images)
    if args.num_eval > len(eval_set):
        raise ValueError(f"--num-eval {args.num_eval} exceeds the {len(eval_set)} held-out images")
    eval_images = (torch.stack([eval_set[i][0] for i in spread(len(eval_set), args.num_eval)])
                   if dist.is_main else None)  # [num_eval, 3, H, W]
    sampler = ResumableSampler(n_train, dist.world_size, dist.rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        train_subset, batch_size=batch, sampler=sampler, num_workers=args.num_workers, drop_last=True,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG stream untouched
    log(f"data: {args.data} ({n_train} training images), held-out: "
        f"{args.num_eval} images spread over {args.val_data or '--data'}")

    # ---- models and optimisers. Initialised from --seed alone (the same for any world size);
    # per-rank randomness (mask augmentation, dropout) uses seed * world + rank.
    set_seed(args.seed)
    ae = SVGAutoencoder(cfg).to(device)
    disc = PatchGAN().to(device)
    set_seed(args.seed * dist.world_size + dist.rank)
    lpips = None
    if args.lpips_vgg or args.lpips_heads or args.preset == "paper":
        lpips = load_lpips(args.lpips_vgg, args.lpips_heads).to(device)
    else:
        log("!" * 88 + "\nWARNING: no --lpips-vgg / --lpips-heads: training WITHOUT the LPIPS term and "
            "reporting no LPIPS.\n" + "!" * 88)
    # fused: one multi-tensor kernel per step instead of several per parameter (CUDA and CPU)
    opt_ae = torch.optim.Adam(ae.trainable_parameters(), lr=args.lr, betas=ADAM_BETAS_GAN, fused=True)
    opt_disc = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=ADAM_BETAS_GAN, fused=True)

    # ---- resume (model, discriminator, optimisers, step, data position, per-rank RNG)
    step = 0
    resume = latest_checkpoint(args.out) if args.resume == "auto" else args.resume
    if args.resume and resume is None:
        log(f"--resume auto: no checkpoint in {args.out}/checkpoints, starting fresh")
    if resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume!r} not found: pass a checkpoint written by "
                                    f"train_ae.py or 'auto'")
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        if ckpt["ae_config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{resume} was trained with AEConfig {ckpt['ae_config']}, this run has "
                             f"{dataclasses.asdict(cfg)}: use the same --preset / --ae-set")
        load_strict(ae, ckpt["ae"], resume)
        disc.load_state_dict(ckpt["disc"])
        opt_ae.load_state_dict(ckpt["opt_ae"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        sampler.load_state_dict(ckpt["sampler"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == dist.world_size:
            set_rng_state(ckpt["rng"][dist.rank])
        else:
            log(f"world size changed ({len(ckpt['rng'])} -> {dist.world_size}): RNG streams re-seeded")
        log(f"resumed from {resume} at iteration {step}")
    elif args.dino_weights:
        ae.dino.load_state_dict(load_dinov3(args.dino_weights, cfg.dino_arch).state_dict())
    else:
        log("!" * 88 + "\nWARNING: no --dino-weights: DINO is RANDOMLY INITIALISED. Fine for checking the "
            "pipeline, meaningless as SVG features.\n" + "!" * 88)

    ddp = torch.nn.parallel.DistributedDataParallel
    model = Reconstruct(ae)
    if dist.initialized:
        ids = [device.index] if device.type == "cuda" else None
        model = ddp(model, device_ids=ids, broadcast_buffers=False)  # the AE has no running stats
        disc_ddp = ddp(disc, device_ids=ids)  # BatchNorm running stats follow rank 0
    else:
        disc_ddp = disc
    last_layer = ae.decoder.conv_out.weight  # where the adaptive GAN weight is measured
    ae.train()
    disc.train()

    # ---- loop
    def checkpoint():
        rng = dist.all_gather_object(rng_state())
        if dist.is_main:
            atomic_save({"ae_config": dataclasses.asdict(cfg), "ae": ae.state_dict(),
                         "disc": disc.state_dict(), "opt_ae": opt_ae.state_dict(),
                         "opt_disc": opt_disc.state_dict(), "step": step,
                         "sampler": sampler.state_dict(), "rng": rng, "args": vars(args)},
                        os.path.join(args.out, "checkpoints", f"{step:07d}.pt"))
        dist.barrier()

    history, metrics, saved_at = [], {}, None
    pbar = tqdm(total=args.steps, initial=step, disable=not dist.is_main, dynamic_ncols=True)
    t0, n0 = time.time(), step
    while step < args.steps:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(sampler.epoch)  # random crops / flips keyed by (seed, epoch, index)
        for x, _ in loader:
            gan = gan_active(step, args.disc_start)
            chunks = x.to(device, non_blocking=True).chunk(args.grad_accum)  # [B / accum, 3, H, W] each
            last = len(chunks) - 1

            # autoencoder step: nll (+ adaptive-weighted generator term once the GAN is on),
            # gradients averaged over the micro-batches
            opt_ae.zero_grad(set_to_none=True)
            stats, fakes = [], []
            for i, x_m in enumerate(chunks):
                with grad_sync(model, i == last):
                    with autocast(args.precision, device):
                        x_hat = model(x_m).float()
                        nll, l1, lp = reconstruction_loss(x_m, x_hat, lpips)
                        g_loss = d_weight = torch.zeros((), device=device)
                        if gan:  # the raw D: the generator step must not synchronise D's gradients
                            g_loss = generator_loss(disc(x_hat))
                            d_weight = adaptive_weight(nll, g_loss, last_layer, args.disc_weight)
                    ((nll + d_weight * g_loss) / len(chunks)).backward()
                fakes.append(x_hat.detach())
                stats.append(torch.stack([nll, l1, lp, g_loss, d_weight]).detach())
            opt_ae.step()

            # discriminator step on the same, detached reconstructions; real and fake separately
            d_loss = torch.zeros((), device=device)
            if gan:
                opt_disc.zero_grad(set_to_none=True)
                for i, (x_m, fake) in enumerate(zip(chunks, fakes)):
                    with grad_sync(disc_ddp, i == last):
                        with autocast(args.precision, device):
                            d_m = hinge_d_loss(disc_ddp(x_m), disc_ddp(fake))
                        (d_m / len(chunks)).backward()
                    d_loss = d_loss + d_m.detach() / len(chunks)
                opt_disc.step()

            sampler.advance(x.shape[0])
            step += 1
            pbar.update(1)

            if step % args.log_every == 0 or step == args.steps:
                vals = dist.all_reduce_mean(torch.cat([torch.stack(stats).mean(0), d_loss.view(1)]))
                rec = dict(zip(("nll", "l1", "lpips", "g_loss", "d_weight", "d_loss"), vals.tolist()))
                rec.update(step=step, gan=gan)
                history.append(rec)
                ips = (step - n0) * args.global_batch / (time.time() - t0)
                pbar.set_postfix(l1=f"{rec['l1']:.4f}", lpips=f"{rec['lpips']:.4f}", g=f"{rec['g_loss']:.3f}")
                log(f"step {step:7d} | nll {rec['nll']:.2f} | l1 {rec['l1']:.4f} | lpips {rec['lpips']:.4f} | "
                    f"g {rec['g_loss']:.4f} | d_weight {rec['d_weight']:.4f} | d {rec['d_loss']:.4f} | "
                    f"{ips:.1f} img/s")
            if dist.is_main and (step % args.sample_every == 0 or step == args.steps):
                path = os.path.join(args.out, "samples", f"{step:07d}.png")
                save_reconstructions(ae, eval_images[:8], path, args.precision, device)
                log(f"saved {path}: rows = held-out input | reconstruction | DINO-only decode "
                    f"(F_R replaced by the mask token for every image; absent without a mask token)")
            if dist.is_main and (step % args.eval_every == 0 or step == args.steps):
                metrics = evaluate(ae, lpips, eval_images, batch, args.precision, device)
                log(f"eval step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + f" ({args.num_eval} held-out images)")
            if step % args.ckpt_every == 0 or step == args.steps:
                checkpoint()
                saved_at = step
            if step >= args.steps:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)

    # ---- teardown
    if saved_at != step:  # e.g. resumed at the final step
        checkpoint()
    pbar.close()
    log(f"done: {step} iterations, {time.time() - t0:.1f} s, final eval {metrics}")
    if dist.is_main:
        log_file.close()
    dist.close()
    return {"step": step, "history": history, "eval": metrics, "out": args.out}


if __name__ == "__main__":
    main()
