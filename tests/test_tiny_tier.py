"""The tiny tier: its documented commands, and the tier end to end, shortened (stage 1, feature
cache, stage 2, then `eval.py shapes`).

The end-to-end test is opt-in (SVG_SLOW_TESTS=1, a few minutes on the 2-core CPU): it trains for
real, at about a third of the full tier's length. Asserted, because it holds: the judge knows real
shapes; stage 1 draws them (its reconstructions are judged right, thanks to the decoder's patch
shortcut); the trained generator's samples are closer to real images than the untrained one's
(judge FD). The class-accuracy goal for samples is an xfail until it is met: the full tier's
samples are judged right 48.8% of the time, and discs and triangles come out as 4x4 blocks
(README, tiny tier).
"""

import os
import re
from pathlib import Path

import pytest

import bench
import eval as ev
import sample
import train_ae
import train_dit


@pytest.mark.skipif(os.environ.get("SVG_SLOW_TESTS") != "1",
                    reason="opt-in (SVG_SLOW_TESTS=1): trains both stages for a few minutes")
def test_shortened_tiny_tier_learns_the_classes(tmp_path):
    ae = train_ae.main(["--preset", "tiny", "--steps", "400", "--ckpt-every", "400", "--out", str(tmp_path / "ae")])
    ae_ckpt = str(tmp_path / "ae" / "checkpoints" / "0000400.pt")
    assert ae["eval"]["psnr"] > 20
    cache = str(tmp_path / "cache")
    train_dit.main(["--preset", "tiny", "--ae", ae_ckpt, "--extract", "--cache", cache, "--out", str(tmp_path / "dit")])
    train_dit.main(["--preset", "tiny", "--ae", ae_ckpt, "--cache", cache, "--steps", "700", "--out",
                    str(tmp_path / "dit")])
    r = ev.main(["shapes", "--ckpt", str(tmp_path / "dit" / "checkpoints" / "0000700.pt"), "--per-class", "25"])
    assert r["real"]["accuracy"] > 90
    assert r["reconstruction"]["accuracy"] > 80  # stage 1 draws recognisable shapes (full tier: 95.5%)
    assert r["trained"]["fd"] < r["untrained"]["fd"]  # stage 2 learns the feature distribution
    if r["trained"]["accuracy"] <= 50:
        pytest.xfail(f"the tiny tier's samples are not yet recognisable ({r['trained']['accuracy']:.1f}%), although "
                     f"stage-1 reconstructions are judged right {r['reconstruction']['accuracy']:.1f}% of the time")
    assert r["trained"]["accuracy"] > r["untrained"]["accuracy"] + 20


def test_documented_tiny_commands_name_the_checkpoints_the_presets_write():
    """The README's command blocks and the scripts' usage lines read the tiny tier's checkpoints by step
    number; each must be the last step its preset writes (a stale number is a FileNotFoundError)."""
    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```bash\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    texts = {"README.md": "\n".join(blocks)}
    texts.update({m.__name__ + ".py": m.__doc__ for m in (train_ae, train_dit, sample, ev, bench)})
    steps = {"ae-tiny": train_ae.PRESETS["tiny"]["steps"], "dit_tiny": train_dit.PRESETS["tiny"]["steps"]}
    found = 0
    for name, text in texts.items():
        for run, step in re.findall(r"runs/(ae-tiny|dit_tiny)/checkpoints/(\d+)\.pt", text):
            found += 1
            assert int(step) == steps[run], \
                f"{name} reads runs/{run}/checkpoints/{step}.pt; the tiny preset writes step {steps[run]}"
    assert found >= 10
