"""train_dit.py end to end on CPU with a tiny stage-1 checkpoint: one step (EMA math), the loss
falls, exact resume, feature cache round trip, 2-process torchrun == 1 process, load_generator,
and every refusal's message."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import svg
import train_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DINO-tiny at 32 px: 136-channel features on a 2x2 grid; per-image alignment so features do
# not depend on how images are batched (needed to compare 1 and 2 processes).
AE_CFG = replace(svg.AE_PRESETS["tiny"], dino_arch="dinov3_tiny", image_size=32, align="image",
                 decoder_ch_mult=(1, 1, 1, 1, 1), decoder_attn_resolutions=())
CKPT_KEYS = {"model", "ema", "opt", "step", "sit_config", "feature_stats", "ae_config", "ae", "align_stats", "sampler", "rng",
             "args"}


def save_ae(path, seed=0, step=5):
    torch.manual_seed(seed)
    ae = svg.SVGAutoencoder(AE_CFG)
    torch.save({"ae_config": asdict(AE_CFG), "ae": ae.state_dict(), "step": step}, path)
    return str(path)



@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    return save_ae(tmp_path_factory.mktemp("ae") / "ae.pt")


@pytest.fixture
def few_images(monkeypatch):
    """10 synthetic images = 20 (image, flip) items: epochs end every 2 steps at batch 8."""
    monkeypatch.setitem(train_dit.SYNTHETIC_DATA, "num_images", 10)


def args(ae, out, *extra, steps=6):
    """A small v-predicting SiT (the paper's parametrisation) on the tiny preset's other settings."""
    return ["--preset", "tiny", "--model", "SiT-tiny", "--prediction", "v", "--ae", ae, "--out", str(out),
            "--global-batch", "8", "--num-workers", "0", "--steps", str(steps), "--log-every", "2", "--ckpt-every", "3",
            *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_paper_preset_is_table5():
    a = train_dit.parse_args(["--ae", "ae.pt", "--data", "imagenet/train"])
    assert (a.model, a.global_batch, a.lr, a.steps) == ("SiT-XL", 256, 1e-4, 7_000_000)
    assert svg.ADAM_BETAS == (0.9, 0.999) and svg.EMA_DECAY == 0.9999 == a.ema_decay
    assert train_dit.parse_args(["--preset", "paper", "--ae", "a", "--data", "d", "--lr", "3e-4"]).lr == 3e-4


def test_one_step_updates_the_model_and_the_ema_exactly(ae_path, tmp_path, few_images):
    train_dit.main(args(ae_path, tmp_path, steps=1))
    ckpt = load(tmp_path / "checkpoints" / "0000001.pt")
    assert set(ckpt) == CKPT_KEYS and ckpt["step"] == 1
    torch.manual_seed(0)  # the script builds the init from --seed alone
    init = svg.SiT(svg.SiTConfig(**ckpt["sit_config"])).state_dict()
    changed = [k for k in init if not torch.equal(init[k], ckpt["model"][k])]
    assert "final_layer.linear.weight" in changed  # zero-init output layer got a gradient
    d = train_dit.PRESETS["tiny"]["ema_decay"]
    for k in init:  # EMA from an exact copy of the init
        torch.testing.assert_close(ckpt["ema"][k], d * init[k] + (1 - d) * ckpt["model"][k])
    assert ckpt["sit_config"]["in_channels"] == 136 and ckpt["sit_config"]["input_size"] == 2
    assert torch.equal(ckpt["ae"]["decoder.conv_out.weight"], load(ae_path)["ae"]["decoder.conv_out.weight"])
    stats = torch.load(tmp_path / "feature_stats.pt")
    assert torch.equal(stats["mean"], ckpt["feature_stats"]["mean"]) and stats["std"].shape == (136,)


def test_loss_weight_and_time_shift_reach_the_loss(ae_path, tmp_path, few_images, monkeypatch):
    seen, loss = [], svg.flow_matching_loss

    def spy(*a, **k):
        seen.append((k["t"], k["weight"]))
        return loss(*a, **k)

    monkeypatch.setattr(svg, "flow_matching_loss", spy)
    train_dit.main(args(ae_path, tmp_path, "--loss-weight", "velocity", "--time-shift", "1.5", steps=1))
    t, _, _ = train_dit.step_noise(torch.Generator(), 0, 0, 8, torch.arange(8), (136, 2, 2), 1.5, 0.1)
    assert seen[0][1] == "velocity"
    torch.testing.assert_close(seen[0][0], t)
    assert train_dit.parse_args(["--preset", "tiny", "--ae", "a"]).loss_weight == "x0"
    assert train_dit.parse_args(["--ae", "a", "--data", "d"]).time_shift == svg.TRAIN_TIME_SHIFT  # paper


def test_tiny_training_loss_falls(ae_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train_dit.SYNTHETIC_DATA, "num_images", 8)
    train_dit.main(args(ae_path, tmp_path, "--lr", "2e-3", "--log-every", "20", "--ckpt-every", "1000", steps=80))
    losses = [float(line.split("| loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if "| loss " in line]
    print("logged losses:", losses)
    assert len(losses) == 4 and losses == sorted(losses, reverse=True) and losses[-1] < 0.85 * losses[0]


def test_resume_is_exact_across_epochs_and_workers(ae_path, tmp_path, few_images):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_dit.main(args(ae_path, straight, "--num-workers", "1"))
    train_dit.main(args(ae_path, split, "--num-workers", "1", steps=3))
    assert not (split / "checkpoints" / "0000006.pt").exists()
    train_dit.main(args(ae_path, split, "--num-workers", "1", "--resume", "auto"))
    a, b = load(straight / "checkpoints" / "0000006.pt"), load(split / "checkpoints" / "0000006.pt")
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for s_a, s_b in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(s_a[k], s_b[k]) for k in s_a)
    assert a["sampler"] == b["sampler"] and (a["sampler"]["epoch"], a["sampler"]["position"]) == (2, 16)


def test_feature_cache_round_trip(ae_path, tmp_path, few_images):
    cache = tmp_path / "cache"
    train_dit.main(args(ae_path, tmp_path / "out", "--data", "synthetic", "--extract", "--cache", str(cache)))
    assert sorted(os.listdir(cache)) == ["features.npy", "labels.npy", "meta.json", "stats.pt"]
    assert not (tmp_path / "cache.partial").exists()
    features = np.load(cache / "features.npy", mmap_mode="r")
    assert features.shape == (10, 2, 136, 2, 2) and features.dtype == np.float16
    images = svg.build_dataset("synthetic", 32, num_images=10, num_classes=4)
    x = torch.stack([images[i][0] for i in range(10)])
    ae = svg.load_autoencoder(ae_path)
    with torch.no_grad():
        direct = torch.stack([ae.encode(x), ae.encode(x.flip(-1))], dim=1)  # [10, 2, C, h, w]
    torch.testing.assert_close(torch.from_numpy(np.array(features)).float(), direct, atol=2e-3, rtol=2e-3)
    assert np.array_equal(np.load(cache / "labels.npy"), [images[i][1] for i in range(10)])
    acc = svg.FeatureStatsAccumulator(136)
    acc.update(direct.flatten(0, 1))
    stats = torch.load(cache / "stats.pt")
    torch.testing.assert_close(stats["mean"], acc.result()["mean"], atol=1e-5, rtol=1e-5)
    meta = json.loads((cache / "meta.json").read_text())
    assert (meta["num_images"], meta["channels"], meta["grid"], meta["num_classes"]) == (10, 136, 2, 4)
    item, label = train_dit.FeatureCache(str(cache))[13]  # image 3, flipped
    assert torch.equal(item, torch.from_numpy(np.array(features[3, 1]))) and label == images[3][1]
    with pytest.raises(FileExistsError, match="already exists"):
        train_dit.main(args(ae_path, tmp_path / "out", "--data", "synthetic", "--extract", "--cache", str(cache)))
    # bfloat16 storage round trip
    train_dit.main(args(ae_path, tmp_path / "out", "--data", "synthetic", "--extract", "--cache",
                        str(tmp_path / "bf16"), "--cache-dtype", "bfloat16"))
    bf16 = train_dit.FeatureCache(str(tmp_path / "bf16"))
    torch.testing.assert_close(bf16.to_float(bf16[13][0]), direct[3, 1], atol=2e-2, rtol=1e-2)
    # training from the cache with another autoencoder is refused
    other = save_ae(tmp_path / "other_ae.pt", seed=1)
    with pytest.raises(ValueError, match="extracted with a different autoencoder"):
        train_dit.main(args(other, tmp_path / "out2", "--cache", str(cache)))


def torchrun(*cli):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_dit.py"), *cli]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_process_torchrun_equals_one_process(ae_path, tmp_path):
    # Extraction: each rank encodes its shard; stats merge over ranks with all_reduce.
    one, two = tmp_path / "cache1", tmp_path / "cache2"
    train_dit.main(args(ae_path, tmp_path / "x", "--data", "synthetic", "--extract", "--cache", str(one)))
    torchrun(*args(ae_path, tmp_path / "x", "--data", "synthetic", "--extract", "--cache", str(two)))
    f1, f2 = (torch.from_numpy(np.load(c / "features.npy")).float() for c in (one, two))
    torch.testing.assert_close(f1, f2, atol=2e-3, rtol=2e-3)
    s1, s2 = torch.load(one / "stats.pt"), torch.load(two / "stats.pt")
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    # Training: same global batch of 8, same per-sample noise -> the same weights.
    train_dit.main(args(ae_path, tmp_path / "run1", "--cache", str(one), steps=4))
    torchrun(*args(ae_path, tmp_path / "run2", "--cache", str(one), steps=4))
    a, b = (load(tmp_path / run / "checkpoints" / "0000004.pt") for run in ("run1", "run2"))
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], atol=2e-5, rtol=1e-4, msg=f"{key} {k}")
    assert not torch.allclose(a["model"]["final_layer.linear.weight"], torch.zeros(1))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(ae_path, tmp_path, few_images,
                                                                           monkeypatch):
    real, calls = svg.flow_matching_loss, []

    def loss_nan_from_step_5(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(svg, "flow_matching_loss", loss_nan_from_step_5)
    with pytest.raises(SystemExit, match=r"non-finite loss \(NaN/inf\) first at step 5.*0000003\.pt"):
        train_dit.main(args(ae_path, tmp_path, steps=9))
    assert os.listdir(tmp_path / "checkpoints") == ["0000003.pt"]


def test_refusals_name_the_problem_and_the_fix(ae_path, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_dit.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert "--ae is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="saved at step 0: its residual encoder and decoder are random"):
        train_dit.main(args(save_ae(tmp_path / "untrained.pt", step=0), tmp_path))
    with pytest.raises(FileNotFoundError, match="train_ae.py"):
        train_dit.main(args(str(tmp_path / "missing.pt"), tmp_path))
    with pytest.raises(FileNotFoundError, match="write it first with --extract"):
        train_dit.main(args(ae_path, tmp_path, "--cache", str(tmp_path / "nocache")))
    torch.save({"mean": torch.zeros(384), "std": torch.ones(384)}, tmp_path / "stats384.pt")
    with pytest.raises(ValueError, match=r"feature stats have shapes \(\(384,\), \(384,\)\) but the features have 136"):
        train_dit.main(args(ae_path, tmp_path, "--stats", str(tmp_path / "stats384.pt")))


def test_load_generator_native_and_official(ae_path, tmp_path, few_images):
    train_dit.main(args(ae_path, tmp_path, steps=3))
    path = str(tmp_path / "checkpoints" / "0000003.pt")
    ckpt = load(path)
    model, stats, ae = svg.load_generator(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    assert torch.equal(stats["std"], ckpt["feature_stats"]["std"]) and ae.feature_dim == 136
    # The same weights in the official layout: reversed time, ln1, learn_sigma head, {"ema": ...}.
    sd = {("ln1." + k[len("x_embedder."):] if k.startswith("x_embedder.") else k): v for k, v in ckpt["ema"].items()}
    sd["final_layer.linear.weight"] = torch.cat([sd["final_layer.linear.weight"]] * 2)
    sd["final_layer.linear.bias"] = torch.cat([sd["final_layer.linear.bias"]] * 2)
    sd["pos_embed"] = svg.sincos_pos_embed_2d(128, 2, 2)[None]
    torch.save({"ema": sd}, tmp_path / "official.pt")
    with pytest.raises(ValueError, match="official SVG DiT checkpoint.*dinov3_sp_stats.pt"):
        svg.load_generator(str(tmp_path / "official.pt"))
    official, ostats, _ = svg.load_generator(str(tmp_path / "official.pt"), ae=ae_path,
                                             stats=str(tmp_path / "feature_stats.pt"))
    x, t, y = torch.randn(2, 136, 2, 2), torch.tensor([0.2, 0.7]), torch.tensor([1, 3])
    torch.testing.assert_close(official(x, t, y), -model(x, 1 - t, y))
    with pytest.raises(ValueError, match="is a train_dit.py checkpoint with its own autoencoder"):
        svg.load_generator(path, ae=ae_path)


def test_resume_keeps_the_eq6_mode_and_reads_older_checkpoints(ae_path, tmp_path, few_images):
    # A resumed run must encode as the run did: a changed --align-stats is refused, not silently used.
    train_dit.main(args(ae_path, tmp_path, steps=3))
    with pytest.raises(ValueError, match="--align-stats frozen"):
        train_dit.main(args(ae_path, tmp_path, "--resume", "auto", "--align-stats", "batch"))
    # A checkpoint written before the running Eq. (6) statistics and SiTConfig.prediction existed (no
    # align_* keys, no "prediction": it predicted v) resumes.
    ckpt = load(tmp_path / "checkpoints" / "0000003.pt")
    ckpt["ae"] = {k: v for k, v in ckpt["ae"].items() if not k.startswith("align_")}
    del ckpt["align_stats"], ckpt["sit_config"]["prediction"]
    ckpt_path = tmp_path / "older.pt"
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ValueError, match="--align-stats batch"):  # older files encoded per batch
        train_dit.main(args(ae_path, tmp_path / "b", "--resume", str(ckpt_path)))
    train_dit.main(args(ae_path, tmp_path / "b", "--resume", str(ckpt_path), "--align-stats", "batch"))
    assert load(tmp_path / "b" / "checkpoints" / "0000006.pt")["step"] == 6


def test_init_from_inside_its_own_out_is_refused(tmp_path, capsys):
    # --overwrite there would delete the very file the new run starts from.
    with pytest.raises(SystemExit):
        train_dit.parse_args(["--preset", "tiny", "--ae", "ae.pt", "--out", str(tmp_path),
                              "--init-from", str(tmp_path / "checkpoints" / "0000300.pt")])
    assert "lies inside --out" in capsys.readouterr().err


def test_prediction_x_is_recorded_and_restored(ae_path, tmp_path, few_images):
    train_dit.main(args(ae_path, tmp_path, steps=2) + ["--prediction", "x"])
    path = str(tmp_path / "checkpoints" / "0000002.pt")
    assert load(path)["sit_config"]["prediction"] == "x"
    model, _, _ = svg.load_generator(path)
    assert model.cfg.prediction == "x"
    with pytest.raises(ValueError, match="sit_config"):  # a resume cannot change what the SiT outputs
        train_dit.main(args(ae_path, tmp_path, "--resume", path, steps=3))
    assert train_dit.PRESETS["paper"]["prediction"] == "v" and train_dit.PRESETS["tiny"]["prediction"] == "x"
