"""Failure paths (issue 11): no non-finite checkpoint is written or sampled, no code runs from a
weight file, no run silently overwrites another's output, no hang, every bad input named.

Each test here failed before the fix (starting commit a2cd1bf) and passes after it."""

import fractions
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import sample
import svg
import train_ae
import train_dit
from test_eval import TinyInception, write_pngs
from test_sample import EXPORT, tiny_stage2_checkpoint
from test_train_ae import TINY as AE_TINY
from test_sit import official_state_dict
from test_train_dit import AE_CFG, args, save_ae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    return save_ae(tmp_path_factory.mktemp("ae") / "ae.pt")


@pytest.fixture
def few_images(monkeypatch):
    monkeypatch.setitem(train_dit.SYNTHETIC_DATA, "num_images", 10)  # 20 (image, flip) items


def ckpts(out):
    folder = out / "checkpoints"
    return sorted(os.listdir(folder)) if folder.exists() else []


# ---------------------------------------------------------------- 1, 8: finite checkpoints only
def test_overflowing_update_is_never_saved_and_never_sampled(ae_path, tmp_path, few_images):
    # lr 1e39 overflows float32: the loss of step 1 is finite, the weights after it are not.
    with pytest.raises(SystemExit, match=r"non-finite weights .* after step 1.*nothing saved.*none written yet"):
        train_dit.main(args(ae_path, tmp_path, "--lr", "1e39", "--ckpt-every", "1", steps=4))
    assert ckpts(tmp_path) == []
    # A sampler given a checkpoint with NaN weights refuses it instead of drawing black images.
    path = tiny_stage2_checkpoint(tmp_path / "nan.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"]["final_layer.linear.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) weights in 1 tensors.*final_layer.linear.weight"):
        sample.main(["grid", "--ckpt", path, "--classes", "1", "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


def test_train_ae_stops_on_nan_without_saving(tmp_path):
    with pytest.raises(SystemExit, match=r"non-finite .*training stopped, nothing saved"):
        train_ae.main(AE_TINY + ["--out", str(tmp_path), "--steps", "3", "--lr", "1e39", "--ckpt-every", "1"])
    assert ckpts(tmp_path) == []


def test_non_finite_features_blame_the_autoencoder_not_the_lr(tmp_path, few_images):
    torch.manual_seed(0)
    ae = svg.SVGAutoencoder(AE_CFG)
    sd = ae.state_dict()
    sd["dino.norm.weight"].fill_(3e38)  # finite weights, features overflow to inf
    torch.save({"ae_config": asdict(AE_CFG), "ae": sd, "step": 5}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match=r"features of --ae .* are not finite .*the autoencoder is broken"):
        train_dit.main(args(str(tmp_path / "ae.pt"), tmp_path / "out"))


# ---------------------------------------------------------------- 2: no code from a weight file
class Payload:
    """Unpickling this runs open(marker, "w"): a stand-in for any shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_loading_a_crafted_pickle_runs_no_code(ae_path, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"ae_config": {}, "ae": {}, "step": 3, "x": Payload(marker)}, evil)
    refused = r"refers to the Python object\(s\) io.open.*--trust-pickle"
    with pytest.raises(ValueError, match=refused):
        svg.load_autoencoder(str(evil))
    with pytest.raises(ValueError, match=refused):
        svg.load_generator(str(evil))
    with pytest.raises(ValueError, match=refused):
        train_dit.main(args(str(evil), tmp_path / "a"))  # --ae
    with pytest.raises(ValueError, match=refused):
        train_dit.main(args(ae_path, tmp_path / "b", "--resume", str(evil)))
    with pytest.raises(ValueError, match=refused):
        sample.main(["grid", "--ckpt", str(evil)])
    torch.save({"ema": official_state_dict()}, tmp_path / "official.pt")
    with pytest.raises(ValueError, match=refused):  # the official SVG-XL route: --ae of the sampler
        sample.main(["grid", "--ckpt", str(tmp_path / "official.pt"), "--ae", str(evil), "--stats", str(evil)])
    for sub in (["recon", "--inception", "i", "--lpips-vgg", "v", "--lpips-heads", "h"], ["probe"]):
        monkeypatch.setattr("sys.argv", ["eval.py", sub[0], "--ae", str(evil), "--data", "synthetic", *sub[1:]])
        with pytest.raises(ValueError, match=refused):
            ev.main()
    assert not marker.exists()
    # The payload is live: the explicit opt-in runs it (which is why it is opt-in).
    with pytest.raises(Exception):
        svg.load_autoencoder(str(evil), trust_pickle=True)
    assert marker.exists()
    assert "arbitrary code" in svg.TRUST_PICKLE_HELP


def with_benign_global(path, out, **entries):
    """A copy of a checkpoint (entries set) with one harmless non-tensor object, a Fraction, that a
    weights-only load refuses."""
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(entries, note=fractions.Fraction(1, 3))
    torch.save(ckpt, out)
    return str(out)


def help_text(main, argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_every_command_whose_refusal_names_trust_pickle_accepts_it(ae_path, tmp_path, monkeypatch, capsys):
    # A refused file says "pass --trust-pickle"; every command that loads --ae / --ckpt must then take it
    # (pca, pca-sit, tsne, sweep and shapes did not: argparse stopped at an unknown flag).
    commands = [(train_ae.main, []), (train_dit.main, [])]
    for main in (ev.main, sample.main):
        names = re.search(r"\{([\w,-]+)\}", help_text(main, [], capsys)).group(1).split(",")
        commands += [(main, [name]) for name in names]
    missing = [f"{main.__module__} {' '.join(argv)}" for main, argv in commands
               if re.search(r"--(ae|ckpt|resume|init-from)\b", text := help_text(main, argv, capsys))
               and "--trust-pickle" not in text]
    assert len(commands) > 15 and missing == []
    # And the flag reaches the loader: the same file is refused without it and read with it.
    ae = with_benign_global(ae_path, tmp_path / "ae.pt")
    gen = with_benign_global(tiny_stage2_checkpoint(tmp_path / "g0.pt"), tmp_path / "g.pt",
                             args={"data": "synthetic", "seed": 0})  # "trained on the shapes", as `shapes` needs
    runs = {"pca": ["--ae", ae, "--data", "synthetic", "--num-images", "2", "--out", str(tmp_path / "p.png")],
            "pca-sit": ["--ckpt", gen, "--classes", "1", "--steps", "2", "--times", "0.5",
                        "--out", str(tmp_path / "s.png")],
            "shapes": ["--ckpt", gen]}
    for sub, flags in runs.items():
        monkeypatch.setattr("sys.argv", ["eval.py", sub, *flags])
        with pytest.raises(ValueError, match=r"fractions.Fraction.*--trust-pickle"):
            ev.main()
        monkeypatch.setattr("sys.argv", ["eval.py", sub, *flags, "--trust-pickle"])
        if sub == "shapes":  # both of its loads pass; this 10-class test generator is then refused
            with pytest.raises(ValueError, match="has 10 classes; the synthetic set has 8"):
                ev.main()
        else:
            ev.main()
    assert (tmp_path / "p.png").exists() and (tmp_path / "s.png").exists()


# ---------------------------------------------------------------- 3: no hang
def test_global_batch_larger_than_the_data_is_refused_not_a_hang(ae_path, tmp_path, few_images):
    def too_slow(*_):
        raise TimeoutError("train_dit did not return within 60 s (the drop-last loop spins)")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match=r"20 training items .* less than one global batch \(32\)"):
            train_dit.main(args(ae_path, tmp_path, "--global-batch", "32"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- 4: --lr on resume
def test_lr_on_resume_takes_effect_and_is_recorded(ae_path, tmp_path, few_images):
    train_dit.main(args(ae_path, tmp_path, "--lr", "2e-3", steps=3))
    train_dit.main(args(ae_path, tmp_path, "--resume", "auto", steps=6))  # no --lr: the checkpoint's
    at6 = torch.load(tmp_path / "checkpoints" / "0000006.pt", weights_only=True)
    assert at6["opt"]["param_groups"][0]["lr"] == at6["args"]["lr"] == 2e-3
    train_dit.main(args(ae_path, tmp_path, "--resume", "auto", "--lr", "1e-4", steps=9))
    at9 = torch.load(tmp_path / "checkpoints" / "0000009.pt", weights_only=True)
    assert at9["opt"]["param_groups"][0]["lr"] == at9["args"]["lr"] == 1e-4
    assert "--lr 0.0001 replaces the checkpoint's lr 0.002" in (tmp_path / "log.txt").read_text()


def test_train_ae_lr_on_resume(tmp_path):
    run = AE_TINY + ["--out", str(tmp_path), "--ckpt-every", "2"]
    train_ae.main(run + ["--steps", "2", "--lr", "3e-4"])
    train_ae.main(run + ["--steps", "3", "--resume", "auto", "--lr", "5e-5"])
    ckpt = torch.load(tmp_path / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["opt_ae"]["param_groups"][0]["lr"] == ckpt["opt_disc"]["param_groups"][0]["lr"] == 5e-5
    assert ckpt["args"]["lr"] == 5e-5


# ---------------------------------------------------------------- 5: output folder protection
def test_fresh_run_into_a_used_folder_is_refused_unless_overwrite(ae_path, tmp_path, few_images):
    train_dit.main(args(ae_path, tmp_path, steps=3))
    before = (tmp_path / "checkpoints" / "0000003.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds checkpoints of another run \(0000003.pt .. "
                                              r"0000003.pt\): continue it with --resume auto.*--overwrite"):
        train_dit.main(args(ae_path, tmp_path, "--seed", "1", steps=3))
    assert (tmp_path / "checkpoints" / "0000003.pt").read_bytes() == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_ae.main(AE_TINY + ["--out", str(tmp_path), "--steps", "1"])
    train_dit.main(args(ae_path, tmp_path, "--seed", "1", "--overwrite", steps=2))
    assert ckpts(tmp_path) == ["0000002.pt"]  # the earlier run's 0000003.pt cannot be resumed by mistake


def test_a_second_concurrent_run_is_refused_naming_the_lock_and_pid(ae_path, tmp_path, few_images):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, svg; svg.RunLock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {holder.pid} on .*lock file "
                                               rf".*run.lock\)"):
            train_dit.main(args(ae_path, tmp_path, steps=1))
        with pytest.raises(RuntimeError, match=rf"pid {holder.pid}"):
            train_ae.main(AE_TINY + ["--out", str(tmp_path), "--steps", "1"])
    finally:
        holder.kill()
        holder.wait()
    train_dit.main(args(ae_path, tmp_path, steps=1))  # the OS dropped the dead holder's lock


def test_kill_9_mid_run_then_resume_auto_is_exact(ae_path, tmp_path):
    """A real SIGKILL (possibly mid-save): the lock dies with the process, the partial temp file is
    cleaned up, and --resume auto continues to the same weights as an uninterrupted run."""
    cli = args(ae_path, tmp_path / "killed", "--ckpt-every", "1", steps=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    long_run = args(ae_path, tmp_path / "killed", "--ckpt-every", "1", steps=1000)  # killed long before the end
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_dit.py"), *long_run], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "killed" / "checkpoints" / "0000002.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = tmp_path / "killed" / "checkpoints" / "0000099.pt.abc123.tmp"
    partial.write_bytes(b"half a checkpoint")  # what a kill during torch.save leaves
    train_dit.main(cli + ["--resume", "auto"])
    assert not partial.exists()
    train_dit.main(args(ae_path, tmp_path / "straight", "--ckpt-every", "1", steps=6))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "0000006.pt", weights_only=True)
            for run in ("killed", "straight"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


# ---------------------------------------------------------------- 6, 7: images
def test_decompression_bomb_is_named_and_skippable(tmp_path, monkeypatch, ckpt_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "0_big.png")
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "1_ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64 x 64 > 2 x 1500: a "bomb"
    ds = svg.ImageFolder(tmp_path, 32, on_error="skip")
    with pytest.warns(UserWarning, match=r"skipping unreadable image '.*0_big.png'.*MAX_IMAGE_PIXELS"):
        x, _ = ds[0]
    assert ds.num_skipped == 1 and torch.equal(x, ds.load(1)[0])
    with pytest.raises(RuntimeError, match=r"cannot read image '.*0_big.png'.*decompression bomb"):
        svg.ImageFolder(tmp_path, 32, on_error="raise")[0]
    with pytest.raises(ValueError, match=r"cannot read image '.*0_big.png'"):
        sample.main(["edit", "--ckpt", ckpt_path, "--class-id", "1", "--image", str(tmp_path / "0_big.png"),
                     "--box", "0", "0", "8", "8"])


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return tiny_stage2_checkpoint(tmp_path_factory.mktemp("stage2") / "tiny.pt")


def test_image_modes_become_the_right_8_bit_rgb(tmp_path):
    gray16 = np.full((32, 32), 40000, np.uint16)  # 40000 / 65535 * 255 = 155.7
    (tmp_path / "fid").mkdir()
    Image.fromarray(gray16).save(tmp_path / "fid" / "a.png")
    assert Image.open(tmp_path / "fid" / "a.png").mode == "I;16"
    # The training data and the FID image folders read the same pixels (not clipped to white).
    x, _ = svg.ImageFolder(tmp_path / "fid", 32)[0]
    assert torch.equal(svg.to_uint8(x)[:, 0, 0], torch.tensor([156, 156, 156], dtype=torch.uint8))
    assert ev.FolderImages(str(tmp_path / "fid"))[0][:, 0, 0].tolist() == [156, 156, 156]
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(tmp_path / "gray.png")
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # no ink: white
    Image.fromarray(np.full((32, 32, 4), (10, 20, 30, 0), np.uint8)).save(tmp_path / "rgba.png")
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    expect = {"gray16": (156, 156, 156), "gray": (100, 100, 100), "cmyk": (255, 255, 255),
              "rgba": (10, 20, 30), "pal": (50, 60, 70)}
    for name, rgb in expect.items():
        path = next(tmp_path.glob(name + ".*"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no PIL palette-transparency warning either
            im = svg.open_image(path)
        assert im.mode == "RGB" and tuple(np.asarray(im)[5, 5]) == rgb, name


# ---------------------------------------------------------------- 9: export records content
def test_export_refuses_a_replaced_checkpoint_or_another_batch_size(tmp_path):
    path = tiny_stage2_checkpoint(tmp_path / "g.pt")
    out = tmp_path / "export"
    sample.main(["export", "--ckpt", path, "--out-dir", str(out), *EXPORT, "--max-shards", "1"])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["ckpt_sha256"] == svg.file_sha256(path) and settings["batch_size"] == 2
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 2 there, 3 now\)"):
        sample.main(["export", "--ckpt", path, "--out-dir", str(out), *EXPORT, "--batch-size", "3"])
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"]["final_layer.linear.bias"] += 1  # another model under the same name
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"other settings \(ckpt_sha256: "):
        sample.main(["export", "--ckpt", path, "--out-dir", str(out), *EXPORT])


# ---------------------------------------------------------------- 10: sampling arguments
@pytest.mark.parametrize("flags, message", [
    (["--shift", "0"], "must be > 0"), (["--shift", "-1"], "must be > 0"),
    (["--cfg-scale", "nan"], "must be a finite number"), (["--cfg-scale", "inf"], "must be a finite number"),
])
def test_bad_sampling_arguments_are_refused(ckpt_path, flags, message, capsys):
    with pytest.raises(SystemExit):
        sample.main(["grid", "--ckpt", ckpt_path, *flags])
    assert message in capsys.readouterr().err


def test_bad_edit_and_sampler_arguments_are_refused_in_svg_too(ckpt_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["edit", "--ckpt", ckpt_path, "--class-id", "1", "--image", "x.png", "--box", "0", "0", "8",
                     "8", "--blur-sigma", "-1"])
    assert "must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="time shift must be a finite number > 0"):
        svg.ode_time_grid(4, shift=0.0)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        svg.sample_ode(lambda x, t, y: x, torch.zeros(1, 2, 1, 1), torch.zeros(1, dtype=torch.long), 2,
                       cfg_scale=float("nan"), null_class=1)
    with pytest.raises(ValueError, match="blur sigma must be a finite number >= 0"):
        svg.gaussian_blur_mask(torch.ones(1, 1, 2, 2), -1.0)


# ---------------------------------------------------------------- 11: eval fid validates first
def test_fid_checks_inputs_before_the_inception_pass_and_refuses_nan(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (15, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    monkeypatch.setattr(ev, "load_inception", lambda path: TinyInception())
    real_features = ev.inception_features

    def expensive(*a, **kw):
        raise AssertionError("the Inception pass ran before the inputs were checked")

    def fid(samples, ref):
        monkeypatch.setattr("sys.argv", ["eval.py", "fid", "--samples", str(tmp_path / samples), "--ref",
                                         str(tmp_path / ref), "--inception", "w.pth", "--out",
                                         str(tmp_path / "r.json"), "--num-workers", "0"])
        ev.main()

    monkeypatch.setattr(ev, "inception_features", expensive)
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        fid("samples.npz", "missing.npz")
    with pytest.raises(KeyError, match=r"has no 'arr_0' array"):
        fid("samples.npz", "foreign.npz")
    with pytest.raises(ValueError, match=r"holds 1 image\(s\): FID needs at least 2"):
        fid("one.npz", "ref.npz")
    monkeypatch.setattr(ev, "inception_features", real_features)
    monkeypatch.setattr(ev, "frechet_distance", lambda *a, **kw: float("nan"))
    with pytest.raises(ValueError, match=r"non-finite metrics \{'fid': nan\}"):
        fid("samples.npz", "ref.npz")
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- 12: the smaller ones
def test_saved_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        svg.atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
        assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644  # group-readable like open()
        svg.atomic_write(tmp_path / "b.npz", lambda f: np.savez(f, x=np.zeros(1)))
        assert stat.S_IMODE(os.stat(tmp_path / "b.npz").st_mode) == 0o644
    finally:
        os.umask(old)


def test_killed_saves_leave_no_temp_files_behind(ckpt_path, tmp_path):
    out = tmp_path / "export"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard_000000.pt.k1ll3d.tmp").write_bytes(b"partial")
    (out / "samples.npz.tmp").mkdir()  # the old fixed temp name, taken: a concurrent merge
    sample.main(["export", "--ckpt", ckpt_path, "--out-dir", str(out), *EXPORT])
    assert not list((out / "shards").glob("*.tmp")) and len(np.load(out / "samples.npz")["arr_0"]) == 10


def test_unreadable_weight_files_are_named_and_resume_auto_falls_back(ae_path, tmp_path, few_images):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"cannot read --ae '.*random.pt': truncated, corrupt or not a PyTorch"):
        train_dit.main(args(str(tmp_path / "random.pt"), tmp_path / "a"))
    out = tmp_path / "run"
    train_dit.main(args(ae_path, out, steps=6))
    latest = out / "checkpoints" / "0000006.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short (a full disk, a partial copy)
    with pytest.raises(ValueError, match=r"cannot read stage-2 checkpoint '.*0000006.pt': truncated"):
        svg.load_generator(str(latest))
    train_dit.main(args(ae_path, out, "--resume", "auto", steps=6))
    log = (out / "log.txt").read_text()
    assert "--resume auto: skipping" in log and "0000006.pt" in log and "resumed from" in log
    assert "0000003.pt at step 3" in log
    torch.load(latest, weights_only=True)  # rewritten whole


def test_a_checkpoint_cut_anywhere_is_named_not_a_raw_error(tmp_path):
    """Where the cut falls decides what torch.load raises (RuntimeError, OSError, EOFError, or a KeyError from
    a pickle memo, as CI once saw for a stage-2 checkpoint cut at 1000 bytes); all of them must name the file."""
    torch.manual_seed(0)
    path = tmp_path / "whole.pt"
    torch.save({"args": {f"flag_{i}": f"value {i} " * (i % 7) for i in range(80)}, "step": 6,
                "ema": {f"blocks.{i}.weight": torch.randn(8, 8) for i in range(12)}, "rng": [torch.get_rng_state()]},
               path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in range(1, len(data), 11):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cannot read checkpoint '.*cut.pt': truncated, corrupt"):
            svg.load_checkpoint(cut)
    damaged = bytearray(data)
    for i in range(len(data) // 3, len(data), 101):  # bytes flipped inside the pickle and the tensor records
        damaged[i] ^= 0xFF
    cut.write_bytes(bytes(damaged))
    try:
        svg.load_checkpoint(cut)  # a flip may land in tensor bytes only: the file still parses
    except ValueError as e:
        assert "cut.pt" in str(e)


def test_empty_class_folders_and_skipped_images_are_reported(ae_path, tmp_path):
    (tmp_path / "data" / "empty").mkdir(parents=True)
    write_pngs(tmp_path / "data" / "a", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"class folders without images .*\['empty'\]"):
        svg.ImageFolder(tmp_path / "data", 32)
    flat = tmp_path / "flat"
    write_pngs(flat, np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    (flat / "zz_bad.png").write_bytes(b"not a png")
    ds = svg.ImageFolder(flat, 32)  # skips are counted over DataLoader worker processes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(torch.utils.data.DataLoader(ds, batch_size=7, num_workers=1))
    assert ds.num_skipped == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dit.main(args(ae_path, tmp_path / "out", "--data", str(flat), "--on-error", "skip", "--steps", "2",
                            "--log-every", "1"))
    assert "unreadable images skipped so far" in (tmp_path / "out" / "log.txt").read_text()
    with pytest.raises(RuntimeError, match="zz_bad.png"):
        train_dit.main(args(ae_path, tmp_path / "out2", "--data", str(flat), "--on-error", "raise"))


@pytest.mark.parametrize("flag", ["--global-batch", "--ckpt-every", "--image-size", "--steps", "--log-every"])
def test_zero_counts_are_argument_errors_in_train_dit(flag, capsys):
    with pytest.raises(SystemExit):
        train_dit.parse_args(["--preset", "tiny", "--ae", "ae.pt", flag, "0"])
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--global-batch", "--ckpt-every", "--num-eval", "--grad-accum", "--eval-every"])
def test_zero_counts_are_argument_errors_in_train_ae(flag, capsys):
    with pytest.raises(SystemExit):
        train_ae.parse_args(["--preset", "tiny", flag, "0"])
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err
