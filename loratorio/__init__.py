"""LoRAtorio: per-patch composition of several LoRAs for the Stable Diffusion WebUIs.

The core (``fusion``, ``lora``, ``routing``, ``selection``, ``engine`` and the other
host-free modules) imports no WebUI code; ``host_a1111`` and ``host_forge`` adapt it to
each host.
"""

__version__ = "0.1.0"
