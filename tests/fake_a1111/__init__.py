"""A small, faithful fake of the AUTOMATIC1111 WebUI surface LoRAtorio touches.

A1111 cannot run here (no weights, network access for its repositories), so this
package re-implements, independently and at toy scale, the call protocol the
extension relies on (A1111 1.10.1, ``82a973c0``):

- ``modules.processing``: hook order of ``process_images`` (``processing.py:819-1150``),
  the shared conditioning cache keyed on extra-network data (``:440-503``), hires fix
  (``:1364-1464``) and img2img;
- ``modules.sd_samplers_cfg_denoiser``: ``CFGDenoiser.forward`` (``:156-311``): batch
  layout with AND sub-prompts, callbacks and what is read back, skip-uncond, chunked
  calls without ``batch_cond_uncond`` and for mismatched token lengths, CFG;
- k-diffusion (denoised output) and timestep (eps output) samplers, a second-order
  sampler, ``state.sampling_step`` set after each step as the WebUI does;
- ``modules.scripts`` / ``script_callbacks``: hooks and callbacks that report
  exceptions instead of raising them;
- the built-in Lora: ``networks.load_network`` / ``load_networks`` with ``Network.modules``
  holding LoRA (``up_model``/``down_model``) and LoHa modules, ``calc_updown``, the lazy
  merge in every patched layer's forward, "Lora hashes";
- a tiny SD-shaped model (``model.TinySD``) with A1111's layer names.

:func:`install` maps these modules into ``sys.modules`` under the WebUI's names for one
test (restored by ``monkeypatch``).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

_ORDER = [
    "modules", "modules.shared", "modules.devices", "modules.errors", "modules.script_callbacks",
    "modules.prompt_parser", "modules.extra_networks", "modules.infotext_utils", "modules.sd_samplers_common",
    "modules.sd_samplers_cfg_denoiser", "modules.sd_samplers_kdiffusion", "modules.sd_samplers_timesteps",
    "modules.sd_samplers", "modules.processing", "modules.scripts", "network", "networks", "extra_networks_lora",
]
_ROOTS = {"modules", "network", "networks", "extra_networks_lora", "lora", "xyz_grid"}

# LORATORIO_FAKE_DEVICE=cuda runs the fake (model, noise, sampling) on a GPU
DEVICE = os.environ.get("LORATORIO_FAKE_DEVICE", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install(monkeypatch, model=None, lora_dir=None):
    """Install the fake WebUI for one test; returns a namespace of its modules."""
    for name in [n for n in sys.modules if n.split(".")[0] in _ROOTS]:
        monkeypatch.delitem(sys.modules, name)
    mods = {}
    for name in _ORDER:
        mod = importlib.import_module(f"{__name__}.{name}")
        monkeypatch.setitem(sys.modules, name, mod)
        mods[name] = mod
    ns = SimpleNamespace(**{k.split(".")[-1]: v for k, v in mods.items()})
    ns.xyz_grid = importlib.import_module(f"{__name__}.xyz_grid")
    ns.shared.reset()
    ns.script_callbacks.clear_callbacks()
    ns.errors.reported.clear()
    ns.networks.reset()
    ns.scripts.scripts_data.clear()
    ns.sd_samplers_cfg_denoiser.model_calls.clear()
    for cache in ("cached_c", "cached_uc"):
        getattr(ns.processing.StableDiffusionProcessing, cache)[:] = [None, None]
    for cache in ("cached_hr_c", "cached_hr_uc"):
        getattr(ns.processing.StableDiffusionProcessingTxt2Img, cache)[:] = [None, None]
    ns.extra_networks.extra_network_registry.clear()
    ns.extra_networks.extra_network_aliases.clear()
    lora_net = ns.extra_networks_lora.ExtraNetworkLora()
    ns.extra_networks.extra_network_registry["lora"] = lora_net
    ns.extra_networks.extra_network_aliases["lyco"] = lora_net
    ns.scripts.scripts_data.append(ns.scripts.ScriptClassData(ns.xyz_grid.Script, "xyz_grid.py", "", ns.xyz_grid))
    if model is not None:
        set_model(ns, model)
    if lora_dir is not None:
        ns.networks.lora_dir = str(lora_dir)
        ns.networks.list_available_networks()
    return ns


def set_model(ns, model):
    ns.shared.sd_model = model
    ns.networks.assign_network_names_to_compvis_modules(model)
    ns.script_callbacks.model_loaded_callback(model)


def load_script(ns):
    """Load ``scripts/loratorio.py`` as the WebUI does and add it to a fresh always-on runner."""
    from loratorio.settings import UI_ORDER

    _, classes = ns.scripts.load_script(os.path.join(REPO, "scripts", "loratorio.py"), REPO)
    script = classes[0]()
    runner = ns.scripts.ScriptRunner()
    runner.add(script, len(UI_ORDER))
    return script, runner


def make_p(ns, runner, args, cls="txt2img", **kwargs):
    """A processing object whose script arguments are ``args`` (LoRAtorio's slice)."""
    klass = {"txt2img": ns.processing.StableDiffusionProcessingTxt2Img,
             "img2img": ns.processing.StableDiffusionProcessingImg2Img}[cls]
    return klass(scripts=runner, script_args=[None, *args], **kwargs)
