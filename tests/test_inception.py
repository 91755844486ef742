"""FID InceptionV3: the key layout of pytorch-fid's weights file, strict loading, the input pipeline."""

import pytest
import torch
import torch.nn.functional as F

import eval as ev

# Published layout of pt_inception-2015-12-05-6726825d.pth (94 BasicConv2d + fc).
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
C = ["branch1x1"] + [f"branch7x7_{i}" for i in (1, 2, 3)] + [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"]
D = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
     "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
PREFIXES = (STEM + [f"Mixed_5{m}.{b}" for m in "bcd" for b in A] + [f"Mixed_6a.{b}" for b in B]
            + [f"Mixed_6{m}.{b}" for m in "bcde" for b in C] + [f"Mixed_7a.{b}" for b in D]
            + [f"Mixed_7{m}.{b}" for m in "bc" for b in E])
UNIT_KEYS = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
    "Conv2d_4a_3x3.bn.num_batches_tracked": (),
}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised network (with non-trivial BN statistics) saved like the real file."""
    torch.manual_seed(0)
    model = ev.FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / ev.INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


def test_key_layout_matches_pytorch_fid_file():
    state = ev.FIDInceptionV3().state_dict()
    assert len(PREFIXES) == 94
    expected = {f"{p}.{k}" for p in PREFIXES for k in UNIT_KEYS} | {"fc.weight", "fc.bias"}
    assert len(expected) == 566
    assert set(state) == expected
    for key, shape in SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 23_850_960


def test_strict_round_trip_and_output_shapes(inception_file):
    model = ev.load_inception(str(inception_file))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference = torch.load(inception_file, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    pool3, logits = model(images)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert (pool3 >= 0).all()  # pool3 averages ReLU outputs
    torch.testing.assert_close(logits, pool3 @ reference["fc.weight"].T)  # IS logits carry no bias
    # uint8 and [0, 1] floats are the same input
    torch.testing.assert_close(model.preprocess(images), model.preprocess(images.float() / 255))


def test_resize_happens_before_scaling():
    x = torch.rand(1, 3, 40, 56)
    out = ev.FIDInceptionV3().preprocess(x)
    expected = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(out, expected)


def test_fid_pooling_quirks():
    # TF average pool excludes padding: a constant map stays constant at the borders.
    x = torch.ones(1, 1, 5, 5)
    torch.testing.assert_close(ev.tf_avg_pool(x), x)
    model = ev.FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"  # TF graph quirk in Mixed_7c
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_bad_inputs_and_files(tmp_path, inception_file):
    model = ev.FIDInceptionV3()
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        model(torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        model(torch.rand(1, 32, 32))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*--inception"):
        ev.load_inception(str(tmp_path / "missing.pth"))
    state = torch.load(inception_file, weights_only=True)
    del state["Mixed_7c.branch_pool.bn.num_batches_tracked"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"missing keys \['Mixed_7c.branch_pool.bn.num_batches_tracked'\].*"
                                           r"unexpected keys \['AuxLogits.fc.weight'\]"):
        ev.load_inception(str(tmp_path / "bad.pth"))
    state = torch.load(inception_file, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(RuntimeError, match=r"fc.weight \(1000, 2048\) != \(1008, 2048\)"):
        ev.load_inception(str(tmp_path / "bad_shape.pth"))


def test_download_failure_names_the_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="could not download.*releases/download/fid_weights.*--inception"):
        ev.load_inception()
