"""Data: the ADM centre crop, the random crop, folders, unreadable files, the synthetic set."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import svg


def marker_image(w=600, h=400):
    """Grey image with a red 40x40 square in the centre and a blue left edge band."""
    arr = np.full((h, w, 3), 128, np.uint8)
    arr[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20] = (255, 0, 0)
    arr[:, :60] = (0, 0, 255)
    return Image.fromarray(arr)


def test_center_crop_geometry_box_halving_then_bicubic():
    im = marker_image()
    out = svg.center_crop_arr(im, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[32, 32]) == (255, 0, 0)  # centre kept
    assert tuple(out[2, 2]) == (128, 128, 128)  # blue band (left 10%) cropped away
    # the definition: 600x400 -> BOX 300x200 -> BOX 150x100 (100 < 2*64) -> BICUBIC 96x64 -> crop
    ref = im.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.array(ref)[:, 16:80])
    direct = np.array(im.resize((96, 64), Image.BICUBIC))[:, 16:80]
    assert not np.array_equal(out, direct)  # the halving changes pixels


def test_random_crop_is_keyed_by_seed_epoch_index(tmp_path):
    marker_image().save(tmp_path / "a.png")
    ds = svg.ImageFolder(tmp_path, 64, crop="random", flip=True, seed=0)
    crops = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        x, _ = ds[0]
        assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
        crops.append(x)
    ds.set_epoch(0)
    assert torch.equal(ds[0][0], crops[0])  # deterministic
    assert len({tuple(c.flatten()[:4000:97].tolist()) for c in crops}) > 1  # crops move
    flipped = [c for c in crops if torch.equal(c.flip(-1), svg.ImageFolder(tmp_path, 64)[0][0])]
    assert len(crops) > len(flipped)


def test_folder_labels_extensions_and_layouts(tmp_path):
    for cls, names in {"b_cls": ["x.JPEG", "sub/y.png"], "a_cls": ["z.webp", "notes.txt"]}.items():
        for name in names:
            p = tmp_path / "train" / cls / name
            p.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".txt"):
                p.write_text("not an image")
            else:
                marker_image(40, 40).save(p, format={"JPEG": "JPEG", "png": "PNG", "webp": "WEBP"}[name.split(".")[1]])
    ds = svg.ImageFolder(tmp_path / "train", 32)
    assert ds.classes == ["a_cls", "b_cls"] and ds.num_classes == 2
    assert [(p.split("/")[-1], y) for p, y in ds.samples] == [("z.webp", 0), ("y.png", 1), ("x.JPEG", 1)]
    assert ds[2][1] == 1 and ds[2][0].shape == (3, 32, 32)
    flat = svg.ImageFolder(tmp_path / "train" / "b_cls" / "sub", 32)
    assert flat.num_classes == 1 and flat[0][1] == 0
    marker_image(40, 40).save(tmp_path / "train" / "stray.png")
    with pytest.raises(ValueError, match="both images and sub-folders"):
        svg.ImageFolder(tmp_path / "train", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        svg.ImageFolder(tmp_path / "empty", 32)


def test_unreadable_files_raise_or_skip(tmp_path):
    marker_image(64, 64).save(tmp_path / "0_good.png")
    (tmp_path / "1_garbage.jpg").write_bytes(b"this is not a jpeg")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "2_truncated.png")
    data = (tmp_path / "2_truncated.png").read_bytes()
    (tmp_path / "2_truncated.png").write_bytes(data[:len(data) // 2])
    marker_image(64, 64).save(tmp_path / "3_good.png")
    strict = svg.ImageFolder(tmp_path, 32, on_error="raise")
    with pytest.raises(RuntimeError, match="1_garbage.jpg"):
        strict[1]
    ds = svg.ImageFolder(tmp_path, 32, on_error="skip")
    with pytest.warns(UserWarning, match="skipping unreadable image") as rec:
        x, _ = ds[1]  # 1 and 2 are unreadable -> image 3
    assert {str(w.message).split("'")[1].split("/")[-1] for w in rec} == {"1_garbage.jpg", "2_truncated.png"}
    assert torch.equal(x, ds.load(3)[0]) and ds.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[1]  # warned once per file only
    assert ds.num_skipped == 4


def test_synthetic_images_deterministic_and_labelled():
    ds = svg.SyntheticImages(12, 32, num_classes=4, seed=0)
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert x.min() >= -1 and x.max() <= 1
    colours = torch.tensor(svg.SYNTHETIC_COLOURS)  # a shape in one colour on a plain background
    for k in range(4):
        pixels = ds[k][0].flatten(1).T  # [S*S, 3]
        which = (pixels[:, None] == colours[None]).all(-1)  # [S*S, 2]
        assert which.any(1).all() and 0.05 < which[:, 1].float().mean() < 0.8, svg.SYNTHETIC_SHAPES[k]
    assert torch.equal(ds[5][0], svg.SyntheticImages(12, 32, 4, seed=0)[5][0])
    assert not torch.equal(x, svg.SyntheticImages(12, 32, 4, seed=1)[5][0])
    assert [ds[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len(svg.SyntheticImages(8, 16, 8)) == 8
    with pytest.raises(ValueError, match="num_classes=9"):
        svg.SyntheticImages(10, 32, num_classes=9)
    with pytest.raises(IndexError):
        ds[12]


def test_build_dataset_specs(tmp_path):
    assert isinstance(svg.build_dataset("synthetic", 32, num_images=10), svg.SyntheticImages)
    with pytest.raises(FileNotFoundError, match="does not exist.*synthetic"):
        svg.build_dataset(str(tmp_path / "nope"), 32)
    with pytest.raises(ValueError, match="crop must be"):
        svg.ImageFolder(tmp_path, 32, crop="resize")
