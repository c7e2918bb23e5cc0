"""Fake ``modules.extra_networks``: tag parsing and activation with the script hook."""

from __future__ import annotations

import re
from collections import defaultdict

from . import errors

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry: dict = {}
extra_network_aliases: dict = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):  # the conditioning cache compares parsed tags by their items
        return self.items == other.items


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data


def activate(p, extra_network_data):
    activated = []
    for name, args in list(extra_network_data.items()):
        net = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if net is None:
            continue
        try:
            net.activate(p, args)
            activated.append(net)
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    for net in extra_network_registry.values():
        if net not in activated:
            net.activate(p, [])
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):
    for net in extra_network_registry.values():
        net.deactivate(p)
