"""The tiny tier end to end, shortened: stage 1, feature cache, stage 2, then `eval.py shapes`.

Opt-in (SVG_SLOW_TESTS=1, 83 s on the 2-core CPU at load 1.5): it trains for real and checks that
the generator learns the classes, i.e. that samples of a requested shape are judged to be that
shape well above chance (25%) and above the untrained generator. This run is about a third of
the full tier's length. What holds today is asserted (the judge knows real shapes, the trained
generator's samples are closer to real ones than the untrained one's); the class-accuracy goal
is an xfail until it is met: the full tier reaches only 26.8% because stage-1 reconstructions
are judged right only 28% of the time (README, tiny tier).
"""

import os

import pytest

import eval as ev
import train_ae
import train_dit


@pytest.mark.skipif(os.environ.get("SVG_SLOW_TESTS") != "1",
                    reason="opt-in (SVG_SLOW_TESTS=1): trains both stages for a few minutes")
def test_shortened_tiny_tier_learns_the_classes(tmp_path):
    ae = train_ae.main(["--preset", "tiny", "--steps", "400", "--ckpt-every", "400", "--out", str(tmp_path / "ae")])
    ae_ckpt = str(tmp_path / "ae" / "checkpoints" / "0000400.pt")
    assert ae["eval"]["psnr"] > 16
    cache = str(tmp_path / "cache")
    train_dit.main(["--preset", "tiny", "--ae", ae_ckpt, "--extract", "--cache", cache, "--out", str(tmp_path / "dit")])
    train_dit.main(["--preset", "tiny", "--ae", ae_ckpt, "--cache", cache, "--steps", "700", "--out",
                    str(tmp_path / "dit")])
    r = ev.main(["shapes", "--ckpt", str(tmp_path / "dit" / "checkpoints" / "0000700.pt"), "--per-class", "25"])
    assert r["real"]["accuracy"] > 90
    assert r["trained"]["fd"] < r["untrained"]["fd"]  # stage 2 learns the feature distribution
    if r["trained"]["accuracy"] <= 50:
        pytest.xfail(f"the tiny tier does not yet make recognisable classes ({r['trained']['accuracy']:.1f}%): "
                     f"stage-1 reconstructions are judged right {r['reconstruction']['accuracy']:.1f}% of the time")
    assert r["trained"]["accuracy"] > r["untrained"]["accuracy"] + 20
