"""What every XPSR node shares: the category and the XPSR_CONTROLNET socket type."""

from comfy_api.latest import io

CATEGORY = "image/upscaling/XPSR"
XPSRControlNetType = io.Custom("XPSR_CONTROLNET")
