"""benchmarks/trainer_gpu.py in its CPU smoke mode: both sides train, every figure and sanity check is there."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cpu_smoke_mode_measures_both_sides_and_passes_its_sanity_checks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trainer_gpu.py"), "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "trainer_gpu.json").read_text())
    tiny = report["shapes"]["tiny"]
    assert tiny["sanity"]["dpo_first_loss_is_ln2"] and tiny["sanity"]["bitsandbytes_library_matches_device"]
    assert "cpu" in tiny["sanity"]["bitsandbytes_library"]
    for side in ("ours", "bare"):
        for stage in ("sft", "dpo"):
            figures = tiny["sides"][side][stage]
            assert figures["steps_logged"] == 5, (side, stage, figures)
            assert figures["step_s"] > 0 and figures["tokens_per_s"] > 0
            assert figures["mfu"] is None and figures["peak_gib"] is None  # CUDA-only figures stay unset on CPU
    for side in ("ours", "bare"):
        assert math.isclose(tiny["sides"][side]["dpo"]["first_loss"], math.log(2), abs_tol=0.02)
    ratios = tiny["ratios_ours_over_bare"]
    assert all(math.isfinite(ratios[k]) and ratios[k] > 0 for k in ("wall", "sft_step", "dpo_step"))
