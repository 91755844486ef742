"""Tests for toy/velocity_field.py: the closed-form field, the Euler sampler, the metrics, the script, the notebook."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from toy import velocity_field as vf

REPO = Path(__file__).resolve().parents[1]



def _mc_velocity(gm, x_t, t, y, num=200_000, seed=0):
    """Self-normalised importance-sampling estimate of E[eps - x_0 | x_t, y] (independent of the closed form).

    Draw x_0 ~ p_0(x_0 | y); given x_0, Eq. (3) fixes eps = (x_t - (1 - t) x_0) / t and the
    likelihood of x_t is N(x_t; (1 - t) x_0, t^2 I), which is the importance weight.
    """
    g = torch.Generator().manual_seed(seed)
    x_0 = vf.sample_target(gm, torch.full((num,), y), g).double()  # [M, 2]
    out = []
    for x in x_t.double():
        eps = (x - (1 - t) * x_0) / t  # [M, 2]
        w = torch.softmax(-0.5 * eps.pow(2).sum(1), dim=0)  # [M] N(x_t; (1-t) x_0, t^2 I) up to a constant
        out.append((w[:, None] * (eps - x_0)).sum(0))
    return torch.stack(out).float()


@pytest.mark.parametrize("geometry", vf.GEOMETRIES)
@pytest.mark.parametrize("t", [0.35, 0.8])
def test_mean_velocity_matches_monte_carlo(geometry, t):
    gm = vf.make_target("entangled", geometry)
    g = torch.Generator().manual_seed(1)
    for y in (0, vf.NULL_CLASS):
        x_t, _ = vf.forward_process(vf.sample_target(gm, torch.full((6,), y), g), torch.full((6,), t), g)  # [6, 2]
        exact = vf.mean_velocity(gm, x_t, torch.full((6,), t), torch.full((6,), y))
        torch.testing.assert_close(exact, _mc_velocity(gm, x_t, t, y), atol=0.06, rtol=0.02)


def test_mean_velocity_limits():
    """t = 1: v* = x - E[x_0 | y]; t = 0: v* = -x (Eq. 4 with eps independent of x_0)."""
    gm = vf.make_target("separated")
    x = torch.randn(5, 2)
    for y in range(vf.NUM_CLASSES):
        class_mean = gm.means[gm.labels == y].mean(0)
        v1 = vf.mean_velocity(gm, x, torch.ones(5), torch.full((5,), y))
        torch.testing.assert_close(v1, x - class_mean)
        v0 = vf.mean_velocity(gm, x, torch.zeros(5), torch.full((5,), y))
        torch.testing.assert_close(v0, -x)


def test_one_euler_step_lands_on_class_mean():
    gm = vf.make_target("separated")
    y = torch.tensor([0, 1])
    x_0 = vf.euler_sample(vf.exact_field(gm), torch.randn(2, 2), y, 1)
    torch.testing.assert_close(x_0, torch.stack([gm.means[gm.labels == c].mean(0) for c in (0, 1)]))


@pytest.mark.parametrize("layout", vf.LAYOUTS)
def test_many_euler_steps_transport_source_to_target(layout):
    gm = vf.make_target(layout)
    err, floor = vf.sampling_errors(vf.exact_field(gm), gm, 800, steps_list=(1, 100))
    assert err[100]["ed"] < 0.03 and err[100]["ed"] < 3 * floor + 0.01, (err, floor)
    assert err[100]["acc"] > 0.97
    assert err[1]["ed"] > 10 * err[100]["ed"]  # the metric does see the one-step collapse


def test_trajectory_shape_and_endpoints():
    gm = vf.make_target("entangled")
    noise = torch.randn(7, 2)
    path = vf.euler_sample(vf.exact_field(gm), noise, torch.zeros(7, dtype=torch.long), 4, return_trajectory=True)
    assert path.shape == (5, 7, 2)
    torch.testing.assert_close(path[0], noise)
    torch.testing.assert_close(path[-1], vf.euler_sample(vf.exact_field(gm), noise, torch.zeros(7, dtype=torch.long), 4))


def test_learned_field_approaches_exact():
    gm = vf.make_target("separated")
    cfg = replace(vf.SIZES["full"], train_steps=300, batch_size=256)
    model, losses = vf.train_velocity_mlp(gm, cfg)
    untrained = vf.VelocityMLP(cfg.hidden).eval()
    assert vf.field_error(untrained, gm) > 0.5
    assert vf.field_error(model, gm) < 0.1
    assert sum(losses[-20:]) < sum(losses[:20])


def test_cosine_metrics_on_constructed_cases():
    v = torch.tensor([[1.0, 2.0]]).repeat(10, 1)
    assert vf.mean_pairwise_cosine(v) == pytest.approx(1.0, abs=1e-6)
    assert vf.mean_pairwise_cosine(v, -3 * v) == pytest.approx(-1.0, abs=1e-6)
    assert vf.pointwise_cosine(v, -v) == pytest.approx(-1.0, abs=1e-6)
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert vf.mean_pairwise_cosine(square) == pytest.approx(-1 / 3, abs=1e-6)  # sum of units is 0: (0 - 4) / 12
    with pytest.raises(ValueError, match="at least 2 vectors"):
        vf.mean_pairwise_cosine(v[:1])


def test_velocity_consistency_tells_layouts_apart():
    ent = vf.velocity_consistency(vf.make_target("entangled"), 0.9, 500)
    sep = vf.velocity_consistency(vf.make_target("separated"), 0.9, 500)
    assert sep["within"] > 0.8 and abs(ent["within"]) < 0.1
    assert sep["across"] < -0.8
    assert ent["same_point"] > 0.9 and sep["same_point"] < -0.5


def test_energy_distance_on_constructed_cases():
    a = torch.randn(200, 2)
    assert vf.energy_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-5)
    delta = torch.tensor([3.0, 4.0])
    assert vf.energy_distance(torch.zeros(50, 2), torch.zeros(50, 2) + delta) == pytest.approx(10.0, rel=1e-5)  # 2 |delta|
    near, far = (vf.energy_distance(a, a + torch.tensor([d, 0.0])) for d in (0.5, 2.0))
    assert 0 < near < far
    with pytest.raises(ValueError, match="same D"):
        vf.energy_distance(a, torch.zeros(5, 3))


def test_class_accuracy_and_stratified_data():
    gm = vf.make_target("entangled")
    x = vf.stratified_data(gm, 16)
    assert vf.class_accuracy(gm, gm.means, gm.labels) == 1.0
    assert vf.class_accuracy(gm, gm.means, 1 - gm.labels) == 0.0
    assert x.shape == (16, 2)
    with pytest.raises(ValueError, match="multiple of the number of modes"):
        vf.stratified_data(gm, 10)


@pytest.mark.parametrize("geometry", vf.GEOMETRIES)
def test_layouts_share_the_data_distribution(geometry):
    ent, sep = (vf.make_target(layout, geometry) for layout in vf.LAYOUTS)
    torch.testing.assert_close(ent.means, sep.means)
    assert not torch.equal(ent.labels, sep.labels)
    x, t = torch.randn(20, 2), torch.rand(20)
    null = torch.full((20,), vf.NULL_CLASS)
    torch.testing.assert_close(vf.mean_velocity(ent, x, t, null), vf.mean_velocity(sep, x, t, null))
    for gm in (ent, sep):
        assert torch.bincount(gm.labels).tolist() == [4, 4]


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="unknown layout 'mixed'"):
        vf.make_target("mixed")
    with pytest.raises(ValueError, match="unknown geometry"):
        vf.make_target("separated", "grid")
    with pytest.raises(ValueError, match="num_modes=6 must be a positive multiple of 4"):
        vf.make_target("separated", num_modes=6)
    gm = vf.make_target("separated")
    with pytest.raises(ValueError, match=r"labels must be in 0..1 or NULL_CLASS=2"):
        vf.mean_velocity(gm, torch.zeros(1, 2), torch.ones(1), torch.tensor([3]))
    with pytest.raises(ValueError, match="1-D long tensor"):
        vf.sample_target(gm, torch.zeros(3))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        vf.euler_sample(vf.exact_field(gm), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 0)


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[toy\]"'):
        vf.pyplot()


def test_script_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the script draws PNGs with matplotlib")
    vf.main(["--size", "small", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in vf.PLOTS:
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert "within class" in out and "energy distance" in out and "Steps needed" in out
    assert "separated  exact" in out and "entangled  learned" in out


def test_notebook_runs_top_to_bottom(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs nbformat (pip install -e '.[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel (pip install -e '.[dev]')")
    pytest.importorskip("matplotlib", reason="the notebook draws with matplotlib")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel spec: run `python -m ipykernel install --user`")
    monkeypatch.setenv("SVG_TOY_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(REPO / "toy" / "velocity_field.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "toy")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # the figures were drawn
