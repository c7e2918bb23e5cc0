"""Installs what LoRAtorio needs and the WebUI may lack; runs at every WebUI start.

Only missing packages are installed, through the WebUI's own ``launch`` helpers (so
``--skip-install`` is honoured). torch, numpy, safetensors and gradio come with the
WebUI and are never installed or upgraded here.
"""

import launch

# distribution name -> pip requirement
REQUIREMENTS = {
    "einops": "einops",
}

for dist, requirement in REQUIREMENTS.items():
    if not launch.is_installed(dist):
        launch.run_pip(f"install {requirement}", f"{requirement} for LoRAtorio")
