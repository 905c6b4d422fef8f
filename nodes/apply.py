"""XPSR Apply: attach the SFA-ControlNet to CONDITIONING, for ComfyUI's own samplers."""

from __future__ import annotations

import nodes as comfy_nodes
from comfy_api.latest import io

from ..xpsr_core.pipeline.image import to_rgb
from .common import CATEGORY, XPSRControlNetType
from .tile_prompts import refuse_tile_prompts


def attach_control(positive: list, negative: list, control, image, strength: float, start_percent: float = 0.0,
                   end_percent: float = 1.0) -> tuple[list, list]:
    """ComfyUI's own ControlNet attachment, so positive and negative share one control and batch together."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent {start_percent} and end_percent {end_percent}: expected "
                         "0 <= start_percent <= end_percent <= 1")
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control, to_rgb(image), strength, start_percent, end_percent)


class XPSRApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRApply",
            display_name="XPSR Apply",
            category=CATEGORY,
            description="Attaches the XPSR ControlNet, reading the LR image, to the conditioning, so ComfyUI's own "
                        "KSampler or SamplerCustom samples with XPSR. Use the MODEL from XPSR Loader.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="From XPSR Dual Prompt Encode."),
                io.Conditioning.Input("negative", tooltip="From XPSR Dual Prompt Encode."),
                XPSRControlNetType.Input("xpsr_controlnet", tooltip="From XPSR Loader."),
                io.Image.Input("image", tooltip="The low-resolution image; it is stretched to the latent's size "
                                                "with bicubic resampling."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Conditioning scale of the ControlNet residuals (official 1.0)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the control starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the control ends."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The positive conditioning with the XPSR ControlNet attached, "
                                               "for KSampler or any sampler node."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="The negative conditioning with the XPSR ControlNet attached."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, xpsr_controlnet, image, strength: float, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        refuse_tile_prompts("XPSR Apply", positive=positive, negative=negative)
        return io.NodeOutput(*attach_control(positive, negative, xpsr_controlnet, image, strength, start_percent,
                                             end_percent))
