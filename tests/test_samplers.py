"""Samplers (App. A), editing (App. C) and interpolation (App. D) on closed-form fields.

The analytic case: data x_0 ~ N(mu, s^2 I) and the linear path x_t = (1 - t) x_0 + t eps
(Eq. 3). x_t and v = eps - x_0 (Eq. 4) are jointly Gaussian with
    E[x_t] = (1 - t) mu,  Var[x_t] = sigma_t^2 = (1 - t)^2 s^2 + t^2,
    E[v] = -mu,           Cov[v, x_t] = t - (1 - t) s^2,
so the flow-matching optimum is the affine field
    v*(x, t) = E[v | x_t = x] = -mu + (t - (1 - t) s^2) / sigma_t^2 * (x - (1 - t) mu).
Its ODE keeps z = (x_t - (1 - t) mu) / sigma_t constant (d sigma_t / dt equals the
coefficient times sigma_t), so the exact flow map is x_0 = mu + s z, and from t = 1
(sigma_1 = 1): x_0 = mu + s x_1.
"""

import math

import pytest
import torch

import svg

S = 0.5  # data std


def gaussian_velocity(x, t, mu):
    """v*(x, t) for N(mu, S^2 I) data; t [B], mu broadcastable to x."""
    t = t.view(-1, *([1] * (x.dim() - 1)))  # [B, 1, ...]
    var = (1 - t) ** 2 * S**2 + t**2
    return -mu + (t - (1 - t) * S**2) / var * (x - (1 - t) * mu)


class ClassGaussians:
    """Velocity model whose class y has data N(MU[y], S^2 I); row NUM = the null class."""

    def __init__(self, num_classes=3, shape=(4, 2, 2), dtype=torch.float64):
        g = torch.Generator().manual_seed(1)
        self.mu = torch.randn(num_classes + 1, *shape, generator=g, dtype=dtype)  # [K + 1, C, h, w]
        self.null = num_classes
        self.calls = []  # (t, batch) per forward

    def __call__(self, x, t, y):
        assert t.shape == y.shape == (x.shape[0],)
        self.calls.append((float(t[0]), x.shape[0]))
        return gaussian_velocity(x, t, self.mu[y])


def euler_endpoint_error(method, steps, shift):
    m = ClassGaussians()
    x1 = torch.randn(16, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(16) % 3
    x0 = svg.sample_ode(m, x1, y, steps, shift=shift, method=method, null_class=m.null)
    exact = m.mu[y] + S * x1  # exact flow map from t = 1
    return (x0 - exact).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, svg.SAMPLE_TIME_SHIFT])
def test_euler_first_order_and_exact_in_the_limit(shift):
    errs = [euler_endpoint_error("euler", n, shift) for n in (64, 128, 256, 512)]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), (errs, ratios)  # error halves when steps double
    assert euler_endpoint_error("euler", 8192, shift) < errs[0] / 100  # -> the exact flow map


@pytest.mark.parametrize("method", ["heun", "heun-edm"])
@pytest.mark.parametrize("shift", [1.0, svg.SAMPLE_TIME_SHIFT])
def test_heun_second_order(shift, method):
    errs = [euler_endpoint_error(method, n, shift) for n in (32, 64, 128, 256)]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    hi = 5.2 if method == "heun" else 4.5  # with the last correction the ratio nears 4 from above (4.97, 4.70, 4.42)
    assert all(3.5 < r < hi for r in ratios), (errs, ratios)
    assert errs[-1] < euler_endpoint_error("euler", 256, shift) / 10


def test_nfe_euler_heun_and_trajectory():
    m = ClassGaussians()
    x1, y = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    traj = svg.sample_ode(m, x1, y, 5, null_class=m.null, return_trajectory=True)
    assert len(m.calls) == 5  # NFE = steps (App. A)
    assert traj.shape == (6, 2, 4, 2, 2) and torch.equal(traj[0], x1)
    assert [t for t, _ in m.calls] == pytest.approx(svg.ode_time_grid(5)[:-1])
    m.calls.clear()
    svg.sample_ode(m, x1, y, 5, method="heun", null_class=m.null)
    assert len(m.calls) == 2 * 5  # official: a correction on every step, the one into t = 0 included
    m.calls.clear()
    svg.sample_ode(m, x1, y, 5, method="heun-edm", null_class=m.null)
    assert len(m.calls) == 2 * 5 - 1  # EDM: no correction on the final step into t = 0


def test_heun_is_the_official_research_sampler():
    """The official Heun (rectified_flow research tree, time reversed: t = 1 noise here): predictor
    x' = x + dt v(x, t), corrector x + dt (v(x, t) + v(x', t')) / 2 on every step."""
    m = ClassGaussians()
    x1, y = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2])
    ts = svg.ode_time_grid(10)
    x = x1
    for t, t_next in zip(ts, ts[1:]):
        v = gaussian_velocity(x, torch.full((3,), t, dtype=x.dtype), m.mu[y])
        pred = x - (t - t_next) * v
        v2 = gaussian_velocity(pred, torch.full((3,), t_next, dtype=x.dtype), m.mu[y])
        x = x - (t - t_next) * 0.5 * (v + v2)
    out = svg.sample_ode(m, x1, y, 10, method="heun", null_class=m.null)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    edm = svg.sample_ode(m, x1, y, 10, method="heun-edm", null_class=m.null)
    assert (out - edm).abs().max() > 1e-3  # the skipped last correction matters at 10 steps


def test_time_grid_shift_and_t_start():
    a = svg.SAMPLE_TIME_SHIFT
    ts = svg.ode_time_grid(10, a)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and all(p > q for p, q in zip(ts, ts[1:]))
    u = [1 - i / 10 for i in range(11)]
    assert ts == pytest.approx([a * v / (1 + (a - 1) * v) for v in u])
    # Starting at an interior grid time with fewer steps gives the tail of the same grid.
    assert svg.ode_time_grid(7, a, t_start=ts[3]) == pytest.approx(ts[3:], abs=1e-12)
    assert svg.ode_time_grid(4, 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_cfg_scale_one_is_conditional_model_without_unconditional_pass():
    m = ClassGaussians()
    x1, y = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2])
    out = svg.sample_ode(m, x1, y, 6, cfg_scale=1.0, null_class=m.null)
    assert all(b == 3 for _, b in m.calls)  # no doubled batch
    x, ts = x1, svg.ode_time_grid(6)  # reference Euler on the conditional field
    for t, t_next in zip(ts, ts[1:]):
        x = x - (t - t_next) * gaussian_velocity(x, torch.full((3,), t, dtype=x.dtype), m.mu[y])
    assert torch.equal(out, x)


def guided_reference(m, w, inside):
    """v_u + w (v_c - v_u) from two separate passes, on every channel, where inside(t)."""

    def model(x, t, y):
        v_c = gaussian_velocity(x, t, m.mu[y])
        v_u = gaussian_velocity(x, t, m.mu[torch.full_like(y, m.null)])
        return v_u + w * (v_c - v_u) if inside(float(t[0])) else v_c

    return model


def test_cfg_constant_all_channels_one_batched_pass():
    m = ClassGaussians()
    x1, y = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2])
    out = svg.sample_ode(m, x1, y, 6, cfg_scale=2.5, null_class=m.null)
    assert [b for _, b in m.calls] == [6] * 6  # conditional + unconditional in one forward
    ref = svg.sample_ode(guided_reference(m, 2.5, lambda t: True), x1, y, 6, null_class=m.null)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    plain = svg.sample_ode(m, x1, y, 6, null_class=m.null)
    assert ((out - plain).abs() > 1e-6).all()  # every channel of every cell is guided


def test_cfg_interval_guides_only_inside():
    m = ClassGaussians()
    x1, y = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([2, 0])
    lo, hi = 0.3, 0.9
    out = svg.sample_ode(m, x1, y, 10, method="heun", cfg_scale=3.0, cfg_mode="interval",
                         cfg_interval=(lo, hi), null_class=m.null)
    for t, b in m.calls:
        assert b == (4 if lo <= t <= hi else 2), (t, b)  # unconditional pass skipped outside
    assert {b for _, b in m.calls} == {2, 4}
    ref = svg.sample_ode(guided_reference(m, 3.0, lambda t: lo <= t <= hi), x1, y, 10,
                         method="heun", null_class=m.null)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_zero_init_skips_only_the_first_step():
    m = ClassGaussians()
    x1, y = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([1, 2])
    steps, w = 8, 1.5
    traj = svg.sample_ode(m, x1, y, steps, cfg_scale=w, zero_init_steps=1, null_class=m.null,
                          return_trajectory=True)
    assert len(m.calls) == steps - 1  # the zero-init step runs no network
    t1 = svg.ode_time_grid(steps)[1]
    assert m.calls[0][0] == pytest.approx(t1)
    assert torch.equal(traj[1], x1)  # v = 0 on step 1: x_{t_1} is still the noise
    # After step 1 it is exactly a run that starts from the same x at t_1.
    rest = svg.sample_ode(m, x1, y, steps - 1, cfg_scale=w, t_start=t1, null_class=m.null,
                          return_trajectory=True)
    torch.testing.assert_close(traj[1:], rest, rtol=0, atol=1e-12)
    no_zero = svg.sample_ode(m, x1, y, steps, cfg_scale=w, null_class=m.null)
    assert not torch.allclose(no_zero, traj[-1])


def test_inversion_is_first_order_and_round_trips():
    m = ClassGaussians()
    y = torch.tensor([0, 1, 2, 0])
    x0 = m.mu[y] + S * torch.randn(4, 4, 2, 2, dtype=torch.float64)
    exact = (x0 - m.mu[y]) / S  # z at t = 1
    errs = [(svg.invert_ode(m, x0, y, n, null_class=m.null) - exact).abs().max().item()
            for n in (64, 128, 256)]
    assert all(1.8 < a / b < 2.2 for a, b in zip(errs, errs[1:])), errs
    traj = svg.invert_ode(m, x0, y, 400, t_end=0.6, null_class=m.null, return_trajectory=True)
    assert torch.equal(traj[-1], x0)  # ordered like sample_ode: t_end first, t = 0 last
    t_edit = 0.6  # exact state at t_edit keeps z: x_t = (1 - t) mu + sigma_t z
    sig = math.sqrt((1 - t_edit) ** 2 * S**2 + t_edit**2)
    torch.testing.assert_close(traj[0], (1 - t_edit) * m.mu[y] + sig * exact, rtol=0, atol=1e-2)
    back = svg.sample_ode(m, traj[0], y, 400, t_start=0.6, null_class=m.null)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-2)


def test_lerp_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 3, 4, 4, generator=g).unbind(0)
    for f in (svg.lerp, svg.slerp):
        assert torch.equal(f(x0, x1, 0.0), x0) and torch.equal(f(x0, x1, 1.0), x1)
    a = torch.zeros(8)
    b = torch.zeros(8)
    a[0], b[1] = 3.0, 3.0  # equal norms, orthogonal
    for lam in (0.1, 0.37, 0.5, 0.9):
        assert svg.slerp(a, b, lam).norm().item() == pytest.approx(3.0, rel=1e-6)
    assert svg.lerp(a, b, 0.5).norm().item() == pytest.approx(3.0 / math.sqrt(2), rel=1e-6)
    # Eq. (8) at theta = 90 degrees is cos / sin weights.
    expected = math.cos(math.pi / 6) * a + math.sin(math.pi / 6) * b
    torch.testing.assert_close(svg.slerp(a, b, 1 / 3), expected)
    torch.testing.assert_close(svg.slerp(x0, 2 * x0, 0.25), svg.lerp(x0, 2 * x0, 0.25))  # theta = 0
    assert torch.isfinite(svg.slerp(x0, 2 * x0, 0.25)).all()


def test_gaussian_blur_mask():
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 3:6] = 1
    soft = svg.gaussian_blur_mask(m, 1.0)
    assert soft.shape == m.shape and 0 < soft[0, 0, 3, 4] < 1 and soft[0, 0, 7, 0] < 1e-4
    torch.testing.assert_close(soft.sum(), torch.tensor(9.0), atol=0.05, rtol=0)  # ~mass kept
    c = soft[0, 0]  # symmetric about the box centre (3, 4)
    for d in (1, 2, 3):
        assert c[3, 4 + d].item() == pytest.approx(c[3, 4 - d].item())
        assert c[3 + d, 4].item() == pytest.approx(c[3 - d, 4].item())
    zeros, ones = torch.zeros(1, 1, 5, 5), torch.ones(1, 1, 5, 5)
    assert torch.equal(svg.gaussian_blur_mask(zeros, 1.0), zeros)
    torch.testing.assert_close(svg.gaussian_blur_mask(ones, 2.0), ones)


def test_edit_keeps_cells_outside_the_box_exactly():
    m = ClassGaussians(shape=(4, 6, 6))
    x0 = m.mu[[0]] + S * torch.randn(1, 4, 6, 6, dtype=torch.float64)
    noise = torch.randn_like(x0)
    y = torch.tensor([2])
    closed = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    out = svg.edit_features(m, x0, y, closed, noise, t_edit=0.7, steps=20, null_class=m.null)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)  # nothing to edit: x0 back
    box = closed.clone()
    box[..., 1:4, 2:5] = 1
    out = svg.edit_features(m, x0, y, box, noise, t_edit=0.7, steps=20, null_class=m.null)
    keep = box[0, 0] == 0
    torch.testing.assert_close(out[..., keep], x0[..., keep], rtol=0, atol=1e-12)
    assert (out[..., ~keep] - x0[..., ~keep]).abs().min() > 1e-3  # the box is regenerated


def test_bad_inputs_give_clear_errors():
    m = ClassGaussians()
    x1, y = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        svg.sample_ode(m, x1, y, 0, null_class=m.null)
    with pytest.raises(ValueError, match="method must be one of"):
        svg.sample_ode(m, x1, y, 4, method="rk4", null_class=m.null)
    with pytest.raises(ValueError, match="cfg_mode must be one of"):
        svg.sample_ode(m, x1, y, 4, cfg_mode="late", null_class=m.null)
    with pytest.raises(ValueError, match="zero_init_steps must be in"):
        svg.sample_ode(m, x1, y, 4, zero_init_steps=5, null_class=m.null)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 3\]"):
        svg.sample_ode(m, x1, torch.tensor([0, 4]), 4, null_class=m.null)
    with pytest.raises(ValueError, match="y must be a LongTensor"):
        svg.sample_ode(m, x1, torch.tensor([0.0, 1.0]), 4, null_class=m.null)
    with pytest.raises(ValueError, match="t_start must be in"):
        svg.sample_ode(m, x1, y, 4, t_start=1.5, null_class=m.null)
    with pytest.raises(ValueError, match="cfg_interval must satisfy"):
        svg.sample_ode(m, x1, y, 4, cfg_mode="interval", cfg_interval=(0.8, 0.2), null_class=m.null)
