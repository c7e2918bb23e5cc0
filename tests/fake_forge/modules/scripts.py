"""Fake of ``modules/scripts.py``: the Script base class and the always-on runner.

The runner calls each always-on script with its slice of ``p.script_args``
(``args_from:args_to``) in Forge's signatures (``scripts.py:156-300, 840-900``); an
exception in a hook is reported and the generation goes on, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import errors

AlwaysVisible = object()


@dataclass
class PostprocessImageArgs:
    image: object


@dataclass
class PostprocessBatchListArgs:
    images: list


@dataclass
class PostSampleArgs:
    samples: object


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None
    section = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []


_HOOKS = ("before_process", "process", "before_process_batch", "after_extra_networks_activate", "process_batch",
          "process_before_every_sampling", "post_sample", "postprocess_batch", "postprocess_batch_list",
          "postprocess_image", "before_hr", "postprocess")


class ScriptRunner:
    def __init__(self, scripts):
        self.alwayson_scripts = list(scripts)
        self.calls: list[str] = []

    def _each(self, hook, p, *args, **kwargs):
        self.calls.append(hook)
        for script in self.alwayson_scripts:
            fn = getattr(script, hook, None)
            if fn is None:
                continue
            script_args = p.script_args[script.args_from:script.args_to]
            try:
                fn(p, *args, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._each("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def post_sample(self, p, ps):
        self._each("post_sample", p, ps)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp, **kwargs):
        self._each("postprocess_batch_list", p, pp, **kwargs)

    def postprocess_image(self, p, pp):
        self._each("postprocess_image", p, pp)

    def before_hr(self, p):
        self._each("before_hr", p)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
