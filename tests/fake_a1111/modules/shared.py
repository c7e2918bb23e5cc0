"""Fake ``modules.shared``: options, job state and the loaded model."""

from __future__ import annotations


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section = component_args, section
        self.comment_after = comment_after

    def info(self, text):
        self.comment_after += f"<span class='info'>({text})</span>"
        return self


_DEFAULTS = {
    "batch_cond_uncond": True,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "s_min_uncond_all": False,
    "skip_early_cond": 0.0,
    "use_old_scheduling": False,
    "extra_networks_default_multiplier": 1.0,
    "lora_add_hashes_to_infotext": True,
    "sd_lora": "None",
    "CLIP_stop_at_last_layers": 1,
}


class Options:
    def __init__(self):
        object.__setattr__(self, "data", dict(_DEFAULTS))
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        labels = object.__getattribute__(self, "data_labels")
        if item in labels:
            return labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True

    def begin(self):
        self.reset()


opts = Options()
state = State()
sd_model = None


def reset():
    global opts, sd_model
    opts.data.clear()
    opts.data.update(_DEFAULTS)
    opts.data_labels.clear()
    state.reset()
    sd_model = None
