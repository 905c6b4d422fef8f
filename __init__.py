"""comfyui-xpsr: XPSR super-resolution for ComfyUI.

ComfyUI imports this file and awaits ``comfy_entrypoint``; the nodes (and ComfyUI's own
modules) are imported only then, so the package stays importable without ComfyUI.
"""

# The frontend extension that labels the prompt boxes of XPSR Dual Prompt Encode.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import XPSRExtension

    return XPSRExtension()
