"""XPSR Loader: the SFA-ControlNet and the UNet's conditional attention, on the SD1.5 MODEL you already load."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, WEIGHT_DTYPE_CHOICES, XPSRControlNetType
from .model_files import list_models, load_xpsr, resolve
from .unet_patch import patch_model


class XPSRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRLoader",
            display_name="XPSR Loader",
            category=CATEGORY,
            description="Loads XPSR (the SFA-ControlNet and the UNet's conditional attention) from models/xpsr and "
                        "applies the conditional attention to an SD1.5 MODEL. Both are managed by ComfyUI like the "
                        "UNet: loaded for sampling, offloaded when memory is needed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model from Load Checkpoint (LoRAs and other patches are "
                                                "kept)."),
                io.Combo.Input("xpsr_model", options=list_models(),
                               tooltip="The single file from `python -m xpsr_core.weights.convert`, or an official "
                                       "XPSR checkpoint folder (with controlnet/ and unet/), under models/xpsr."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPE_CHOICES), default="auto",
                               tooltip="Precision of the XPSR weights in memory; auto follows the MODEL. "
                                       "fp8_e4m3fn stores them in fp8 (a quarter of fp32) and computes in the "
                                       "MODEL's dtype."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with XPSR's conditional attention."),
                XPSRControlNetType.Output(display_name="xpsr_controlnet",
                                         tooltip="The SFA-ControlNet, for XPSR Apply or XPSR Sampler."),
            ],
        )

    @classmethod
    def execute(cls, model, xpsr_model: str, weight_dtype: str) -> io.NodeOutput:
        control, attention = load_xpsr(resolve(xpsr_model), model, weight_dtype)
        return io.NodeOutput(patch_model(model, attention), control)
