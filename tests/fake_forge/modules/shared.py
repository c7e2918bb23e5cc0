"""Fake of ``modules/shared.py``: options, job state, the loaded model."""

from __future__ import annotations

from types import SimpleNamespace


class _State:
    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True


opts = SimpleNamespace(use_old_scheduling=False, CLIP_stop_at_last_layers=1, lora_add_hashes_to_infotext=True,
                       sd_lora="None", skip_early_cond=0.0, s_min_uncond_all=False, data={})
cmd_opts = SimpleNamespace(lora_dir="", no_hashing=False)
state = _State()
sd_model = None
device = "cpu"
