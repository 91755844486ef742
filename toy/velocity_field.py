"""Why semantic separation makes few-step sampling work: the SVG paper's Fig. 4b on 2-D data.

Paper: "Latent Diffusion Model without Variational Autoencoder" (SVG), arXiv 2510.15301,
Sec. 3.1 (Eq. 3-5, flow matching) and Sec. 3.2 (Fig. 4b). The claim: when the latent space
separates semantic classes, the class-conditional mean velocity is consistent within a class
and distinct across classes, so a few Euler steps already land in the right place; when the
classes are entangled, velocities conflict and few-step sampling fails.

The experiment. The source is N(0, I) (black dots). The target is NUM_MODES Gaussian modes
with the same spread, in two clusters of four, split into two classes (green, blue) in two layouts:
  - "entangled": the classes alternate inside each cluster, so each class is scattered over
    both clusters, interleaved with the other class (a VAE latent, Fig. 4a);
  - "separated": each class is one cluster: compact and apart from the other class (DINO
    features: "inter-class separation increases, intra-class representations become more
    compact", Sec. 3.2).
Both layouts have the very same modes, so the same data distribution and the same
unconditional velocity field: the only difference is which class owns which mode.
`--geometry ring` puts the modes on one ring instead (separated = two half-rings), a case
where "separated" is not "compact"; the notebook discusses what changes.

Convention (paper Eq. 3-4, stated once): t = 0 is data, t = 1 is noise,
x_t = (1 - t) x_0 + t eps, and the velocity is v = dx_t/dt = eps - x_0. Sampling integrates
the probability-flow ODE from t = 1 down to t = 0, so a sample moves along -v.
Class labels are 0 and 1; the null class NULL_CLASS = NUM_CLASSES means "unconditional".

Run:  python toy/velocity_field.py            (about a minute on a 2-core CPU, PNGs in toy/out/)
      python toy/velocity_field.py --size small   (a few seconds, for tests)
Needs matplotlib for the pictures: pip install -e ".[toy]"  (or: pip install matplotlib).
"""

import argparse
import math
import os
import time
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
from tqdm import tqdm

NUM_CLASSES = 2  # two semantic classes, drawn green and blue as in Fig. 4b
NULL_CLASS = NUM_CLASSES  # class id meaning "no condition" (the unconditional field)
LAYOUTS = ("entangled", "separated")  # Fig. 4b left and right
GEOMETRIES = ("clusters", "ring")  # where the modes sit (see make_target)
CLASS_COLORS = ("tab:green", "tab:blue")
EULER_STEPS = (1, 2, 5, 10, 25)  # step counts in the error table
ERROR_TARGET = 0.05  # energy distance counted as "good enough" in the printed summary
REFERENCE_STEPS = 100  # "many steps" in the pictures: close to the exact ODE solution
MATPLOTLIB_HINT = 'the toy pictures need matplotlib: pip install -e ".[toy]"  (or: pip install matplotlib)'


@dataclass(frozen=True)
class ToyConfig:
    """All knobs of the toy experiment; SIZES holds the full run and the small test run."""

    geometry: str = "clusters"  # where the modes sit: "clusters" or "ring" (see make_target)
    num_modes: int = 8  # Gaussian modes, split evenly between the classes
    radius: float = 4.0  # cluster-centre distance / ring radius (the source N(0, I) sits at the origin)
    cluster_radius: float = 1.5  # radius of the small circle the modes of one cluster sit on
    sigma: float = 0.4  # per-mode standard deviation, the same for every mode and layout
    num_eval: int = 4000  # samples (both classes pooled) for the metrics; a multiple of num_modes
    cosine_times: tuple = (0.9, 0.6, 0.3)  # t at which velocity consistency is measured
    train_steps: int = 800  # flow-matching steps of the velocity MLP
    batch_size: int = 512
    lr: float = 2e-3
    hidden: int = 128  # MLP width
    num_train: int = 8192  # size of the fixed training set drawn from the target
    label_dropout: float = 0.1  # fraction of training labels replaced by NULL_CLASS
    seed: int = 0


SIZES = {
    "full": ToyConfig(),
    "small": ToyConfig(num_eval=320, train_steps=60, batch_size=128, num_train=1024, cosine_times=(0.9, 0.3)),
}


# ----------------------------------------------------------------------------------
# Target: a two-class Gaussian mixture on a ring, entangled or separated
# ----------------------------------------------------------------------------------


@dataclass
class GaussianMixture:
    """The target p_0(x_0 | class): equal-weight isotropic Gaussian modes, each owned by one class."""

    means: torch.Tensor  # [K, 2] mode centres mu_k
    sigma: float  # shared standard deviation s
    labels: torch.Tensor  # [K] long, the class that owns mode k


def make_target(layout, geometry="clusters", num_modes=8, radius=4.0, cluster_radius=1.5, sigma=0.4):
    """The target's modes and which class owns each, for a layout and a geometry.

    geometry "clusters": two clusters of num_modes / 2 modes each (on a small circle of radius
        cluster_radius around (-radius, 0) and (+radius, 0)). "separated": each class is one
        cluster (compact and apart, like classes in DINO features, Fig. 4a); "entangled": the
        classes alternate inside each cluster, so every class is split over both clusters.
    geometry "ring": num_modes modes evenly on a circle of the given radius. "separated": each
        class owns one half of the ring (its own region, but a wide arc, not a compact one);
        "entangled": the classes alternate around the ring.
    Either way both layouts have identical modes (the same data distribution): only the labels move.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {LAYOUTS}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}: choose one of {GEOMETRIES}")
    if num_modes < 2 * NUM_CLASSES or num_modes % (2 * NUM_CLASSES):
        raise ValueError(f"num_modes={num_modes} must be a positive multiple of {2 * NUM_CLASSES} "
                         f"(an even number of modes per class)")
    k = torch.arange(num_modes)
    half = num_modes // NUM_CLASSES  # modes per class
    if geometry == "ring":
        angle = 2 * math.pi * (k + 0.5) / num_modes  # half-step offset: the separated halves are top and bottom
        means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # [K, 2]
        group, position = k // half, k  # contiguous arcs; alternation around the whole ring
    else:
        group, position = k // half, k % half  # cluster of mode k; its place in the cluster
        angle = 2 * math.pi * position / half
        centre = torch.stack([radius * (2 * group - 1).float(), torch.zeros(num_modes)], dim=1)  # [K, 2]
        means = centre + cluster_radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # [K, 2]
    labels = group if layout == "separated" else position % NUM_CLASSES
    return GaussianMixture(means=means, sigma=sigma, labels=labels)


def sample_target(gm, y, generator=None):
    """Draw x_0 ~ p_0(x_0 | y) for each label in y [B] (NULL_CLASS: from the whole mixture) -> [B, 2]."""
    allowed = component_mask(gm, y)  # [B, K]
    k = torch.multinomial(allowed.float(), 1, generator=generator).squeeze(1)  # [B] equal-weight modes
    noise = torch.randn(len(y), 2, generator=generator)  # [B, 2]
    return gm.means[k] + gm.sigma * noise


def component_mask(gm, y):
    """Which modes each label may come from: [B, K] bool (all of them for NULL_CLASS)."""
    if y.dtype != torch.long or y.dim() != 1:
        raise ValueError(f"labels must be a 1-D long tensor, got dtype {y.dtype} and shape {tuple(y.shape)}")
    if ((y < 0) | (y > NULL_CLASS)).any():
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1} or NULL_CLASS={NULL_CLASS}, got {y.unique().tolist()}")
    return (gm.labels[None, :] == y[:, None]) | (y[:, None] == NULL_CLASS)  # [B, K]


def nearest_class(gm, x):
    """The class of the nearest mode centre for each point x [B, 2] -> [B] ("which class's region")."""
    return gm.labels[torch.cdist(x, gm.means).argmin(dim=1)]


# ----------------------------------------------------------------------------------
# The exact mean velocity field of the flow (Eq. 3-4) for a Gaussian-mixture target
# ----------------------------------------------------------------------------------


def mean_velocity(gm, x_t, t, y):
    """Exact E[v | x_t, y] = E[eps - x_0 | x_t, y] for the Gaussian-mixture target, in closed form.

    x_t [B, 2], t [B] in [0, 1], y [B] long (NULL_CLASS for the unconditional field) -> [B, 2].

    Write a = 1 - t. Given mode k, x_0 ~ N(mu_k, s^2 I) and eps ~ N(0, I) are independent, so
    (x_0, eps, x_t = a x_0 + t eps) is jointly Gaussian (Eq. 3) with
        x_t | k       ~ N(a mu_k, c_t I),          c_t = a^2 s^2 + t^2,
        Cov(x_0, x_t) = a s^2 I,                   Cov(eps, x_t) = t I.
    Gaussian conditioning gives
        E[x_0 | x_t, k] = mu_k + (a s^2 / c_t) (x_t - a mu_k),
        E[eps | x_t, k] = (t / c_t) (x_t - a mu_k),
    hence, with v = eps - x_0 (Eq. 4),
        m_k(x_t, t) = E[v | x_t, k] = ((t - a s^2) / c_t) (x_t - a mu_k) - mu_k.
    The field averages these per-mode velocities over the posterior of the mode,
        w_k(x_t, t, y) = pi_k N(x_t; a mu_k, c_t I) / sum_j pi_j N(x_t; a mu_j, c_t I),
    where the sum runs over the modes of class y only (all modes for the unconditional field)
    and the equal weights pi_k and the common normaliser (2 pi c_t)^-1 cancel:
        v*(x_t, t | y) = sum_k w_k(x_t, t, y) m_k(x_t, t).
    Checks: at t = 1, v* = x_t - E[x_0 | y] (one Euler step lands on the class mean); at t = 0,
    v* = -x_t (the noise is independent of the data).
    """
    t = t.reshape(-1, 1, 1).to(x_t)  # [B, 1, 1]
    a = 1 - t  # alpha_t of Eq. (1) for the flow of Eq. (3)
    c_t = a**2 * gm.sigma**2 + t**2  # [B, 1, 1] variance of x_t given the mode
    diff = x_t[:, None, :] - a * gm.means[None]  # [B, K, 2] x_t - a mu_k
    log_w = -0.5 * diff.pow(2).sum(-1) / c_t[:, :, 0]  # [B, K] log N(x_t; a mu_k, c_t I) + const
    log_w = log_w.masked_fill(~component_mask(gm, y), -math.inf)
    w = torch.softmax(log_w, dim=1)  # [B, K] posterior over the modes of class y
    m = (t - a * gm.sigma**2) / c_t * diff - gm.means[None]  # [B, K, 2] per-mode E[eps - x_0 | x_t, k]
    return (w[..., None] * m).sum(dim=1)  # [B, 2]


def exact_field(gm):
    """The closed-form field as a velocity model field(x_t, t, y) -> v, like the MLP below."""
    return partial(mean_velocity, gm)


def forward_process(x_0, t, generator=None):
    """Eq. (3): x_t = (1 - t) x_0 + t eps with eps ~ N(0, I); x_0 [B, 2], t [B] -> (x_t, eps)."""
    eps = torch.randn(x_0.shape, generator=generator)  # [B, 2]
    t = t[:, None]  # [B, 1]
    return (1 - t) * x_0 + t * eps, eps


@torch.no_grad()
def euler_sample(field, noise, y, steps, return_trajectory=False):
    """Integrate the probability-flow ODE dx_t/dt = v (Eq. 4) from t = 1 to t = 0 in `steps` uniform Euler steps.

    field(x_t [B, 2], t [B], y [B]) -> v [B, 2]; noise [B, 2] is x_1. Returns x_0 [B, 2], or the
    trajectory [steps + 1, B, 2] (x_1 first) when return_trajectory is set.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    ts = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    trajectory = [x]
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = field(x, t_cur.expand(len(x)), y)  # [B, 2]
        x = x + (t_next - t_cur) * v  # Euler step; t_next - t_cur < 0, so x moves along -v
        trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


# ----------------------------------------------------------------------------------
# What training learns: a small velocity MLP trained by flow matching (Eq. 5)
# ----------------------------------------------------------------------------------


class VelocityMLP(nn.Module):
    """The velocity network v_theta(x_t, t, y) of Eq. (5), as a small MLP with a class embedding."""

    def __init__(self, hidden=128, num_freqs=8, class_dim=32):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs).float(), persistent=False)
        self.class_embed = nn.Embedding(NUM_CLASSES + 1, class_dim)  # row NULL_CLASS = unconditional
        in_dim = 2 + 2 * num_freqs + class_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x_t, t, y):
        angle = t[:, None] * self.freqs  # [B, F]
        h = torch.cat([x_t, torch.sin(angle), torch.cos(angle), self.class_embed(y)], dim=1)  # [B, 2 + 2F + E]
        return self.net(h)  # [B, 2]


def flow_matching_loss(model, x_0, y, generator=None):
    """Eq. (5) with lambda(t) = 1 and uniform t: mean || v_theta(x_t, t, y) - (eps - x_0) ||^2."""
    t = torch.rand(len(x_0), generator=generator)  # [B]
    x_t, eps = forward_process(x_0, t, generator)
    return (model(x_t, t, y) - (eps - x_0)).pow(2).sum(dim=1).mean()  # Eq. (4): v = eps - x_0


def train_velocity_mlp(gm, cfg, desc="train"):
    """Fit a VelocityMLP to a fixed training set drawn from gm, with label dropout to NULL_CLASS."""
    g = torch.Generator().manual_seed(cfg.seed)
    y_data = torch.arange(cfg.num_train) % NUM_CLASSES  # [N] balanced classes
    x_data = sample_target(gm, y_data, g)  # [N, 2] the "dataset"
    torch.manual_seed(cfg.seed)
    model = VelocityMLP(cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)
    losses = []
    for _ in tqdm(range(cfg.train_steps), desc=desc, leave=False):
        idx = torch.randint(cfg.num_train, (cfg.batch_size,), generator=g)  # [B]
        y = y_data[idx].masked_fill(torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout, NULL_CLASS)
        loss = flow_matching_loss(model, x_data[idx], y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


def field_error(field, gm, t_min=0.2, n=2000, seed=1):
    """Relative squared error of a field against the exact one, on x_t ~ p_t(x | y) with t ~ U(t_min, 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES  # [n]
    t = t_min + (1 - t_min) * torch.rand(n, generator=g)  # [n]
    x_t, _ = forward_process(sample_target(gm, y, g), t, g)  # [n, 2]
    with torch.no_grad():
        v_star = mean_velocity(gm, x_t, t, y)  # [n, 2]
        return ((field(x_t, t, y) - v_star).pow(2).sum(1).mean() / v_star.pow(2).sum(1).mean()).item()


# ----------------------------------------------------------------------------------
# Metrics: velocity consistency, energy distance, landing in the right class
# ----------------------------------------------------------------------------------


def mean_pairwise_cosine(a, b=None):
    """Mean cosine similarity over all pairs (a_i, a_j), i != j, or over all pairs (a_i, b_j) when b is given."""
    u = torch.nn.functional.normalize(a, dim=1)  # [n, D] unit directions
    s = u.sum(dim=0)  # [D]
    if b is None:
        n = len(u)
        if n < 2:
            raise ValueError("mean_pairwise_cosine needs at least 2 vectors")
        return ((s @ s - n) / (n * (n - 1))).item()  # sum_{i != j} u_i.u_j = |sum u|^2 - n
    w = torch.nn.functional.normalize(b, dim=1)  # [m, D]
    return (s @ w.sum(dim=0) / (len(u) * len(w))).item()


def pointwise_cosine(a, b):
    """Mean cosine similarity between a_i and b_i (two fields evaluated at the same points)."""
    return torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()


def velocity_consistency(gm, t, n, seed=0):
    """Fig. 4b in numbers at time t, for the exact class-conditional field v*(x_t, t | y).

    within: mean cosine between velocities of two points of the same class (x_t ~ p_t(x | y),
            which is also where that class's ODE trajectories are at time t);
    across: mean cosine between a class-0 point's velocity and a class-1 point's velocity;
    same_point: mean cosine between v*(x | 0) and v*(x | 1) at the same x ~ p_t(x)
            (1 = the class label does not change the direction, as when classes entangle).
    """
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((n,), float(t))
    v = []
    for c in range(NUM_CLASSES):
        y = torch.full((n,), c)
        x_t, _ = forward_process(sample_target(gm, y, g), tt, g)  # [n, 2]
        v.append(mean_velocity(gm, x_t, tt, y))  # [n, 2]
    x_t, _ = forward_process(sample_target(gm, torch.full((n,), NULL_CLASS), g), tt, g)  # [n, 2] marginal
    v0, v1 = (mean_velocity(gm, x_t, tt, torch.full((n,), c)) for c in range(NUM_CLASSES))
    return {
        "within": sum(mean_pairwise_cosine(vc) for vc in v) / NUM_CLASSES,
        "across": mean_pairwise_cosine(v[0], v[1]),
        "same_point": pointwise_cosine(v0, v1),
    }


def energy_distance(a, b):
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between point sets a [n, D] and b [m, D] (V-statistic).

    Zero for identical sets, 2 |delta| between two point masses delta apart; as a squared-distance-
    like quantity it is insensitive to the small random mode-count differences of finite samples.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"energy_distance needs two [n, D] point sets with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def class_accuracy(gm, x, y):
    """Fraction of samples x [n, 2] whose nearest mode belongs to the class they were sampled for."""
    return (nearest_class(gm, x) == y).float().mean().item()


def stratified_data(gm, n, generator=None):
    """n data points with exactly n / K from every mode (the reference set; less sampling noise than iid)."""
    K = len(gm.means)
    if n % K:
        raise ValueError(f"the number of evaluation samples ({n}) must be a multiple of the number of modes ({K})")
    noise = torch.randn(n, 2, generator=generator)  # [n, 2]
    return gm.means.repeat(n // K, 1) + gm.sigma * noise


def sampling_errors(field, gm, n, steps_list=EULER_STEPS, conditional=True, seed=0):
    """Few-step Euler samples for n class-balanced labels, pooled, against the data distribution.

    Pooling the classes (as FID does for class-conditional ImageNet) compares both layouts with
    the same target, since they share one data distribution. conditional=False samples with
    NULL_CLASS (the unconditional field, a control). Returns {steps: {"ed": energy distance to
    a mode-stratified data set, "acc": fraction in the requested class's region}} and the floor:
    the energy distance of n iid data samples to that set (what a perfect sampler would score).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES  # [n] balanced labels
    noise = torch.randn(n, 2, generator=g)  # [n, 2] x_1 ~ N(0, I)
    data = stratified_data(gm, n, g)  # [n, 2]
    floor = energy_distance(sample_target(gm, torch.full_like(y, NULL_CLASS), g), data)
    y_in = y if conditional else torch.full_like(y, NULL_CLASS)
    out = {}
    for s in steps_list:
        x_0 = euler_sample(field, noise, y_in, s)  # [n, 2]
        out[s] = {"ed": energy_distance(x_0, data), "acc": class_accuracy(gm, x_0, y) if conditional else None}
    return out, floor


# ----------------------------------------------------------------------------------
# The experiment for one layout, and the printed tables
# ----------------------------------------------------------------------------------


def run_layout(layout, cfg, progress=""):
    """Everything measured for one layout: target, consistency, trained MLP, sampling errors."""
    gm = make_target(layout, cfg.geometry, cfg.num_modes, cfg.radius, cfg.cluster_radius, cfg.sigma)
    consistency = {t: velocity_consistency(gm, t, cfg.num_eval, cfg.seed) for t in cfg.cosine_times}
    model, losses = train_velocity_mlp(gm, cfg, desc=f"{progress}train {layout}")
    errors = {
        "exact": sampling_errors(exact_field(gm), gm, cfg.num_eval, seed=cfg.seed),
        "learned": sampling_errors(model, gm, cfg.num_eval, seed=cfg.seed),
        "exact uncond": sampling_errors(exact_field(gm), gm, cfg.num_eval, conditional=False, seed=cfg.seed),
    }
    return {"gm": gm, "model": model, "losses": losses, "consistency": consistency, "errors": errors,
            "field_error": field_error(model, gm)}


def steps_to_reach(errors, threshold):
    """Fewest steps in the table whose energy distance is at or below threshold (None if none)."""
    return next((s for s, e in errors.items() if e["ed"] <= threshold), None)


def format_report(results):
    """The printed tables: consistency per t, energy distance and class accuracy per step count, a summary."""
    lines = ["Velocity direction consistency of the exact class-conditional field (mean cosine, Fig. 4b):",
             f"{'layout':<10} {'t':>4} {'within class':>13} {'across classes':>15} {'same point':>11}"]
    for layout, r in results.items():
        for t, c in r["consistency"].items():
            lines.append(f"{layout:<10} {t:>4.1f} {c['within']:>13.3f} {c['across']:>15.3f} {c['same_point']:>11.3f}")
    steps = list(next(iter(results.values()))["errors"]["exact"][0])
    head = "".join(f"{s:>7}" for s in steps)
    lines += ["", "Euler sampling, class-balanced labels, both classes pooled: energy distance to the data (lower is "
              "better; floor = iid data) | % landing in the requested class's region:",
              f"{'layout':<10} {'field':<13}{head}  |{head}  | floor"]
    for layout, r in results.items():
        for name, (err, floor) in r["errors"].items():
            ed = "".join(f"{err[s]['ed']:>7.3f}" for s in steps)
            acc = "".join(f"{'-':>7}" if err[s]["acc"] is None else f"{100 * err[s]['acc']:>7.1f}" for s in steps)
            lines.append(f"{layout:<10} {name:<13}{ed}  |{acc}  | {floor:.3f}")
    lines += ["", "Learned field vs exact (relative squared error on x_t, t in [0.2, 1]); final training loss:"]
    for layout, r in results.items():
        tail = r["losses"][-50:]
        lines.append(f"{layout:<10} rel. error {r['field_error']:.3f}   loss {sum(tail) / len(tail):.3f}")
    one_step = next(iter(results.values()))["errors"]["exact uncond"][0][steps[0]]["ed"]
    lines += ["", f"Steps needed for energy distance <= {ERROR_TARGET} "
                  f"({100 * ERROR_TARGET / one_step:.1f}% of the {steps[0]}-step unconditional error):"]
    for name in ("exact", "learned"):
        need = {layout: steps_to_reach(r["errors"][name][0], ERROR_TARGET) for layout, r in results.items()}
        lines.append(f"  {name:<8} field: " + ", ".join(f"{layout} {'>' + str(steps[-1]) if k is None else k}"
                                                         for layout, k in need.items()))
    return "\n".join(lines)


def verdict(results):
    """One honest line per field: did the separated layout have the lower error at every step count?"""
    lines = []
    for name in ("exact", "learned"):
        sep, ent = (results[layout]["errors"][name][0] for layout in ("separated", "entangled"))
        ed_wins = [s for s in sep if sep[s]["ed"] < ent[s]["ed"]]
        acc_wins = [s for s in sep if sep[s]["acc"] >= ent[s]["acc"]]
        if len(ed_wins) == len(sep) and len(acc_wins) == len(sep):
            lines.append(f"{name} field: separated has the lower energy distance and lands in the right class at least as "
                         f"often at every step count: fewer steps for the same error, as Sec. 3.2 argues.")
        else:
            lines.append(f"{name} field: separated is NOT better at every step count (lower energy distance at steps "
                         f"{ed_wins}, at least as accurate at steps {acc_wins}): the claim of Sec. 3.2 does not "
                         f"fully hold in this run; see the notebook for why.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Pictures (matplotlib is an optional extra)
# ----------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(MATPLOTLIB_HINT) from e
    return plt


def _scatter_target(ax, gm, n, g, size=2):
    """Source N(0, I) in black, class targets in green and blue (Fig. 4b's dots)."""
    ax.scatter(*torch.randn(n, 2, generator=g).T, s=size, c="k", alpha=0.3, lw=0)
    for c in range(NUM_CLASSES):
        ax.scatter(*sample_target(gm, torch.full((n,), c), g).T, s=size, c=CLASS_COLORS[c], alpha=0.3, lw=0)


def _square(ax, lim):
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_fields(results, times=(0.9, 0.6, 0.3), grid=15, n_dots=400):
    """Fig. 4b: arrows of the sampling direction -v*(x, t | y) (unit length) for both classes on one grid."""
    plt = pyplot()
    fig, axes = plt.subplots(len(results), len(times), figsize=(4 * len(times), 4 * len(results)), squeeze=False)
    lim = next(iter(results.values()))["gm"].means.abs().max().item() + 1.5
    xs = torch.linspace(-lim + 0.5, lim - 0.5, grid)
    x = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1).reshape(-1, 2)  # [G*G, 2]
    for row, (layout, r) in enumerate(results.items()):
        gm = r["gm"]
        for col, t in enumerate(times):
            ax = axes[row, col]
            _scatter_target(ax, gm, n_dots, torch.Generator().manual_seed(0))
            for c in range(NUM_CLASSES):
                v = mean_velocity(gm, x, torch.full((len(x),), t), torch.full((len(x),), c))  # [G*G, 2]
                d = -torch.nn.functional.normalize(v, dim=1)  # sampling moves along -v (t decreases)
                ax.quiver(*x.T, *d.T, color=CLASS_COLORS[c], alpha=0.8, angles="xy", scale_units="xy", scale=2.5, width=0.004)
            _square(ax, lim)
            ax.set_title(f"{layout}, t = {t}")
    fig.suptitle("Mean sampling direction -v*(x_t, t | class) (Eq. 3-4), green = class 0, blue = class 1")
    fig.tight_layout()
    return fig


def plot_trajectories(results, n=12, steps=REFERENCE_STEPS):
    """ODE trajectories of the exact field from the same noise for both classes, plus 2-step Euler paths."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 5), squeeze=False)
    lim = next(iter(results.values()))["gm"].means.abs().max().item() + 1.5
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))  # [n, 2]
    for ax, (layout, r) in zip(axes[0], results.items()):
        gm = r["gm"]
        _scatter_target(ax, gm, 400, torch.Generator().manual_seed(0))
        for c in range(NUM_CLASSES):
            y = torch.full((n,), c)
            path = euler_sample(exact_field(gm), noise, y, steps, return_trajectory=True)  # [S+1, n, 2]
            ax.plot(path[:, :, 0], path[:, :, 1], color=CLASS_COLORS[c], lw=0.8)
            few = euler_sample(exact_field(gm), noise, y, 2, return_trajectory=True)  # [3, n, 2]
            ax.plot(few[:, :, 0], few[:, :, 1], color=CLASS_COLORS[c], lw=0.8, ls=":", marker=".", ms=3)
        ax.scatter(*noise.T, c="k", s=8, zorder=3)
        _square(ax, lim)
        ax.set_title(f"{layout}: {steps}-step ODE (solid) vs 2 Euler steps (dotted)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_samples(results, steps_list=(1, 2, 5), n=300):
    """Few-step next to many-step samples, exact and learned field, both classes (colour = requested class)."""
    plt = pyplot()
    rows = [(layout, name) for layout in results for name in ("exact", "learned")]
    fig, axes = plt.subplots(len(rows), len(steps_list) + 1, figsize=(3 * (len(steps_list) + 1), 3 * len(rows)), squeeze=False)
    lim = next(iter(results.values()))["gm"].means.abs().max().item() + 1.5
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))  # [n, 2]
    for row, (layout, name) in enumerate(rows):
        gm = results[layout]["gm"]
        field = exact_field(gm) if name == "exact" else results[layout]["model"]
        for col, s in enumerate(list(steps_list) + [REFERENCE_STEPS]):
            ax = axes[row, col]
            for c in range(NUM_CLASSES):
                x_0 = euler_sample(field, noise, torch.full((n,), c), s)
                ax.scatter(*x_0.T, s=2, c=CLASS_COLORS[c], alpha=0.5, lw=0)
            ax.scatter(*gm.means.T, marker="x", c=[CLASS_COLORS[c] for c in gm.labels], s=30)
            _square(ax, lim)
            ax.set_title(f"{layout}, {name}, {s} step{'s' * (s > 1)}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_errors(results):
    """Energy distance and right-class fraction vs Euler steps, per layout, exact (solid) and learned (dashed)."""
    plt = pyplot()
    fig, (ax_ed, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for layout, color in zip(results, ("tab:red", "tab:purple")):
        for name, ls in (("exact", "-"), ("learned", "--")):
            err, floor = results[layout]["errors"][name]
            steps = list(err)
            ax_ed.plot(steps, [err[s]["ed"] for s in steps], ls, color=color, marker="o", label=f"{layout}, {name}")
            ax_acc.plot(steps, [100 * err[s]["acc"] for s in steps], ls, color=color, marker="o", label=f"{layout}, {name}")
            if name == "exact":
                ax_ed.axhline(floor, color=color, lw=0.8, ls=":")
    ax_ed.set(xscale="log", yscale="log", xlabel="Euler steps", ylabel="energy distance to the data",
              title="sampling error (dotted: floor, iid data)")
    ax_acc.set(xscale="log", xlabel="Euler steps", ylabel="% in the requested class's region", title="landing in the right class")
    for ax in (ax_ed, ax_acc):
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PLOTS = {"fields.png": plot_fields, "trajectories.png": plot_trajectories,
         "samples.png": plot_samples, "errors.png": plot_errors}


# ----------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: about a minute; small: seconds")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                        help="folder for the PNGs (default: toy/out)")
    parser.add_argument("--geometry", choices=GEOMETRIES, default="clusters",
                        help="clusters: separated classes are compact (default); ring: separated classes are half-rings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = replace(SIZES[args.size], geometry=args.geometry, seed=args.seed)

    plt = pyplot()  # fail before the work if the pictures cannot be drawn
    torch.set_num_threads(1)  # these tensors are tiny: one thread is fastest, and much faster on a busy machine
    plt.switch_backend("Agg")
    os.makedirs(args.out, exist_ok=True)

    start = time.time()
    results = {layout: run_layout(layout, cfg, progress=f"[{i + 1}/{len(LAYOUTS)}] ") for i, layout in enumerate(LAYOUTS)}
    print(format_report(results))
    print(verdict(results))

    for name, plot in PLOTS.items():
        fig = plot(results)
        fig.savefig(os.path.join(args.out, name), dpi=110)
        plt.close(fig)
    print(f"wrote {', '.join(PLOTS)} to {args.out}; {args.size} run, {args.geometry} geometry, "
          f"{time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
