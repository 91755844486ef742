"""Sample from a trained SVG generator: image grids, FID exports, interpolation, editing.

Every subcommand rebuilds the models from the stage-2 checkpoint alone (svg.load_generator:
the SiT with its EMA weights, the feature statistics, the stage-1 autoencoder) and samples
with the Euler ODE of App. A (svg.sample_ode). The official SVG-XL file holds only the
diffusion weights: pass its autoencoder and dinov3_sp_stats.pt with --ae and --stats.

    python sample.py grid   --ckpt CKPT --classes 207 360 387 974 --per-class 4
    python sample.py interp --ckpt CKPT --class-id 207                  # App. D, Eq. (7)-(8)
    python sample.py edit   --ckpt CKPT --image dog.jpg --class-id 281 --box 64 64 192 192
    torchrun --nproc_per_node=8 sample.py export --ckpt CKPT --out-dir samples/svg-xl \\
        --cfg-scale 1.5 --zero-init-steps 1                               # FID-50K, Table 1

Defaults: 25 Euler steps with sampling shift 1/0.15 (App. A). `export` defaults to no
guidance (cfg 1, Table 1 "w/o CFG"); the paper's "w/ CFG" setting is --cfg-scale 1.5
--zero-init-steps 1 (App. A: cfg 1.5 with CFG-Zero*'s zero-init, which skips the first
step); the official sweeps also used cfg 1.55 (Table 5) with the same zero-init.
`grid` and `interp` default to the official demo's constant cfg 4. `edit` follows App. C:
100 Euler steps, cfg 4, time shift 2.5 (official 0.4).

Export seeds do not depend on the number of GPUs: sample i's noise comes from a generator
seeded with (seed, i) and its label is fixed by i (class-balanced by default), so any
world size writes the same array. Samples go to shards of fixed index ranges, each
written atomically; a killed export continues where it stopped when rerun with the same
settings (kept in settings.json beside the shards), then the shards are merged into an
ADM-compatible samples.npz (arr_0: uint8 [N, H, W, 3], labels: int64 [N]).
"""

import argparse
import json
import math
import os
import shlex
import tempfile
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import svg


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------
def check_class_ids(ids, num_classes):
    """Class ids must be real classes; num_classes itself is the null class (guidance only)."""
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside [0, {num_classes}): this checkpoint has "
                         f"{num_classes} classes (id {num_classes} is the null class used by guidance)")


def sample_noise(indices, shape, seed):
    """Noise for global sample ids: sample i uses a generator seeded with (seed, i), on the CPU,
    so it is the same on any device and for any number of ranks. [len(indices), *shape]."""
    out = []
    for i in indices:
        state = np.random.SeedSequence([seed, i]).generate_state(2, np.uint32)  # mix (seed, i)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out.append(torch.randn(shape, generator=g))  # [C, h, w]
    return torch.stack(out)  # [n, C, h, w]


def export_labels(num_samples, num_classes, scheme, seed):
    """Labels of all N samples, fixed by index: "balanced" = N / K per class in a shuffled
    order (the remainder spread over the first classes), "random" = uniform draws."""
    g = torch.Generator().manual_seed(seed)
    if scheme == "balanced":
        labels = torch.arange(num_samples) % num_classes  # [N]
        return labels[torch.randperm(num_samples, generator=g)]
    return torch.randint(0, num_classes, (num_samples,), generator=g)  # [N]


def generate(gen, noise, y, args, device, bar=None):
    """Normalised-feature noise [N, C, h, w] -> images in [-1, 1], [N, 3, H, W], in batches."""
    images = []
    for i in range(0, len(y), args.batch_size):
        with svg.autocast(args.precision, device):
            z = svg.sample_ode(gen.model, noise[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device),
                               args.steps, shift=args.shift, method=args.method, cfg_scale=args.cfg_scale,
                               cfg_mode=args.cfg_mode, cfg_interval=tuple(args.cfg_interval),
                               zero_init_steps=args.zero_init_steps, null_class=gen.num_classes)  # [b, C, h, w]
            images.append(decode(gen, z).cpu())  # [b, 3, H, W]
        if bar is not None:
            bar.update(len(z))
    return torch.cat(images)  # [N, 3, H, W]


def decode(gen, z):
    """Normalised features -> SVG features (dataset statistics) -> images, clamped to [-1, 1]."""
    with torch.no_grad():
        return gen.ae.decode(svg.denormalize_features(z.float(), gen.stats)).float().clamp(-1, 1)


def feature_shape(gen):
    cfg = gen.model.cfg
    return (cfg.in_channels, cfg.input_size, cfg.input_size)  # [C, h, w] the SiT generates


def load_gen(ckpt, ae, stats, device, trust_pickle=False):
    """The generator every subcommand samples from: EMA SiT, feature stats, autoencoder on `device`."""
    model, stats, ae = svg.load_generator(ckpt, ae=ae, stats=stats, trust_pickle=trust_pickle)  # EMA SiT, frozen, CPU
    return SimpleNamespace(model=model.to(device), stats=stats, ae=ae.to(device), num_classes=model.cfg.num_classes)


# ----------------------------------------------------------------------------------
# grid: Fig. 2 / App. I style class grids
# ----------------------------------------------------------------------------------
def run_grid(args, gen, dist):
    check_class_ids(args.classes, gen.num_classes)
    y = torch.tensor(args.classes).repeat_interleave(args.per_class)  # one row per class, [n]
    noise = sample_noise(range(len(y)), feature_shape(gen), args.seed)  # [n, C, h, w]
    images = generate(gen, noise, y, args, dist.device)  # [n, 3, H, W]
    svg.save_image_grid(list(images.split(args.per_class)), args.out)  # one row per class
    print(f"saved {len(y)} samples ({args.steps} {args.method} steps, cfg {args.cfg_scale}) to {args.out}")


# ----------------------------------------------------------------------------------
# export: FID-50K samples, resumable, independent of the world size
# ----------------------------------------------------------------------------------
def export_settings(args):
    """Everything that changes the samples; a resumed export must match it exactly. Input files
    are recorded by content (sha256), so a file replaced between two runs is caught; the batch
    size and --compile are recorded since batched and compiled kernels round differently."""
    keys = ("num_samples", "labels", "seed", "steps", "method", "shift", "cfg_scale", "cfg_mode",
            "zero_init_steps", "precision", "shard_size", "batch_size", "compile")
    settings = {k: getattr(args, k) for k in keys}
    settings["cfg_interval"] = list(args.cfg_interval)
    for k in ("ckpt", "ae", "stats"):  # input files, by content
        settings[k + "_sha256"] = getattr(args, k) and svg.file_sha256(getattr(args, k))
    return settings


def shard_path(out_dir, k):
    return os.path.join(out_dir, "shards", f"shard_{k:06d}.pt")


def check_or_write_settings(out_dir, settings, dist):
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out_dir} holds an export with other settings ({'; '.join(diff)}): rerun "
                             "with the same settings to resume, or pick a new --out-dir")
    elif dist.is_main:
        svg.atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2).encode()))


def merge_shards(out_dir, num_shards, settings):
    """Shards in index order -> samples.npz (arr_0 uint8 NHWC + labels), written atomically.

    The images go through a memory-mapped .npy on disk, so RAM stays at one shard at any size
    (App. H: 50k samples are 39 GB at 512 px and 157 GB at 1024 px).
    """
    path, labels, arr = os.path.join(out_dir, "samples.npz"), [], None
    fd, scratch = tempfile.mkstemp(dir=out_dir, prefix="samples.npy.", suffix=".tmp")  # unique: merges never collide
    os.close(fd)
    for k in range(num_shards):
        shard = svg.load_checkpoint(shard_path(out_dir, k), "export shard")
        assert shard["start"] == k * settings["shard_size"], f"{shard_path(out_dir, k)} is out of place"
        images = shard["images"].numpy()  # [n, H, W, 3]
        if arr is None:
            arr = np.lib.format.open_memmap(scratch, "w+", np.uint8,
                                            (settings["num_samples"], *images.shape[1:]))  # [N, H, W, 3]
        arr[shard["start"]:shard["start"] + len(images)] = images
        labels.append(shard["labels"].numpy())
    labels = np.concatenate(labels)  # [N]
    assert len(labels) == settings["num_samples"]
    svg.atomic_write(path, lambda f: np.savez(f, arr_0=arr, labels=labels))  # streams the memory map in chunks
    arr = None  # closes the memory map
    os.remove(scratch)
    return path


def shard_ids(k, args):
    """Global sample ids of shard k: [k S, min((k + 1) S, N))."""
    return list(range(k * args.shard_size, min((k + 1) * args.shard_size, args.num_samples)))


def export_images(gen, ids, labels, args, device, bar=None):
    """The export's samples `ids` -> uint8 [n, H, W, 3] on the CPU: noise seeded by (seed, i),
    label labels[i], the ODE, decode, svg.to_uint8. The one sampling path behind `export`,
    eval.py sweep (Table 2, Fig. 13) and train_dit.py's online FID (Fig. 14)."""
    noise = sample_noise(ids, feature_shape(gen), args.seed)  # [n, C, h, w]
    images = generate(gen, noise, labels[ids], args, device, bar)  # [n, 3, H, W] in [-1, 1]
    return svg.to_uint8(images).permute(0, 2, 3, 1).cpu()  # [n, H, W, 3] uint8


def export_in_memory(gen, args, dist, bar=None):
    """What `export` would write, without files: yields (ids, uint8 [n, H, W, 3]) for this rank's
    shards (round robin, batched within each shard as `export` batches them)."""
    labels = export_labels(args.num_samples, gen.num_classes, args.labels, args.seed)  # [N]
    for k in range(math.ceil(args.num_samples / args.shard_size))[dist.rank::dist.world_size]:
        ids = shard_ids(k, args)
        yield ids, export_images(gen, ids, labels, args, dist.device, bar)


# Flags an in-process export does not take: the caller owns the checkpoint, files and sharding.
IN_PROCESS_FIXED = ("--ckpt", "--ae", "--stats", "--out-dir", "--max-shards", "--compile", "--trust-pickle")


def export_config(flags="", **fixed):
    """`sample.py export`'s settings as parsed from `flags` (a string of its command-line flags;
    unset ones keep export's defaults), then `fixed` set by the caller (eval.py sweep,
    train_dit.py --fid-every). The same parser, so in-process samples are the export's."""
    argv = shlex.split(flags)
    owned = set(IN_PROCESS_FIXED) | {"--" + k.replace("_", "-") for k in fixed}
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    taken = sorted(o for o in owned if any(o.startswith(g) for g in given))  # argparse takes prefixes too
    if taken:
        raise ValueError(f"sampler flags {taken} are set by this command, not in the `sample.py export` flags "
                         f"{flags!r}: drop them there")
    args = parse_args(["export", "--ckpt", "-", "--out-dir", "-", *argv])
    for k, v in fixed.items():
        setattr(args, k, v)
    return args


def in_process_settings(args):
    """An export_config's sampler settings (everything but the fixed files), for logs and tables."""
    skip = {f[2:].replace("-", "_") for f in IN_PROCESS_FIXED} | {"command"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in skip}


def run_export(args, gen, dist):
    settings = export_settings(args)
    check_or_write_settings(args.out_dir, settings, dist)
    labels = export_labels(args.num_samples, gen.num_classes, args.labels, args.seed)  # [N]
    num_shards = math.ceil(args.num_samples / args.shard_size)
    done = {k for k in range(num_shards) if os.path.exists(shard_path(args.out_dir, k))}
    if dist.is_main:
        for path in svg.remove_stale_tmp(os.path.dirname(shard_path(args.out_dir, 0))):
            print(f"removed {path}: a partial shard of a killed export")
    dist.barrier()  # every rank has listed the finished shards (and rank 0 cleaned) before any rank writes
    todo = [k for k in range(num_shards) if k not in done][dist.rank::dist.world_size]  # round robin
    if args.max_shards is not None:
        todo = todo[:args.max_shards]
    n_todo = sum(min(args.shard_size, args.num_samples - k * args.shard_size) for k in todo)
    if dist.is_main:
        print(f"export: {len(done)}/{num_shards} shards done, this run writes {len(todo)} per rank "
              f"on {dist.world_size} rank(s) -> {args.out_dir}")
    bar = tqdm(total=n_todo, desc="export (rank 0)", disable=not dist.is_main, unit="img")
    for k in todo:
        ids = shard_ids(k, args)
        images = export_images(gen, ids, labels, args, dist.device, bar)  # [n, H, W, 3] uint8
        svg.atomic_save({"images": images, "labels": labels[ids], "start": ids[0]}, shard_path(args.out_dir, k))
    bar.close()
    dist.barrier()
    if not dist.is_main:
        return
    missing = [k for k in range(num_shards) if not os.path.exists(shard_path(args.out_dir, k))]
    if missing:
        print(f"export: {num_shards - len(missing)}/{num_shards} shards written; rerun the same command "
              "to continue")
        return
    path = merge_shards(args.out_dir, num_shards, settings)
    print(f"export: wrote {args.num_samples} samples to {path} (settings in "
          f"{os.path.join(args.out_dir, 'settings.json')})")


# ----------------------------------------------------------------------------------
# interp: linear and spherical interpolation of the initial noise (App. D)
# ----------------------------------------------------------------------------------
def run_interp(args, gen, dist):
    check_class_ids([args.class_id], gen.num_classes)
    x0, x1 = sample_noise([0, 1], feature_shape(gen), args.seed)  # 2 x [C, h, w]
    lams = torch.linspace(0, 1, args.num_points).tolist()
    noise = torch.stack([svg.lerp(x0, x1, lam) for lam in lams]  # Eq. (7)
                        + [svg.slerp(x0, x1, lam) for lam in lams])  # Eq. (8), [2 n, C, h, w]
    y = torch.full((len(noise),), args.class_id)  # one class for the whole strip
    images = generate(gen, noise, y, args, dist.device)  # [2 n, 3, H, W]
    svg.save_image_grid(list(images.split(args.num_points)), args.out)  # row 1: lerp, row 2: slerp
    print(f"saved {args.num_points}-point lerp (top) and slerp (bottom) strips to {args.out}")


# ----------------------------------------------------------------------------------
# edit: SDEdit-style class-conditional editing with trajectory inversion (App. C)
# ----------------------------------------------------------------------------------
def load_image(path, size):
    """An image file -> ADM centre crop at the generator's resolution, [1, 3, size, size] in [-1, 1]."""
    pil = svg.open_image(path, exif_transpose=True)  # a photo as it is shown; ValueError naming the file
    return svg.to_tensor(svg.center_crop_arr(pil, size))[None]  # [1, 3, size, size]


def box_mask(box, region, size):
    """Pixel box (x0, y0, x1, y1) on the cropped image -> edit mask over feature cells [1, 1, h, w]:
    a cell is in the box when its 16x16 patch overlaps it; region "outside" edits the rest."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"--box {x0} {y0} {x1} {y1} must satisfy 0 <= x0 < x1 <= {size} and "
                         f"0 <= y0 < y1 <= {size}: pixel coordinates on the {size}x{size} centre crop")
    h = size // svg.PATCH_SIZE
    inside = torch.zeros(1, 1, h, h)
    p = svg.PATCH_SIZE
    inside[..., y0 // p:math.ceil(y1 / p), x0 // p:math.ceil(x1 / p)] = 1  # covered cells
    return inside if region == "inside" else 1 - inside


def draw_box(image, box):
    """A copy of image [1, 3, H, W] with the box outlined in red (1 px, inside the box)."""
    x0, y0, x1, y1 = box
    out = image.clone()
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1)  # [3, 1]
    out[0, :, y0:y1, x0] = out[0, :, y0:y1, x1 - 1] = red
    out[0, :, y0, x0:x1] = out[0, :, y1 - 1, x0:x1] = red
    return out


def edit_image(gen, image, y, source_y, mask, args, device):
    """[1, 3, H, W] image -> edited image [1, 3, H, W] in [-1, 1] (App. C)."""
    noise = sample_noise([0], feature_shape(gen), args.seed)  # [1, C, h, w]
    with torch.no_grad(), svg.autocast(args.precision, device):
        x0 = svg.normalize_features(gen.ae.encode(image.to(device)).float(), gen.stats)  # [1, C, h, w]
        z = svg.edit_features(gen.model, x0, y.to(device), mask.to(device), noise.to(device), args.t_edit,
                              args.steps, args.shift, args.cfg_scale, args.blur_sigma,
                              None if source_y is None else source_y.to(device), gen.num_classes)
        return decode(gen, z)


def run_edit(args, gen, dist):
    size = feature_shape(gen)[-1] * svg.PATCH_SIZE  # the SiT's grid: train_dit --image-size may differ from the AE's
    check_class_ids([args.class_id] + ([] if args.source_class is None else [args.source_class]), gen.num_classes)
    image = load_image(args.image, size)  # [1, 3, size, size]
    mask = box_mask(args.box, args.region, size)  # [1, 1, h, w]
    source_y = None if args.source_class is None else torch.tensor([args.source_class])
    edited = edit_image(gen, image, torch.tensor([args.class_id]), source_y, mask, args, dist.device)
    svg.save_image_grid([torch.cat([draw_box(image, args.box), edited.cpu()])], args.out)  # input | edited
    print(f"saved input | edit (class {args.class_id}, {args.region} of the box) to {args.out}")


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------
def add_common(p, steps, cfg_scale, shift, out, batch_size=32, sampler_options=True):
    """Flags every subcommand shares; sampler_options: the batched ODE / guidance modes (not edit)."""
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint (train_dit.py, or the official SVG-XL .pt)")
    p.add_argument("--ae", default=None, help="official SVG-XL only: its autoencoder .ckpt (HF howlin/SVG)")
    p.add_argument("--stats", default=None, help="official SVG-XL only: dinov3_sp_stats.pt (shiml20/SVG)")
    p.add_argument("--trust-pickle", action="store_true", help=svg.TRUST_PICKLE_HELP)
    p.add_argument("--steps", type=svg.positive_int, default=steps, help="Euler steps = NFE (App. A)")
    p.add_argument("--shift", type=svg.positive_float, default=shift,
                   help="sampling time shift a > 0 in t' = a t / (1 + (a - 1) t); official s = 1 / a")
    p.add_argument("--cfg-scale", type=svg.finite_float, default=cfg_scale, help="guidance w; 1 = no guidance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=svg.PRECISIONS, default="fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the SiT and the decoder (the first batch of each size compiles)")
    if sampler_options:
        p.add_argument("--method", choices=svg.SAMPLER_METHODS, default="euler")
        p.add_argument("--cfg-mode", choices=svg.CFG_MODES, default="constant")
        p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
                       help="with --cfg-mode interval: guide only while T_LO <= t <= T_HI")
        p.add_argument("--zero-init-steps", type=int, default=0,
                       help="CFG-Zero* zero-init: velocity 0 for the first k steps (paper: 1 with cfg 1.5)")
        p.add_argument("--batch-size", type=svg.positive_int, default=batch_size, help="images per forward, per rank")
    if out is not None:
        p.add_argument("--out", default=out, help="output PNG")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("grid", help="class-conditional sample grid (PNG, one row per class)")
    add_common(p, steps=25, cfg_scale=4.0, shift=svg.SAMPLE_TIME_SHIFT, out="samples/grid.png")
    p.add_argument("--classes", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279])
    p.add_argument("--per-class", type=svg.positive_int, default=4)
    p = sub.add_parser("export", help="N samples -> ADM .npz for FID (torchrun for many GPUs)")
    add_common(p, steps=25, cfg_scale=1.0, shift=svg.SAMPLE_TIME_SHIFT, out=None, batch_size=125)
    p.add_argument("--out-dir", required=True, help="holds settings.json, shards/ and samples.npz")
    p.add_argument("--num-samples", type=svg.positive_int, default=50_000)
    p.add_argument("--labels", choices=("balanced", "random"), default="balanced",
                   help="balanced: N / num_classes per class (shuffled); random: uniform class draws")
    p.add_argument("--shard-size", type=svg.positive_int, default=250, help="samples per resumable shard")
    p.add_argument("--max-shards", type=svg.positive_int, default=None,
                   help="stop after this many new shards per rank (time-limited jobs; rerun to continue)")
    p = sub.add_parser("interp", help="lerp / slerp between two noises under one class (App. D)")
    add_common(p, steps=25, cfg_scale=4.0, shift=svg.SAMPLE_TIME_SHIFT, out="samples/interp.png")
    p.add_argument("--class-id", type=int, required=True)
    p.add_argument("--num-points", type=svg.positive_int, default=10)
    p = sub.add_parser("edit", help="zero-shot class-conditional editing of a box (App. C)")
    add_common(p, steps=100, cfg_scale=4.0, shift=svg.EDIT_TIME_SHIFT, out="samples/edit.png",
               sampler_options=False)
    p.add_argument("--image", required=True)
    p.add_argument("--class-id", type=int, required=True, help="the new class")
    p.add_argument("--source-class", type=int, default=None,
                   help="class for the inversion (default: the null class, unconditional)")
    p.add_argument("--box", type=int, nargs=4, required=True, metavar=("X0", "Y0", "X1", "Y1"),
                   help="pixel box on the centre crop at the generator's resolution")
    p.add_argument("--region", choices=("inside", "outside"), default="inside", help="which side to edit")
    p.add_argument("--t-edit", type=float, default=0.8, help="inversion depth t_edit in (0, 1]")
    p.add_argument("--blur-sigma", type=svg.nonnegative_float, default=1.0,
                   help="mask softening, in feature cells (0: a hard mask)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dist = svg.init_distributed()
    if args.command != "export" and dist.world_size > 1:
        raise ValueError(f"only `export` runs across ranks: run `python sample.py {args.command} ...`")
    svg.setup_precision(args.precision)
    # No global seed: every random draw comes from a generator seeded with (seed, sample id).
    gen = load_gen(args.ckpt, args.ae, args.stats, dist.device, args.trust_pickle)
    if args.compile:  # static shapes: one graph per batch size (the last, smaller batch recompiles)
        gen.model, gen.ae.decoder = torch.compile(gen.model, dynamic=False), torch.compile(gen.ae.decoder, dynamic=False)
    {"grid": run_grid, "export": run_export, "interp": run_interp, "edit": run_edit}[args.command](args, gen, dist)
    dist.close()


if __name__ == "__main__":
    main()
