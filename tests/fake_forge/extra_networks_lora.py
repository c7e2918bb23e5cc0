"""Fake of ``extensions-builtin/sd_forge_lora/extra_networks_lora.py`` (``:14-56``)."""

from __future__ import annotations

import networks
from modules import extra_networks, shared


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.errors = {}

    def activate(self, p, params_list):
        names, te, unet, dyn = [], [], [], []
        for params in params_list:
            names.append(params.positional[0])
            t = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            t = float(params.named.get("te", t))
            u = float(params.positional[2]) if len(params.positional) > 2 else t
            u = float(params.named.get("unet", u))
            names_dyn = int(params.positional[3]) if len(params.positional) > 3 else None
            te.append(t)
            unet.append(u)
            dyn.append(names_dyn)
        networks.load_networks(names, te, unet, dyn)
        if shared.opts.lora_add_hashes_to_infotext:
            if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
                p.lora_hashes = {}
            for item in networks.loaded_networks:
                if item.network_on_disk.shorthash and item.mentioned_name:
                    p.lora_hashes[item.mentioned_name.replace(":", "").replace(",", "")] = \
                        item.network_on_disk.shorthash
            if p.lora_hashes:
                p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())

    def deactivate(self, p):
        pass
