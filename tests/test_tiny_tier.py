"""The tiny tier: its documented commands, and the tier end to end, shortened (stage 1, feature
cache, stage 2, then `eval.py shapes`).

The end-to-end test is opt-in (SVG_SLOW_TESTS=1, a few minutes on the 2-core CPU): it trains for
real, at two thirds of the full tier's stage 1 and a third of its stage 2. Asserted: the judge knows
real shapes; stage 1 draws them (its reconstructions are judged right, thanks to the decoder's
patch shortcut); and the trained generator's samples are the requested class far more often than
the untrained one's, and closer to real images (judge FD). The full tier reaches the issue's 90%
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
    train_dit.main(["--preset", "tiny", "--ae", ae_ckpt, "--cache", cache, "--steps", "2000", "--out",
                    str(tmp_path / "dit")])
    r = ev.main(["shapes", "--ckpt", str(tmp_path / "dit" / "checkpoints" / "0002000.pt"), "--per-class", "25"])
    assert r["real"]["accuracy"] > 90
    assert r["reconstruction"]["accuracy"] > 80  # stage 1 draws recognisable shapes
    assert r["trained"]["fd"] < r["untrained"]["fd"]  # stage 2 learns the feature distribution
    assert r["trained"]["accuracy"] > r["untrained"]["accuracy"] + 35  # and the classes: chance is 25%


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
