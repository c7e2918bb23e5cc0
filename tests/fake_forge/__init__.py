"""A small, faithful fake of the Forge surface LoRAtorio touches.

Forge itself cannot run here (no weights, no GPU, a large dependency tree), so this
package re-implements, independently and at toy scale, the parts of Forge's call
protocol the extension depends on (file:line references are to Forge
``dfdcbab6``, f2.0.1v1.10.1):

- ``backend.sampling.sampling_function``: ``calc_cond_uncond_batch`` with Forge's row
  order (``[uncond, cond]``: the list of compatible chunks is reversed,
  ``sampling_function.py:187``), ``cond_or_uncond``, splitting into separate calls when
  ``model.memory_required`` exceeds the free memory (``:208-213``), the
  ``model_function_wrapper`` call (``:270-273``) and the per-chunk averaging
  (``:276-288``); ``sampling_function_inner`` with the CFG-1 optimisation
  (``:295-298``), pre-CFG, cfg and post-CFG functions (``:300-317``);
- ``backend.patcher``: ``ModelPatcher``/``UnetPatcher`` (``clone`` deep-copies
  ``model_options``), the LoRA key maps, ``load_lora``'s output format including
  ``(key, (dim, offset, size))`` tuple keys, and ``merge_lora_to_weight``;
- ``backend.operations.ForgeOperations.Linear``: a plain ``nn.Module``, not a
  ``torch.nn.Linear`` (``operations.py:126``);
- ``backend.nn``: a tiny SD-like UNet with ldm layer names and a tiny Flux-like DiT
  (16 latent channels, 2x2 token packing, packed qkv, guidance input);
- ``modules``: the WebUI pieces (prompt parser with AND, CFG denoiser, samplers,
  a processing loop with the script hooks in Forge's order, extra networks, the
  built-in LoRA's ``networks``).

:func:`install` maps these modules into ``sys.modules`` under Forge's names for the
duration of a test.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

_ROOTS = ("backend", "modules", "modules_forge", "networks", "extra_networks_lora")


def _walk():
    here = __name__
    for root in _ROOTS:
        mod = importlib.import_module(f"{here}.{root}")
        yield root, mod
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, prefix=f"{here}.{root}."):
                yield info.name[len(here) + 1:], importlib.import_module(info.name)


def install(monkeypatch) -> None:
    """Make ``import backend...`` / ``import modules...`` resolve to this fake for one test."""
    for name in [n for n in sys.modules if n.split(".")[0] in _ROOTS]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in _walk():
        monkeypatch.setitem(sys.modules, name, mod)
