"""Sweeps and curves: eval.py sweep (Table 2, Fig. 13), train_dit.py --fid-every and eval.py curves
(Fig. 14). The in-process samples are `sample.py export`'s, so the online / swept FID equals
`sample.py export` + `eval.py fid` on the same checkpoint and settings."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import eval as ev
import sample
import train_dit
from test_eval import TinyInception
from test_sample import tiny_stage2_checkpoint
from test_train_dit import args as train_args
from test_train_dit import save_ae

N = 10  # samples per FID: the fewest the 10 Inception Score splits allow


class RecordingInception(TinyInception):
    """TinyInception that keeps every batch it is given: which uint8 images were scored, in order."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, images):
        self.batches.append(images.clone())
        return super().forward(images)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweeps")
    rng = np.random.default_rng(0)
    np.savez(d / "ref.npz", arr_0=rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8))
    return dict(dir=d, ref=str(d / "ref.npz"), ckpt=tiny_stage2_checkpoint(d / "tiny.pt"))


def offline_fid(ckpt, out_dir, ref, *export_flags):
    """`sample.py export` then `eval.py fid`, as a user would run them."""
    sample.main(["export", "--ckpt", ckpt, "--out-dir", str(out_dir), "--num-samples", str(N), *export_flags])
    out = os.path.join(out_dir, "fid.json")
    argv, sys.argv = sys.argv, ["eval.py", "fid", "--samples", os.path.join(out_dir, "samples.npz"), "--ref", ref,
                                "--inception", "w.pth", "--out", out, "--num-workers", "0"]
    try:
        ev.main()
    finally:
        sys.argv = argv
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------- Fig. 14: online FID == offline FID
def test_online_fid_equals_export_then_eval_fid_and_curves_plot(files, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(train_dit.SYNTHETIC_DATA, "num_images", 10)
    online_net, offline_net = RecordingInception(), RecordingInception()
    monkeypatch.setattr(ev, "load_inception", lambda path: online_net)
    ae, out = save_ae(tmp_path / "ae.pt"), tmp_path / "run"
    sampler = ["--steps", "3", "--batch-size", "4", "--shard-size", "6", "--cfg-scale", "2", "--seed", "5"]
    train_dit.main(train_args(ae, out, "--fid-every", "4", "--fid-samples", str(N), "--fid-ref", files["ref"],
                              "--fid-inception", "w.pth", f"--fid-sampler-args={' '.join(sampler)}",
                              "--ckpt-every", "4", steps=4))
    loss, fid = ev.read_training_metrics(str(out))
    assert [r["step"] for r in loss] == [2, 4] and [r["step"] for r in fid] == [4]
    online = fid[0]
    assert online["metric"] == "FID-10" and online["num_samples"] == N and online["sampler"]["cfg_scale"] == 2

    monkeypatch.setattr(ev, "load_inception", lambda path: offline_net)
    offline = offline_fid(str(out / "checkpoints" / "0000004.pt"), tmp_path / "export", files["ref"], *sampler)
    assert online["fid"] == pytest.approx(offline["fid"], rel=1e-9)
    assert online["inception_score"] == pytest.approx(offline["inception_score"], rel=1e-9)
    # The same uint8 images in the same order, as contiguous [B, 3, H, W] batches, reached the network.
    exported = torch.from_numpy(np.load(tmp_path / "export" / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
    assert all(b.is_contiguous() and b.dtype == torch.uint8 for b in online_net.batches)
    assert torch.equal(torch.cat(online_net.batches)[-N:], exported)  # after the reference pass (or its cache)
    assert torch.equal(torch.cat(offline_net.batches)[:N], exported)  # before it

    # Fig. 14 plot from the run folder; a resumed run's repeated step keeps its last record.
    with open(out / ev.TRAINING_METRICS, "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.5, "steps_per_s": 1.0}) + "\n")
    assert ev.read_training_metrics(str(out))[0][-1]["loss"] == 0.5
    monkeypatch.setattr("sys.argv", ["eval.py", "curves", str(out), "--out", str(tmp_path / "curves.png")])
    ev.main()
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_online_fid_flags_are_checked_before_training(tmp_path, capsys):
    for extra, message in [(["--fid-every", "5"], "needs K >= 1, --fid-ref"),
                           (["--fid-every", "5", "--fid-ref", "r", "--fid-inception", "i", "--fid-samples", "4"],
                            "needs at least 10 samples"),
                           (["--fid-every", "5", "--fid-ref", "r", "--fid-inception", "i",
                             "--fid-sampler-args=--num-samples 8"], "are set by this command")]:
        with pytest.raises(SystemExit):
            train_dit.parse_args(["--ae", "a.pt", "--data", "d", *extra])
        assert message in capsys.readouterr().err


def test_export_config_is_exports_parser_and_refuses_the_callers_flags():
    a = sample.export_config("--batch-size 7", num_samples=20, steps=4)
    defaults = sample.parse_args(["export", "--ckpt", "c", "--out-dir", "o"])
    assert (a.batch_size, a.num_samples, a.steps, a.cfg_scale, a.shift) == (7, 20, 4, 1.0, defaults.shift)
    assert "ckpt" not in sample.in_process_settings(a) and sample.in_process_settings(a)["labels"] == "balanced"
    for flags in ("--steps 5", "--st 5", "--steps=5", "--ckpt x.pt", "--out-dir o"):
        with pytest.raises(ValueError, match="are set by this command"):
            sample.export_config(flags, steps=4)


# ---------------------------------------------------------------- Table 2 / Fig. 13: eval.py sweep
def test_sweep_scores_each_setting_as_export_then_fid_with_one_reference_pass(files, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(ev, "load_inception", lambda path: TinyInception())  # fast stand-in, both paths
    calls = []
    reference_statistics = ev.reference_statistics
    monkeypatch.setattr(ev, "reference_statistics", lambda *a, **k: calls.append(a) or reference_statistics(*a, **k))
    out = tmp_path / "sweep"
    monkeypatch.setattr("sys.argv", ["eval.py", "sweep", "--ckpt", files["ckpt"], "--ref", files["ref"],
                                     "--inception", "w.pth", "--steps", "2", "3", "--cfg-scales", "1", "2",
                                     "--num-samples", str(N), "--sampler-args=--batch-size 4", "--out", str(out),
                                     "--num-workers", "0"])
    ev.main()
    assert len(calls) == 1  # one reference statistics pass for the whole grid
    r = json.loads((tmp_path / "sweep.json").read_text())
    cells = {(row["steps"], row["cfg_scale"]): row for row in r["rows"]}
    assert sorted(cells) == [(2, 1.0), (2, 2.0), (3, 1.0), (3, 2.0)]
    assert cells[3, 2.0]["zero_init_steps"] == 1 and cells[3, 1.0]["zero_init_steps"] == 0  # App. A: guided only
    assert len({row["fid"] for row in r["rows"]}) == 4  # every setting samples differently
    offline = offline_fid(files["ckpt"], tmp_path / "export", files["ref"], "--steps", "3",
                          "--cfg-scale", "2", "--zero-init-steps", "1", "--batch-size", "4")
    assert cells[3, 2.0]["fid"] == pytest.approx(offline["fid"], rel=1e-9)
    assert cells[3, 2.0]["inception_score"] == pytest.approx(offline["inception_score"], rel=1e-9)
    md = (tmp_path / "sweep.md").read_text()
    assert "| Method | #Params | Steps | FID-10 w/o CFG | FID-10 w/ CFG 2 |" in md
    assert f"| SVG-tiny | {r['params']} | 3 | {cells[3, 1.0]['fid']:.2f} | {cells[3, 2.0]['fid']:.2f} |" in md
    assert "| cfg scale | FID-10 (2 steps) | IS (2 steps) | FID-10 (3 steps) | IS (3 steps) |" in md
    assert "not comparable with the paper's FID-50K" in capsys.readouterr().out
    assert (tmp_path / "sweep.png").stat().st_size > 10_000  # Fig. 13 curve


def test_sweep_needs_enough_samples_and_matplotlib(files, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["eval.py", "sweep", "--ckpt", files["ckpt"], "--ref", files["ref"],
                                     "--inception", "w.pth", "--num-samples", "5"])
    with pytest.raises(SystemExit):
        ev.main()
    assert "needs at least 10 samples" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[toy\]"'):
        ev.pyplot()
