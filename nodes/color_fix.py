"""XPSR Color Fix: the official colour correction as a node, for graphs that sample with ComfyUI's own KSampler."""

from __future__ import annotations

from comfy_api.latest import io

from ..xpsr_core.pipeline.color import COLOR_FIXES, color_fix
from ..xpsr_core.pipeline.image import resize, to_rgb
from .common import CATEGORY


class XPSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRColorFix",
            display_name="XPSR Color Fix",
            category=CATEGORY,
            description="Gives a restored image the colours of its reference (the LR image), as the official "
                        "pipeline does after decoding. XPSR Sampler does this itself; use this node after KSampler.",
            inputs=[
                io.Image.Input("image", tooltip="The restored image."),
                io.Image.Input("reference", tooltip="The LR image (any size; it is resized to the image's size)."),
                io.Combo.Input("method", options=list(COLOR_FIXES), default="adain",
                               tooltip="adain (official): per-channel mean and spread; wavelet: low frequencies."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The image with the reference's colours.")],
        )

    @classmethod
    def execute(cls, image, reference, method: str) -> io.NodeOutput:
        if reference.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"reference has {reference.shape[0]} images and image has {image.shape[0]}; expected one "
                             "reference or one per image")
        target = to_rgb(image).movedim(-1, 1).float()
        source = resize(to_rgb(reference).movedim(-1, 1).float(), *target.shape[-2:])
        fixed = color_fix(target, source.expand(target.shape[0], -1, -1, -1), method)
        return io.NodeOutput(fixed.movedim(1, -1))
