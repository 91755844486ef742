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
    # App. H: a new run at 512 px from the 256 px weights (step 0, fresh optimisers, own --out)
    torchrun --nproc_per_node=8 train_ae.py --data /path/imagenet/train --init-from \
        runs/ae-paper/checkpoints/0100000.pt --image-size 512 --out runs/ae-512 ...

Under DDP the residual encoder, mask token, decoder and discriminator are synchronised;
the frozen DINO is not a DDP parameter. Each rank sees its own batch in three places, as in
the official code: Eq. (6) batch statistics (align="batch"), the mask augmentation draws,
and the discriminator's BatchNorm. A W-rank run therefore equals a 1-rank run with the same
global batch only with align "image"/"none", mask_prob 0, residual_dropout 0, no
--lpips-dropout / --dino-rope-aug and before --disc-start.

Eq. (6) statistics: training normalises F_R with each micro-batch's statistics (official) and
keeps their running averages in the autoencoder (ae.align_running, averaged over ranks before
every evaluation and checkpoint), as BatchNorm does; evaluation here and every later use of
the checkpoint encode with those frozen statistics (svg.SVGAutoencoder.align).

The official run's train-mode quirks (reference: its ImageLogger calls pl_module.eval() then
.train() around its first image log, which leaves every submodule in train mode):
--lpips-dropout runs the LPIPS heads with their Dropout(0.5), --dino-rope-aug runs the frozen
DINOv3 in train mode, i.e. with its RoPE coordinate rescale (log-uniform in [1/2, 2]). Both
are on in the paper preset, from iteration 0 (officially from the first image log on).
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
    ADAM_BETAS_GAN, AE_PRESETS, DISC_WEIGHT, LPIPS_HEAD_DROPOUT, PATCH_SIZE, PRECISIONS, TRUST_PICKLE_HELP, PatchGAN,
    ResumableSampler, SVGAutoencoder, apply_preset, atomic_save, autocast, autoencoder_backward, build_dataset,
    check_init_from, claim_output, gan_active, generator_loss, hinge_d_loss, init_distributed, load_autoencoder,
    load_checkpoint, load_dinov3, load_lpips, load_strict, nonfinite_tensors, nonnegative_float, nonnegative_int,
    positive_float, positive_int, psnr, reconstruction_loss, resample_pos_embed, resize_ae_config, resume_checkpoint,
    resume_lr, rng_state, save_image_grid, set_rng_state, set_seed, setup_precision, skipped_note, ssim,
)

# Defaults per preset; any flag given on the command line wins.
PRESETS = {
    # App. A / official config: 256 px, 64 per GPU x 8 GPUs, lr 1e-4, 100K iterations (~40
    # ImageNet epochs, the official epoch=000040.ckpt), SmallestMaxSize + RandomCrop, no flip.
    # disc_start 2500 iterations = the official 5001 Lightning steps (two per iteration). There
    # both GAN terms are switched by the Lightning step: the discriminator's at step 5000 (its
    # 2500th iteration), the generator's at 5001 (one iteration later, 2501), and the
    # discriminator's Adam steps from iteration 0 on zero gradients (disc_factor 0), which
    # moves nothing (Adam's update is 0 for zero moments). Here both start at iteration 2500
    # and the discriminator's optimiser first steps then.
    # grad_accum 2: 64 images need ~80-93 GiB here (measured on an H100: 1.25 GiB per image
    # in bf16, 1.45 in fp32), so each 80 GB GPU runs two micro-batches of 32, and Eq. (6) and
    # the discriminator's BatchNorm see 32 images instead of the official 64. A 141 GB H200
    # holds 64: pass --grad-accum 1 there for the official per-GPU batch.
    # lpips_dropout / dino_rope_aug: what the official run trained with (see the top).
    "paper": dict(data=None, global_batch=512, grad_accum=2, steps=100_000, lr=1e-4, disc_start=2500,
                  crop="random", num_synthetic=0, num_workers=8, num_eval=256, log_every=50,
                  sample_every=2500, eval_every=5000, ckpt_every=5000, lpips_dropout=True, dino_rope_aug=True,
                  decoder_noise=0.0),
    # AE_PRESETS["tiny"] (64 px) on the built-in synthetic shapes. No PatchGAN (disc_start = steps):
    # D's passes would cost ~60% more per iteration. decoder_noise: the decoder also has to read
    # the generator's features, which are off by more than a VAE-style decoder tolerates (README).
    # 600 iterations: with 1200 the tier took 2 min more and came out no better (held-out PSNR 24.2 dB
    # against 25.1, the SiT's samples judged right 96.0% against 99.8%; README, tiny tier).
    "tiny": dict(data="synthetic", global_batch=8, grad_accum=1, steps=600, lr=1e-3, disc_start=600,
                 crop="center", num_synthetic=2048, num_workers=0, num_eval=16, log_every=100,
                 sample_every=300, eval_every=300, ckpt_every=600, lpips_dropout=False, dino_rope_aug=False,
                 decoder_noise=0.5),
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
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in an --out that holds another run's checkpoints, DELETING them")
    p.add_argument("--dino-weights", help="DINOv3 .pth / HF safetensors (random DINO without it: tiny "
                                          "only; a resumed run takes DINO from its checkpoint)")
    p.add_argument("--lpips-vgg", help="torchvision vgg16-397923af.pth")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 heads vgg.pth")
    p.add_argument("--global-batch", type=positive_int)
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches per rank and step (memory); the "
                   "adaptive weight, Eq. (6) statistics and D's BatchNorm then see micro-batches")
    p.add_argument("--steps", type=nonnegative_int, help="training iterations (0: write the initial state)")
    p.add_argument("--lr", type=positive_float, help="Adam lr of the AE and the discriminator; on --resume "
                   "the checkpoint's unless given")
    p.add_argument("--disc-start", type=int, help="first iteration (0-based) with the GAN terms")
    p.add_argument("--disc-weight", type=float, default=DISC_WEIGHT)
    p.add_argument("--crop", choices=["center", "random"])
    p.add_argument("--flip", action="store_true", help="random horizontal flips (off officially)")
    p.add_argument("--decoder-noise", type=nonnegative_float, metavar="TAU",
                   help="not in the paper (tiny tier): train the decoder on features plus Gaussian noise of std "
                        "|N(0, TAU^2)| per image, so it decodes the generator's slightly-off features (RAE's "
                        "noise-augmented decoder, Zheng et al. 2025); 0 = off (paper)")
    p.add_argument("--lpips-dropout", action=argparse.BooleanOptionalAction,
                   help="LPIPS loss heads with their Dropout(0.5), as the official run (paper preset: on)")
    p.add_argument("--dino-rope-aug", action=argparse.BooleanOptionalAction,
                   help="frozen DINOv3 in train mode: RoPE coordinate rescale in [1/2, 2] per block, as the "
                        "official run (paper preset: on)")
    p.add_argument("--num-synthetic", type=int, help="training images of the synthetic set")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="unreadable images")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the autoencoder and the LPIPS loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--num-eval", type=positive_int, help="held-out images for PSNR / SSIM / LPIPS")
    p.add_argument("--log-every", type=positive_int)
    p.add_argument("--sample-every", type=positive_int, help="reconstruction grid PNG every N iterations")
    p.add_argument("--eval-every", type=positive_int)
    p.add_argument("--ckpt-every", type=positive_int)
    p.add_argument("--resume", help="checkpoint path, or 'auto' = the latest readable in <out>/checkpoints if any")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--init-from", metavar="PATH", help="App. H: start a NEW run (step 0, fresh optimisers, "
                   "own --out) from the weights of a train_ae.py or official checkpoint, e.g. of another "
                   "resolution; its AEConfig replaces the preset's (--ae-set still applies)")
    p.add_argument("--image-size", type=positive_int, help="train at this size (App. H: 512, 1024); default: the "
                   "preset's or the --init-from checkpoint's. Decoder attention stays at the same levels")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS[args.preset])
    check_init_from(p, args, "runs/ae-512")
    args.out = args.out or os.path.join("runs", f"ae-{args.preset}")
    if args.data is None:
        p.error("--data is required with --preset paper: an ImageNet-style folder such as "
                "/path/imagenet/train (class sub-folders), or 'synthetic'")
    if args.preset == "paper" and not (args.dino_weights or args.resume or args.init_from):
        p.error("--preset paper needs the DINOv3 weights: pass --dino-weights "
                "/path/to/dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")
    return args


def ae_config(args, base=None):
    """The preset's AEConfig (or `base`, the --init-from checkpoint's) with the --ae-set overrides."""
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
    return dataclasses.replace(base or AE_PRESETS[args.preset], **overrides)


class Reconstruct(nn.Module):
    """x -> decode(encode(x)) up to the decoder's last conv, as one forward, so DDP sees and
    synchronises the trainable AE. The caller applies ae.decoder.head (conv_out): the adaptive weight
    then differentiates that conv alone, not the whole (possibly compiled) graph."""

    def __init__(self, ae: SVGAutoencoder, decoder_noise: float = 0.0):
        super().__init__()
        self.ae, self.decoder_noise = ae, decoder_noise

    def forward(self, x):
        z = self.ae.encode(x)  # [B, 3, H, W] -> [B, C, h, w]
        if self.training and self.decoder_noise:  # --decoder-noise: the decoder sees z + sigma eps, sigma per image
            sigma = self.decoder_noise * torch.randn(z.shape[0], 1, 1, 1, device=z.device).abs()  # |N(0, tau^2)|
            z = z + sigma * torch.randn_like(z)
        return self.ae.decoder.trunk(z), z  # [B, ch, H, W], and z for the decoder's patch shortcut if any


def grad_sync(module, sync: bool):
    """DDP all-reduces gradients only when `sync` (the last micro-batch); a no-op without DDP."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def dino_only(ae, z):
    """Features with F_R replaced by the mask token for every image, then aligned as in encode.

    With the frozen Eq. (6) statistics this is what the decoder sees for a masked sample in
    a training batch (with batch statistics over an all-masked batch the constant token would
    become mu(F_D) in every residual channel).
    """
    D = ae.dino.embed_dim
    f_r = ae.mask_token.to(z.dtype).expand(z.shape[0], -1, *z.shape[2:])  # [B, 8, h, w]
    return torch.cat([z[:, :D], ae.align(f_r, z[:, :D])], 1)  # [B, C, h, w], Eq. (6)


@torch.no_grad()
def evaluate(ae, lpips, images, batch, precision, device):
    """Mean PSNR / SSIM / LPIPS of clamped reconstructions of the held-out images (eval mode;
    frozen Eq. (6) statistics; LPIPS as the metric, without the loss's head dropout)."""
    ae.eval()
    head_dropout = lpips.head_dropout if lpips is not None else 0.0
    if lpips is not None:
        lpips.head_dropout = 0.0
    scores = {"psnr": [], "ssim": [], "lpips": []}
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        with autocast(precision, device):
            x_hat = ae.decode(ae.encode(x)).float().clamp(-1, 1)
        scores["psnr"].append(psnr(x, x_hat))
        scores["ssim"].append(ssim(x, x_hat))
        if lpips is not None:
            scores["lpips"].append(lpips(x, x_hat))
    if lpips is not None:
        lpips.head_dropout = head_dropout
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


def generator_step(forward, ae, lpips, disc, x, gan, disc_weight, precision, scale=1.0):
    """The autoencoder's loss and backward on one micro-batch x [b, 3, H, W]: nll, plus the
    adaptive-weighted generator term when `gan` (App. A), gradients scaled by `scale`.

    forward: Reconstruct (maybe DDP / compiled); the decoder's head is applied here, outside it. LPIPS and
    D run on a detached copy of x_hat and are differentiated once (svg.autoencoder_backward).
    disc is the raw D: the generator step must not synchronise D's gradients.
    Returns the detached reconstruction and [nll, l1, lpips, g_loss, d_weight].
    """
    with autocast(precision, x.device):
        x_hat = ae.decoder.head(*forward(x)).float()  # [b, 3, H, W]
        x_cut = x_hat.detach().requires_grad_()  # LPIPS and D end at x_hat
        nll, l1, lp = reconstruction_loss(x, x_cut, lpips)
        g_loss = generator_loss(disc(x_cut)) if gan else None
    d_weight = autoencoder_backward(x_hat, x_cut, nll, g_loss, ae.decoder.conv_out.weight, disc_weight, scale)
    g_loss = torch.zeros((), device=x.device) if g_loss is None else g_loss
    return x_cut.detach(), torch.stack([nll, l1, lp, g_loss, d_weight]).detach()


def spread(n, k):
    """k indices evenly spaced over range(n) (all classes of a class-sorted folder, not a tail)."""
    return np.linspace(0, n - 1, k).round().astype(int).tolist() if k else []


def main(argv=None):
    # ---- config
    args = parse_args(argv)
    source = None
    if args.init_from:  # App. H: weights and AEConfig of another run (e.g. 256 px), any format load_autoencoder reads
        init = load_checkpoint(args.init_from, "--init-from", args.trust_pickle)  # our own / the authors' file
        source = load_autoencoder(init, args.dino_weights)  # --dino-weights, if given, replaces its DINO
    cfg = ae_config(args, source.cfg if source else None)
    if args.image_size:
        cfg = resize_ae_config(cfg, args.image_size)  # App. H: same architecture at another size

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

    lock = claim_output(args.out, args.resume is None, args.overwrite, log) if dist.is_main else None  # used --out

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
    ae.dino_train_mode = args.dino_rope_aug  # DINOv3 RoPE rescale while training (official run)
    ae.align_batch.fill_(batch // args.grad_accum)  # the batch Eq. (6) statistics are taken over
    disc = PatchGAN().to(device)
    set_seed(args.seed * dist.world_size + dist.rank)
    lpips = None
    if args.lpips_vgg or args.lpips_heads or args.preset == "paper":
        lpips = load_lpips(args.lpips_vgg, args.lpips_heads).to(device)
        lpips.head_dropout = LPIPS_HEAD_DROPOUT if args.lpips_dropout else 0.0  # official run: on
    else:
        log("!" * 88 + "\nWARNING: no --lpips-vgg / --lpips-heads: training WITHOUT the LPIPS term and "
            "reporting no LPIPS.\n" + "!" * 88)
    # fused: one multi-tensor kernel per step instead of several per parameter (CUDA and CPU)
    opt_ae = torch.optim.Adam(ae.trainable_parameters(), lr=args.lr, betas=ADAM_BETAS_GAN, fused=True)
    opt_disc = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=ADAM_BETAS_GAN, fused=True)

    # ---- resume (model, discriminator, optimisers, step, data position, per-rank RNG)
    step = 0
    resume, ckpt = resume_checkpoint(args.resume, args.out, log, "--resume checkpoint", args.trust_pickle)
    if resume:
        if ckpt["ae_config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{resume} was trained with AEConfig {ckpt['ae_config']}, this run has "
                             f"{dataclasses.asdict(cfg)}: use the same --preset / --ae-set")
        load_strict(ae, {**ae.alignment_buffers(), **ckpt["ae"]}, resume)  # older files: no running Eq. (6) stats;
        # load_strict also refuses NaN / inf weights
        load_strict(disc, ckpt["disc"], f"the discriminator of {resume}")
        opt_ae.load_state_dict(ckpt["opt_ae"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        resume_lr(args, [opt_ae, opt_disc], log)  # an explicit --lr takes effect, else the checkpoint's
        sampler.load_state_dict(ckpt["sampler"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == dist.world_size:
            set_rng_state(ckpt["rng"][dist.rank])
        else:
            log(f"world size changed ({len(ckpt['rng'])} -> {dist.world_size}): RNG streams re-seeded")
        log(f"resumed from {resume} at iteration {step}")
    elif source is not None:  # App. H: weights only; optimisers, step 0, data order and RNG start fresh
        state = source.state_dict()
        key = "residual.encoder.pos_embedding"
        if key in state:  # [1, 1 + n*n, D] -> [1, 1 + h*w, D] for this run's grid, class token kept
            state[key] = resample_pos_embed(state[key], size // PATCH_SIZE, size // PATCH_SIZE)
        load_strict(ae, state, f"--init-from {args.init_from}")
        ae.align_batch.fill_(batch // args.grad_accum)  # this run's Eq. (6) batch, not the source run's
        if isinstance(init, dict) and "disc" in init:  # PatchGAN is fully convolutional: any size
            disc.load_state_dict(init["disc"])
        log(f"initialised from {args.init_from} ({source.cfg.image_size} px -> {size} px; autoencoder"
            f"{' and discriminator' if 'disc' in init else ', fresh discriminator'}), step 0, fresh optimisers")
        del source, init, state
    elif args.dino_weights:
        ae.dino.load_state_dict(load_dinov3(args.dino_weights, cfg.dino_arch).state_dict())
    else:
        log("!" * 88 + "\nWARNING: no --dino-weights: DINO is RANDOMLY INITIALISED. Fine for checking the "
            "pipeline, meaningless as SVG features.\n" + "!" * 88)

    ddp = torch.nn.parallel.DistributedDataParallel
    model = Reconstruct(ae, args.decoder_noise)
    if dist.initialized:
        ids = [device.index] if device.type == "cuda" else None
        model = ddp(model, device_ids=ids, broadcast_buffers=False)  # Eq. (6) running stats: all-reduced below
        disc_ddp = ddp(disc, device_ids=ids)  # BatchNorm running stats follow rank 0
    else:
        disc_ddp = disc
    # --compile: the autoencoder up to its last conv, and the LPIPS of the loss (evaluation stays eager)
    forward = torch.compile(model) if args.compile else model
    lpips_loss = torch.compile(lpips) if args.compile and lpips is not None else lpips
    ae.train()
    disc.train()

    # ---- loop
    last_good = resume

    def checkpoint():
        nonfinite = nonfinite_tensors(ae.state_dict()) + nonfinite_tensors(disc.state_dict())
        if nonfinite:  # the same weights on every rank, so every rank stops here
            stop(f"non-finite weights (NaN/inf in {nonfinite[:3]}) at iteration {step}")
        rng = dist.all_gather_object(rng_state())
        if dist.is_main:
            atomic_save({"ae_config": dataclasses.asdict(cfg), "ae": ae.state_dict(),
                         "disc": disc.state_dict(), "opt_ae": opt_ae.state_dict(),
                         "opt_disc": opt_disc.state_dict(), "step": step,
                         "sampler": sampler.state_dict(), "rng": rng, "args": vars(args)},
                        os.path.join(args.out, "checkpoints", f"{step:07d}.pt"))
        dist.barrier()
        return os.path.join(args.out, "checkpoints", f"{step:07d}.pt")

    def stop(what):
        msg = (f"{what}: training stopped, nothing saved. Last good checkpoint: {last_good or 'none written yet'}. "
               "Resume from it (--resume) with a lower --lr or --precision fp32")
        dist.close()
        raise SystemExit(msg if dist.is_main else 1)

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
                    fake, stat = generator_step(forward, ae, lpips_loss, disc, x_m, gan, args.disc_weight,
                                                args.precision, scale=1 / len(chunks))
                fakes.append(fake)
                stats.append(stat)
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
                if not all(np.isfinite(v) for v in vals.tolist()):
                    stop(f"non-finite loss (NaN/inf) at iteration {step}: {rec}")
                history.append(rec)
                ips = (step - n0) * args.global_batch / (time.time() - t0)
                pbar.set_postfix(l1=f"{rec['l1']:.4f}", lpips=f"{rec['lpips']:.4f}", g=f"{rec['g_loss']:.3f}")
                log(f"step {step:7d} | nll {rec['nll']:.2f} | l1 {rec['l1']:.4f} | lpips {rec['lpips']:.4f} | "
                    f"g {rec['g_loss']:.4f} | d_weight {rec['d_weight']:.4f} | d {rec['d_loss']:.4f} | "
                    f"{ips:.1f} img/s" + skipped_note(train_set))
            if step == args.steps or any(step % k == 0 for k in (args.sample_every, args.eval_every,
                                                                 args.ckpt_every)):
                ae.align_running.copy_(dist.all_reduce_mean(ae.align_running))  # ranks' running stats agree
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
                last_good = checkpoint()
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
        lock.release()
    dist.close()
    return {"step": step, "history": history, "eval": metrics, "out": args.out}


if __name__ == "__main__":
    main()
