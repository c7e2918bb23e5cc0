"""LoRAtorio always-on script: the UI accordion and the generation lifecycle.

Everything happens in the ``loratorio`` package: this file detects the host once
(Forge when its ``modules_forge`` package exists or the model has ``forge_objects``,
otherwise AUTOMATIC1111), builds the shared UI, and hands every hook to that host's
adapter module (``loratorio.host_a1111`` or ``loratorio.host_forge``).
"""

import importlib
import importlib.util
import logging

from modules import scripts

from loratorio.host_ui import build_ui
from loratorio.settings import LABELS, Settings

log = logging.getLogger("loratorio")


def _detect_host() -> str:
    if importlib.util.find_spec("modules_forge") is not None:
        return "forge"
    try:
        from modules import sd_models

        # only look at an already loaded model: reading shared.sd_model would load one
        model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        if model is not None and hasattr(model, "forge_objects"):
            return "forge"
    except Exception:
        pass
    return "a1111"


HOST_NAME = _detect_host()
try:
    host = importlib.import_module(f"loratorio.host_{HOST_NAME}")
except Exception:  # the WebUI must still start; the accordion then says LoRAtorio is unavailable
    log.exception("LoRAtorio: could not load the %s adapter", HOST_NAME)
    host = None

if host is not None and hasattr(host, "register_callbacks"):
    host.register_callbacks()


def _call(name, *args, **kwargs):
    fn = getattr(host, name, None) if host is not None else None
    if fn is not None:
        return fn(*args, **kwargs)
    return None


class LoratorioScript(scripts.Script):
    create_group = False

    def title(self):
        return LABELS["enabled"]

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        defaults = host.defaults() if host is not None and hasattr(host, "defaults") else Settings()
        names = getattr(host, "lora_names", None) or (lambda: [])
        return build_ui(self, is_img2img, defaults, names, getattr(host, "refresh_loras", None))

    def process(self, p, *args):
        _call("process", p, *args)

    def before_process_batch(self, p, *args, **kwargs):
        _call("before_process_batch", p, *args, **kwargs)

    def after_extra_networks_activate(self, p, *args, **kwargs):
        _call("after_extra_networks_activate", p, *args, **kwargs)

    def process_batch(self, p, *args, **kwargs):
        _call("process_batch", p, *args, **kwargs)

    def process_before_every_sampling(self, p, *args, **kwargs):
        _call("process_before_every_sampling", p, *args, **kwargs)

    def postprocess_image(self, p, pp, *args):
        _call("postprocess_image", p, pp, *args)

    def postprocess_batch(self, p, *args, **kwargs):
        _call("postprocess_batch", p, *args, **kwargs)

    def postprocess(self, p, processed, *args):
        _call("postprocess", p, processed, *args)
