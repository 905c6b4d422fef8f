"""XPSR Prompt Lines: typed prompts, one per line, as the STRING list XPSR Caption gives (one per image or tile)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY


class XPSRPromptLines(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRPromptLines",
            display_name="XPSR Prompt Lines",
            category=CATEGORY,
            description="Typed prompts, one per line, as a list for XPSR Dual Prompt Encode: one per image of a "
                        "batch, or, with a tile grid, one per tile in the grid's order: column by column, top to "
                        "bottom then left to right (XPSR Tile Grid's tiles output shows it).",
            inputs=[io.String.Input("text", multiline=True, default="",
                                    tooltip="One prompt per line; an empty line is an empty prompt.")],
            outputs=[io.String.Output(display_name="prompts", is_output_list=True,
                                      tooltip="The lines, in order, for XPSR Dual Prompt Encode's high_level or "
                                              "low_level."),
                     io.Int.Output(display_name="count", tooltip="How many prompts.")],
        )

    @classmethod
    def execute(cls, text: str) -> io.NodeOutput:
        lines = text.splitlines()
        if not lines:
            raise ValueError("text is empty; expected one prompt per line")
        return io.NodeOutput(lines, len(lines))
