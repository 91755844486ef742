"""Speed of every SVG stage on one device: stage-2 training step, encoder, decoder, sampling, FID.

Like nanoGPT's bench.py: random weights and random inputs of the right shapes (no data,
no checkpoints), a few warm-up iterations, timed repeats, one table plus the exact setup.

    python bench.py --preset tiny                     # 2-core CPU, ~1 min (more with the peers rows)
    python bench.py --preset paper --batch 32                                # one GPU, SVG-XL, bf16
    python bench.py --preset paper --batch 64 --compile --what train,sample

Rows. train (cached): one stage-2 step from cached features, as train_dit.py does it:
flow matching loss (Eq. 3-5) under autocast, backward, fused AdamW, EMA update.
train (+encode): the frozen SVG encoder under no_grad first, outside autocast as in train_dit.py.
encode / decode: the SVG autoencoder alone (App. F, Table 7: throughput at batch 64,
latency at batch 1). stage-1 step (GAN): one train_ae.py iteration past --disc-start (AE
step with LPIPS and the adaptive-weighted GAN term, then the D step; FLOPs not counted).
sample: N images, Euler ODE with CFG (App. A) + decode. fid: eval.py's
FID InceptionV3 on uint8 images, in exact fp32 as `eval.py fid` runs it. Everything else
runs under the one --precision autocast (encode/decode rows included).

Side by side (what "peers", optional): our FID Inception, LPIPS and DINOv3 against the
packages people would otherwise use (pytorch-fid's InceptionV3([3]), lpips' LPIPS(net="vgg"),
transformers' DINOv3ViTModel), each pair with the same random weights, at --peer-size px and
--ae-batch, in fp32, timed interleaved (ours, theirs, ours, ...) so that load on a shared
machine hits both; it prints the medians, min-max, their time / our time per pair and the
largest output difference, with the load average. Runs for whichever packages import:
    pip install --no-deps lpips pytorch-fid torchvision   # (transformers: any 4.56+ / 5.x)
    python bench.py --preset tiny --what peers --repeats 9

Columns. ms/iter: median over --repeats (min-max beside it); images/s = batch / median.
FLOPs are model FLOPs, 2 per multiply-add, of matrix products only (Linear layers,
convolutions, attention QK^T and AV); norms, activations, softmax and the embedding lookup
are not counted (< 1% for SiT). SiT: analytic (sit_forward_flops), training = 3 forwards
(backward = 2 forwards; the forward that activation checkpointing recomputes is not
counted, as MFU defines it); train (+encode) adds one encoder forward. Encoder, decoder,
Inception: counted by torch's
FlopCounterMode at batch 1, times the batch. MFU = achieved TFLOP/s / the device's dense
peak for the precision (PEAK_TFLOPS; on a CPU or another GPU pass --peak-tflops).
Peak memory: torch.cuda.max_memory_allocated over each row's timed iterations on CUDA (all
resident models count: SiT, EMA, optimizer state, autoencoder); on CPU the process's peak
resident set size (ru_maxrss), which includes every row before it.
CPU threads (printed with the table): on idle cores torch's default (one per core) is best;
when other work shares the cores, OpenMP threads wait for each other at every op and
OMP_NUM_THREADS=1 was 3-10x faster on a busy 2-core machine. Compare both; keep the faster.
"""

import argparse
import copy
import importlib
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import svg
import train_ae
from eval import FIDInceptionV3

PEAK_TFLOPS = {  # dense (no 2:4 sparsity) per-GPU datasheet peaks; the first key in the device name wins
    "H100 PCIe": {"bf16": 756, "tf32": 378, "fp32": 51},
    "H100": {"bf16": 989, "tf32": 495, "fp32": 67},  # SXM
    "H800": {"bf16": 989, "tf32": 495, "fp32": 67},  # the official SVG training GPU
    "H200": {"bf16": 989, "tf32": 495, "fp32": 67},  # H100's compute, more memory
    "A100": {"bf16": 312, "tf32": 156, "fp32": 19.5},
}
PRESETS = {  # per-device batches: training step, encoder/decoder/Inception throughput, images sampled
    "paper": dict(model="SiT-XL", ae="paper", batch=32, ae_batch=64, ae_train_batch=32, num_samples=64,
                  precision="bf16"),  # stage 1: one of train_ae.py's 2 x 32 micro-batches
    "tiny": dict(model="SiT-tiny", ae="tiny", batch=32, ae_batch=8, ae_train_batch=8, num_samples=8,
                 precision="fp32"),  # train_dit.py / train_ae.py --preset tiny's model and batches
}
WHAT = ("train", "encode", "decode", "sample", "fid", "ae_step", "peers")
CFG_SCALE = 1.5  # the paper's "w/ CFG" sampling (App. A)
SAMPLE_STEPS = 25  # Euler steps = NFE (App. A)
PEER_PACKAGES = "lpips pytorch-fid torchvision transformers"  # bench-only extras, never runtime dependencies
PEER_SIZE = 256  # image size of the side-by-side rows (the FID Inception resizes to 299 anyway)


def what_list(text):
    items = text.split(",")
    unknown = [w for w in items if w not in WHAT]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}: pass a comma-separated subset of {','.join(WHAT)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="defaults for every unset flag")
    p.add_argument("--model", choices=sorted(svg.SIT_PRESETS))
    p.add_argument("--batch", type=int, help="training batch per device")
    p.add_argument("--ae-batch", type=int, help="encoder / decoder / Inception throughput batch (Table 7: 64)")
    p.add_argument("--ae-train-batch", type=int, help="stage-1 (train_ae.py) step batch")
    p.add_argument("--num-samples", type=int, help="images sampled per timed iteration")
    p.add_argument("--precision", choices=svg.PRECISIONS)
    p.add_argument("--compile", action="store_true", help="torch.compile the SiT, encoder, decoder, Inception, stage-1 AE and LPIPS")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the SiT blocks")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--what", type=what_list, default=list(WHAT), help=f"comma-separated subset of {','.join(WHAT)}")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per row (compilation happens here)")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per row")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU on a device not in PEAK_TFLOPS")
    p.add_argument("--image-size", type=int, help="App. H: run at this size (the autoencoder preset's "
                   "architecture via svg.resize_ae_config; default its training size)")
    p.add_argument("--memory", action="store_true", help="App. H: print the analytic memory of a training "
                   "step and of sampling at 256/512/1024 px (or --image-size) and exit; no model is run")
    p.add_argument("--peer-size", type=int, default=PEER_SIZE, help="image size of the side-by-side (peers) rows")
    args = p.parse_args(argv)
    svg.apply_preset(args, PRESETS[args.preset])
    for flag in ("batch", "ae_batch", "ae_train_batch", "num_samples", "repeats", "peer_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0 (the device's dense TFLOP/s for --precision), got {args.peak_tflops}")
    if args.image_size is not None and (args.image_size < 1 or args.image_size % svg.PATCH_SIZE):
        p.error(f"--image-size must be a positive multiple of {svg.PATCH_SIZE}, got {args.image_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device: run with --device cpu (or install a CUDA build)")
    return args


def sit_forward_flops(model, batch):
    """Matmul FLOPs (2 per multiply-add) of one forward of an svg.SiT on `batch` feature maps."""
    cfg = model.cfg
    N, D, C = cfg.input_size**2, cfg.hidden_size, cfg.in_channels  # tokens, hidden, feature channels
    H, F = int(D * cfg.mlp_ratio), model.t_embedder.freq_dim  # MLP hidden, t-frequency dim
    block = (2 * N * D * 3 * D  # qkv
             + 2 * 2 * N * N * D  # attention: QK^T and AV over all heads
             + 2 * N * D * D  # proj
             + 2 * 2 * N * D * H  # MLP fc1, fc2
             + 2 * D * 6 * D)  # adaLN (one vector per image)
    io = 2 * N * C * D + 2 * (F * D + D * D) + 2 * D * 2 * D + 2 * N * D * C  # x/t embedders, final adaLN + linear
    return batch * (cfg.depth * block + io)


# App. H memory, analytic (bytes). Per SiT block and token, what autograd saves for backward:
# fp32: 23 D floats = the residual stream and both LayerNorm outputs (3 D), both modulated inputs
# (2 D), qkv (3 D), QK-normed q and k (2 D), the attention output, the projection's input and
# output (3 D), the MLP's 4D hidden before and after GELU (8 D), the MLP output (D), and once
# more the residual stream into norm2 (D). bf16 autocast keeps the residual stream, its two
# LayerNorms and the modulation in fp32 and the rest in bf16: 54 D bytes on a CPU, 62 D on
# CUDA, whose autocast runs the QK LayerNorms in fp32 (their fp32 input copies, 8 D more).
ACTIVATION_BYTES_PER_TOKEN = {"fp32": 92, "bf16": 62, "bf16-cpu": 54}  # x hidden size D, per block
# Training state per SiT parameter: weights, grads, AdamW m and v, EMA (4 B each); bf16: + the weight copies.
STATE_BYTES_PER_PARAM = {"fp32": 20, "bf16": 22}
# Decoder working set per image in bytes per (channel x pixel) of its full-resolution level, from
# the H100 decode rows at batch 64 in README / docs/h100 (peak minus the resident weights).
DECODE_BYTES_PER_PIXEL_CHANNEL = {"fp32": 19, "bf16": 16}


def sit_activation_bytes(cfg, batch, precision, device_type="cuda"):
    """Bytes autograd keeps between forward and backward of one SiT training step (App. H).

    Per block and token ACTIVATION_BYTES_PER_TOKEN x D plus 4 (5 H + 4) bytes of LayerNorm
    statistics and attention log-sum-exp, plus 40 B D per block for the per-image modulation.
    Attention is SDPA (flash / memory-efficient / CPU flash): no N x N matrix is stored (the
    math backend would add B H N^2 elements per block). With grad_checkpointing a block keeps
    only its fp32 input (4 D per token) and one block is recomputed at a time. The embedders,
    final layer and loss are counted roughly (3 D + 4 C floats per token, < 1% for SiT-XL).
    tests/test_resolution.py checks the per-block count against autograd's saved tensors on a CPU.
    """
    N, D, H, C = cfg.input_size**2, cfg.hidden_size, cfg.num_heads, cfg.in_channels
    key = precision if precision != "bf16" or device_type == "cuda" else "bf16-cpu"
    block = batch * N * (ACTIVATION_BYTES_PER_TOKEN.get(key, 92) * D + 4 * (5 * H + 4)) + 40 * batch * D
    io = batch * N * 4 * (3 * D + 4 * C)
    if cfg.grad_checkpointing:
        return cfg.depth * batch * N * 4 * D + block + io
    return cfg.depth * block + io


def memory_table(args):
    """App. H: analytic GiB of a stage-2 training step and of sampling at 256, 512 and 1024 px."""
    sizes = [args.image_size] if args.image_size else [256, 512, 1024]
    e = 2 if args.precision == "bf16" else 4  # bytes per element of the matmul activations
    print(f"App. H memory (analytic, GiB) for {args.model} + the {args.ae} autoencoder, {args.precision}, "
          f"train batch {args.batch} per device, sampling {args.num_samples} images with CFG:")
    print(f"{'image':>6}{'tokens':>8}{'states':>9}{'act/img':>9}{'train':>9}{'train ckpt':>12}{'decode/img':>12}"
          f"{'sample':>9}")
    for size in sizes:
        with torch.device("meta"):
            ae = svg.SVGAutoencoder(svg.resize_ae_config(svg.AE_PRESETS[args.ae], size))
            cfg = svg.SiTConfig(**{**asdict(svg.SIT_PRESETS[args.model]), "in_channels": ae.feature_dim,
                                   "input_size": size // svg.PATCH_SIZE})
            params = sum(p.numel() for p in svg.SiT(cfg).parameters())
        ae_params = sum(p.numel() for p in ae.parameters())
        states = STATE_BYTES_PER_PARAM.get(args.precision, 20) * params + 4 * ae_params  # + frozen encoder
        act = sit_activation_bytes(cfg, 1, args.precision)
        ckpt = sit_activation_bytes(svg.SiTConfig(**{**asdict(cfg), "grad_checkpointing": True}), args.batch,
                                    args.precision)
        # Sampling (no graph): EMA SiT + autoencoder weights, plus the larger working set of a SiT
        # forward on 2B images (CFG; inside the MLP: fp32 residual + two 4D hidden tensors per token)
        # and of decoding the B images (measured constant, DECODE_BYTES_PER_PIXEL_CHANNEL).
        N, D = cfg.input_size**2, cfg.hidden_size
        decode = DECODE_BYTES_PER_PIXEL_CHANNEL.get(args.precision, 19) * ae.cfg.decoder_ch * size**2
        sample = 4 * (params + ae_params) + args.num_samples * max(2 * N * (4 + 8 * e) * D, decode)
        gib = [x / 2**30 for x in (states, act, states + args.batch * act, states + ckpt, decode, sample)]
        print(f"{size:>6}{N:>8}" + "".join(f"{g:>{w}.2f}" for g, w in zip(gib, (9, 9, 9, 12, 12, 9))))
    print(f"states = {STATE_BYTES_PER_PARAM.get(args.precision, 20)} B per SiT parameter ({params / 1e6:.1f}M: "
          f"weights, grads, AdamW m and v, EMA{', bf16 weight copies' if args.precision == 'bf16' else ''}) + the "
          f"fp32 autoencoder ({ae_params / 1e6:.1f}M); act/img = sit_activation_bytes at batch 1 (SDPA, CUDA "
          f"autocast); train = states + batch x act/img; train ckpt = with --grad-checkpointing; decode/img = the "
          f"decoder's working set per image (measured at 256 px on an H100, scaled by pixels); sample = EMA SiT and "
          f"autoencoder weights + batch x the larger of decode/img and a SiT forward's working set. Allocator "
          f"caching and fragmentation come on top.")


def counted_flops(fn, *inputs):
    """Matmul / conv FLOPs of fn(*inputs) by FlopCounterMode (math attention, which it can count)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup, repeats):
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed calls, device-synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_tflops(args, device_name, precision):
    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.device == "cuda":
        for key, peaks in PEAK_TFLOPS.items():
            if key in device_name:
                return peaks[precision]
    return None  # CPU or an unknown GPU: MFU n/a


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


# ---------------------------------------------------------------- optional: side by side with the reference packages


def import_peers():
    """{name: module} of the importable reference packages: lpips, pytorch_fid.inception, transformers.

    lpips and pytorch-fid import torchvision. Where the only torchvision wheel for this torch
    is a CUDA build beside a CPU torch, its import fails with "operator torchvision::nms does
    not exist" (its compiled ops do not load); defining the two operator schemas its meta
    registrations need, and importing again, makes it importable (no torchvision op is used).
    """
    def load(name):
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]  # the half-imported package
        lib = torch.library.Library("torchvision", "DEF")  # kept alive as an attribute below
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_peers.torchvision_schemas = lib
    peers = {"lpips": load("lpips"), "pytorch_fid": load("pytorch_fid.inception"), "transformers": load("transformers")}
    return {k: v for k, v in peers.items() if v is not None}


def peer_pairs(peers, device, batch, size, dino_arch):
    """(name, ours(), theirs(), peer) per importable peer package, both sides with the same random weights."""
    pairs = []
    if "pytorch_fid" in peers:  # eval.FIDInceptionV3 vs pytorch-fid's InceptionV3([3]) on [0, 1] float images
        ours = FIDInceptionV3()
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        fid, download = peers["pytorch_fid"], peers["pytorch_fid"].load_state_dict_from_url
        fid.load_state_dict_from_url = lambda *a, **k: ours.state_dict()  # its weights file = ours, random
        try:
            theirs = fid.InceptionV3([3])
        finally:
            fid.load_state_dict_from_url = download
        ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
        x = torch.rand(batch, 3, size, size, device=device)
        pairs.append(("fid Inception", lambda o=ours, x=x: o(x)[0], lambda t=theirs, x=x: t(x)[0].flatten(1),
                      "pytorch-fid"))
    if "lpips" in peers:  # svg.LPIPS vs lpips.LPIPS(net="vgg"): its heads, random VGG16 on both
        theirs = peers["lpips"].LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
        ours = svg.LPIPS()
        with torch.no_grad():
            trunk = [p for s in range(1, 6) for p in getattr(theirs.net, f"slice{s}").parameters()]
            for p, q in zip(ours.features.parameters(), trunk, strict=True):
                p.copy_(q)
            for lin, head in zip(ours.lins, theirs.lins):
                lin.weight.copy_(head.model[-1].weight)
        ours, theirs = ours.to(device), theirs.to(device)
        x, y = (torch.rand(batch, 3, size, size, device=device) * 2 - 1 for _ in range(2))
        pairs.append(("LPIPS vgg", lambda o=ours, x=x, y=y: o(x, y), lambda t=theirs, x=x, y=y: t(x, y).flatten(),
                      "lpips"))
    if "transformers" in peers:  # svg.DinoV3 vs transformers' DINOv3ViTModel
        a = svg.DINOV3_ARCHS[dino_arch]
        tf = peers["transformers"]
        cfg = tf.DINOv3ViTConfig(
            patch_size=svg.PATCH_SIZE, hidden_size=a["embed_dim"], intermediate_size=a["ffn_hidden"],
            num_hidden_layers=a["depth"], num_attention_heads=a["num_heads"],
            num_register_tokens=svg.DINOV3_NUM_REGISTERS, use_gated_mlp=a["ffn"] == "swiglu",
            hidden_act="silu" if a["ffn"] == "swiglu" else "gelu", layer_norm_eps=1e-5, rope_theta=100.0,
            query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True)
        theirs = tf.DINOv3ViTModel(cfg).eval()
        ours = svg.DinoV3(dino_arch).eval()
        ours.load_state_dict(svg.dinov3_state_dict(theirs.state_dict(), dino_arch))
        head_dim = a["embed_dim"] // a["num_heads"]
        k = torch.arange(head_dim // 4, dtype=torch.float32)
        ours.rope_embed.periods.copy_(100.0 ** (2 * k / (head_dim // 2)))  # HF's fp32 periods (no bf16 rounding)
        ours, theirs = ours.to(device), theirs.to(device)
        x = torch.randn(batch, 3, size, size, device=device)  # ImageNet-normalised images
        pairs.append(("DINOv3 " + dino_arch.removeprefix("dinov3_"),
                      lambda o=ours, x=x: o.forward_features(x)["x_norm_patchtokens"],
                      lambda t=theirs, x=x: t(pixel_values=x).last_hidden_state[:, 1 + svg.DINOV3_NUM_REGISTERS:],
                      "transformers"))
    return pairs


def time_pairs(pairs, device, warmup, repeats):
    """Interleaved A/B timing (ours, theirs, ours, theirs, ...) so that load on a shared machine hits both.

    Returns (name, peer, our seconds, their seconds, max |ours - theirs|) per pair.
    """
    out = []
    for name, ours, theirs, peer in pairs:
        with torch.no_grad():
            diff = (ours().float() - theirs().float()).abs().max().item()
            ours_t, theirs_t = [], []
            for _ in range(warmup):
                ours(), theirs()
            for _ in range(repeats):
                ours_t += measure(ours, device, 0, 1)
                theirs_t += measure(theirs, device, 0, 1)
        out.append((name, peer, ours_t, theirs_t, diff))
        print(f"  {name} vs {peer}: {1e3 * statistics.median(ours_t):.1f} / "
              f"{1e3 * statistics.median(theirs_t):.1f} ms", flush=True)
    return out


def print_peer_rows(rows, args):
    """The side-by-side table: medians, min-max, and their time / our time per interleaved pair."""
    if not rows:
        print(f"\nside by side: skipped (none of lpips, pytorch-fid, transformers importable; "
              f"optional: pip install --no-deps {PEER_PACKAGES})")
        return
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\nside by side at {args.peer_size}px, fp32, same random weights, {args.repeats} interleaved "
          f"pairs (ours, theirs, ...); load average {load} (1 / 5 / 15 min)")
    print(f"{'what':<24}{'peer':<14}{'batch':>6}{'ours ms':>10}{'min-max':>16}{'theirs ms':>11}{'min-max':>16}"
          f"{'speed ratio':>13}{'min-max':>12}{'max |diff|':>12}")
    for name, peer, ours, theirs, diff in rows:
        ratios = [t / o for o, t in zip(ours, theirs)]  # > 1: ours faster in that pair
        print(f"{name:<24}{peer:<14}{args.ae_batch:>6}{1e3 * statistics.median(ours):>10.1f}"
              f"{f'{1e3 * min(ours):.1f}-{1e3 * max(ours):.1f}':>16}{1e3 * statistics.median(theirs):>11.1f}"
              f"{f'{1e3 * min(theirs):.1f}-{1e3 * max(theirs):.1f}':>16}{statistics.median(ratios):>13.3f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>12}{diff:>12.2g}")
    print("speed ratio = their time / our time per pair (median; >= 1: ours at least as fast)")


def main(argv=None):
    # ---------------------------------------------------------------- config, device, seed
    args = parse_args(argv)
    if args.memory:
        return memory_table(args)
    device = torch.device(args.device)
    svg.setup_precision(args.precision)
    svg.set_seed(0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    # ---------------------------------------------------------------- models (random weights) and inputs
    ae_cfg = svg.AE_PRESETS[args.ae]
    ae_cfg = svg.resize_ae_config(ae_cfg, args.image_size) if args.image_size else ae_cfg  # App. H
    ae = svg.SVGAutoencoder(ae_cfg).to(device).eval().requires_grad_(False)
    ae.align_stats = "batch"  # random weights have no frozen Eq. (6) statistics; the same cost
    C, grid, size = ae.feature_dim, ae.cfg.image_size // svg.PATCH_SIZE, ae.cfg.image_size
    cfg = svg.SiTConfig(**{**asdict(svg.SIT_PRESETS[args.model]), "in_channels": C, "input_size": grid,
                           "grad_checkpointing": args.checkpointing})
    raw = svg.SiT(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, betas=svg.ADAM_BETAS, weight_decay=0, fused=True)  # as train_dit.py
    stats = {"mean": torch.zeros(C, device=device), "std": torch.ones(C, device=device)}
    compile_ = (lambda f: torch.compile(f, dynamic=False)) if args.compile else (lambda f: f)  # static shapes
    sit, encode, decode = compile_(raw), compile_(ae.encode), compile_(ae.decode)

    def images(batch):  # [B, 3, H, W] in [-1, 1]
        return torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def labels(batch):
        return torch.randint(0, cfg.num_classes, (batch,), device=device)

    def train_step(x0_fn, y):
        def step():
            with torch.no_grad():
                x0 = x0_fn()  # [B, C, h, w] normalised features
            with svg.autocast(args.precision, device):
                loss = svg.flow_matching_loss(sit, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            svg.update_ema(ema, raw, svg.EMA_DECAY)
        return step

    @torch.no_grad()
    def run(fn, *inputs, precision=args.precision):
        with svg.autocast(precision, device):
            return fn(*inputs)

    def sample(noise, y):  # Euler + CFG in normalised feature space, then decode
        z = svg.sample_ode(sit, noise, y, SAMPLE_STEPS, cfg_scale=CFG_SCALE)  # [N, C, h, w]
        return decode(svg.denormalize_features(z.float(), stats))  # [N, 3, H, W]

    one_image, one_feature = images(1), torch.randn(1, C, grid, grid, device=device)
    encode_flops, decode_flops = counted_flops(ae.encode, one_image), counted_flops(ae.decode, one_feature)
    step_flops = 3 * sit_forward_flops(raw, args.batch)
    rows = []  # (name, batch, seconds per iteration, FLOPs per iteration, precision, peak memory)

    def time_row(name, batch, fn, flops, precision=args.precision):
        raw.train(name.startswith("train"))
        times = measure(fn, device, args.warmup, args.repeats)
        rows.append((name, batch, times, flops, precision, peak_memory_gib(device)))
        print(f"  {name}: {1e3 * statistics.median(times):.1f} ms", flush=True)

    # ---------------------------------------------------------------- timed rows
    print(f"bench.py: {args.preset} preset on {device_name}, rows as they finish:", flush=True)
    if "train" in args.what:
        x0, y = torch.randn(args.batch, C, grid, grid, device=device), labels(args.batch)
        time_row("train (cached)", args.batch, train_step(lambda: x0, y), step_flops)
        x = images(args.batch)
        time_row("train (+encode)", args.batch,
              train_step(lambda: svg.normalize_features(run(encode, x, precision="fp32"), stats), y),
              step_flops + args.batch * encode_flops)
    if "encode" in args.what:
        for b in (args.ae_batch, 1):
            x = images(b)
            time_row("encode", b, lambda: run(encode, x), b * encode_flops)
    if "decode" in args.what:
        for b in (args.ae_batch, 1):
            z = torch.randn(b, C, grid, grid, device=device)
            time_row("decode", b, lambda: run(decode, z), b * decode_flops)
    if "sample" in args.what:
        noise, y = torch.randn(args.num_samples, C, grid, grid, device=device), labels(args.num_samples)
        nfe_batch = args.num_samples * (2 if CFG_SCALE != 1 else 1)  # CFG: conditional + unconditional
        time_row(f"sample {SAMPLE_STEPS} Euler", args.num_samples, lambda: run(sample, noise, y),
              SAMPLE_STEPS * sit_forward_flops(raw, nfe_batch) + args.num_samples * decode_flops)
    if "fid" in args.what:
        svg.setup_precision("fp32")  # as eval.py fid: exact fp32 (no bf16, no TF32) for the FID features
        inception = FIDInceptionV3().to(device).eval().requires_grad_(False)  # eval.py's network
        u8 = torch.randint(0, 256, (args.ae_batch, 3, size, size), dtype=torch.uint8, device=device)
        fid_flops = counted_flops(inception, u8[:1])
        net = compile_(inception)
        time_row("fid Inception fp32", args.ae_batch, lambda: run(net, u8, precision="fp32"),
                 args.ae_batch * fid_flops, "fp32")

    if "ae_step" in args.what:  # one train_ae.py iteration past disc_start: AE step with the GAN, then D step
        svg.setup_precision(args.precision)
        ae1 = svg.SVGAutoencoder(ae_cfg).to(device).train()
        disc, lpips = svg.PatchGAN().to(device).train(), svg.LPIPS().to(device)  # random weights
        opt_ae = torch.optim.Adam(ae1.trainable_parameters(), lr=1e-4, betas=svg.ADAM_BETAS_GAN, fused=True)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=svg.ADAM_BETAS_GAN, fused=True)
        forward, lpips_loss = compile_(train_ae.Reconstruct(ae1)), compile_(lpips)  # as train_ae.py --compile
        x = images(args.ae_train_batch)

        def ae_step():
            opt_ae.zero_grad(set_to_none=True)
            fake, _ = train_ae.generator_step(forward, ae1, lpips_loss, disc, x, True, svg.DISC_WEIGHT,
                                              args.precision)
            opt_ae.step()
            opt_d.zero_grad(set_to_none=True)
            with svg.autocast(args.precision, device):
                d_loss = svg.hinge_d_loss(disc(x), disc(fake))
            d_loss.backward()
            opt_d.step()
        time_row("stage-1 step (GAN)", args.ae_train_batch, ae_step, None)

    peer_rows = []
    if "peers" in args.what:
        svg.setup_precision("fp32")  # both sides in exact fp32
        peers = import_peers()
        if peers:
            pairs = peer_pairs(peers, device, args.ae_batch, args.peer_size, ae.cfg.dino_arch)
            peer_rows = time_pairs(pairs, device, args.warmup, args.repeats)

    # ---------------------------------------------------------------- report
    params = sum(p.numel() for p in raw.parameters())
    threads = f", {torch.get_num_threads()} threads / {torch.get_num_interop_threads()} interop" \
        if device.type == "cpu" else f", CUDA {torch.version.cuda}"
    print(f"\ntorch {torch.__version__} on {device_name}{threads}")
    print(f"preset {args.preset}: {args.model} ({params / 1e6:.1f}M params, {grid}x{grid}x{C} features), "
          f"autoencoder {args.ae} ({size}px), precision {args.precision}, compile {args.compile}, "
          f"checkpointing {args.checkpointing}, warmup {args.warmup}, repeats {args.repeats}, "
          f"sampling {SAMPLE_STEPS} Euler steps cfg {CFG_SCALE}")
    print(f"SiT forward {sit_forward_flops(raw, 1) / 1e9:.2f} GFLOP/img (analytic), encoder "
          f"{encode_flops / 1e9:.2f}, decoder {decode_flops / 1e9:.2f} GFLOP/img (counted); 2 FLOPs per multiply-add")
    memory = "peak GiB (CUDA alloc)" if device.type == "cuda" else "peak GiB (RSS)"
    print(f"{'what':<20}{'batch':>6}{'ms/iter':>10}{'min-max':>16}{'images/s':>10}{'TFLOP/s':>10}{'MFU':>7}"
          f"{memory:>23}")
    for name, batch, times, flops, precision, memory_gib in rows:
        median = statistics.median(times)
        tflops = flops / median / 1e12 if flops else None  # None: not counted (stage-1 step)
        peak = device_peak_tflops(args, device_name, precision)
        mfu = f"{100 * tflops / peak:.1f}%" if peak and tflops else "n/a"
        spread = f"{1e3 * min(times):.1f}-{1e3 * max(times):.1f}"
        print(f"{name:<20}{batch:>6}{1e3 * median:>10.1f}{spread:>16}{batch / median:>10.1f}"
              f"{f'{tflops:.3g}' if tflops else 'n/a':>10}{mfu:>7}{memory_gib:>23.2f}")
    if "peers" in args.what:
        print_peer_rows(peer_rows, args)
    peak = device_peak_tflops(args, device_name, args.precision)
    print(f"MFU against {f'{peak} TFLOP/s dense {args.precision}' if peak else 'n/a: peak unknown, pass --peak-tflops'}")


if __name__ == "__main__":
    main()
