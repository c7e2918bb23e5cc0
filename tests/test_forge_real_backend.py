"""LoRAtorio's Forge adapter against Forge's real backend code (optional).

Runs ``tests/fake_forge/real_check.py`` in a fresh interpreter when ``LORATORIO_FORGE_DIR``
names a Forge checkout (``lllyasviel/stable-diffusion-webui-forge``; only its
``backend/`` and ``packages_3rdparty/`` are imported, on CPU). Forge's backend needs
``psutil`` and ``gguf``; a folder holding them can be given in
``LORATORIO_FORGE_EXTRA_PATH``. Skipped otherwise: the rest of the suite uses the fake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORGE = os.environ.get("LORATORIO_FORGE_DIR")
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not FORGE or not (Path(FORGE) / "backend" / "sampling").is_dir(),
                                reason="LORATORIO_FORGE_DIR does not name a Forge checkout")


def test_adapter_matches_forges_own_merge_and_sampling_code():
    extra = [p for p in os.environ.get("LORATORIO_FORGE_EXTRA_PATH", "").split(os.pathsep) if p]
    proc = subprocess.run([sys.executable, str(HERE / "fake_forge" / "real_check.py"), FORGE, *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["check"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    expected_loader = ["sd-kohya-ldm+te+locon", "sd-kohya-diffusers", "sd-loha", "sd-dora",
                       "flux-diffusers-packed+kohya", "flux-loha-packed"]
    for name in expected_loader:
        r = results[f"loader:{name}"]
        assert r["max_abs"] <= 1e-6 * max(1.0, r["scale"]), r
    for name in ("sd-cfg5", "sd-cfg5-split", "flux-cfg1", "flux-cfg3"):
        r = results[f"step:{name}"]
        assert r["max_abs"] <= 2e-5 * max(1.0, r["scale"]), r
    # two branches of batch 2: one call of 4 rows, or one branch (2 rows) per call under low memory
    assert results["step:sd-cfg5"]["branch_call_rows"] == [4]
    assert results["step:sd-cfg5-split"]["branch_call_rows"] == [2]
    assert results["split-vs-one"]["max_abs"] <= 1e-5 * max(1.0, results["split-vs-one"]["scale"])
