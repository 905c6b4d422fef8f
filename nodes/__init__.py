"""ComfyUI nodes of the XPSR pack: thin adapters over xpsr_core, listed by the pack's comfy_entrypoint."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apply import XPSRApply
from .caption import XPSRCaption, XPSRCaptionDataset, XPSRMLLMLoader
from .captioned_images import XPSRLoadCaptionedImages
from .color_fix import XPSRColorFix
from .loader import XPSRLoader
from .prompt_encode import XPSRDualPromptEncode
from .prompt_lines import XPSRPromptLines
from .sampler import XPSRSampler
from .tile_grid import XPSRTileGrid

NODES: list[type[io.ComfyNode]] = [XPSRLoader, XPSRDualPromptEncode, XPSRApply, XPSRSampler, XPSRMLLMLoader,
                                   XPSRCaption, XPSRCaptionDataset, XPSRLoadCaptionedImages, XPSRColorFix,
                                   XPSRTileGrid, XPSRPromptLines]


class XPSRExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
