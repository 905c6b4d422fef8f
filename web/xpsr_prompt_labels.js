// XPSR Dual Prompt Encode has five prompt boxes. A multiline widget shows its name only as the
// placeholder of an empty box, so once filled the boxes look alike: each gets a small label in its
// top corner. Frontends that draw labels themselves (Nodes 2.0) never mount these textareas.
import { app } from "../../scripts/app.js";

const NODE = "XPSRDualPromptEncode";
const LABEL = "xpsr-prompt-label";

function addLabel(textarea, text) {
  const box = textarea.parentElement;
  if (!box || box.querySelector(`:scope > .${LABEL}`)) return;
  const label = document.createElement("div");
  label.className = LABEL;
  label.textContent = text;
  Object.assign(label.style, {
    position: "absolute", top: "1px", left: "4px", width: "auto", height: "auto", pointerEvents: "none",
    fontSize: "10px", lineHeight: "12px", opacity: "0.65", color: "var(--input-text, #ddd)",
  });
  textarea.style.paddingTop = "13px";
  box.prepend(label);
}

app.registerExtension({
  name: "comfyui-xpsr.promptLabels",
  nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    const draw = node.onDrawForeground;
    // The frontend mounts a textarea into its positioned box only when the node is first drawn.
    node.onDrawForeground = function (...args) {
      for (const widget of this.widgets ?? []) {
        if (widget.element instanceof HTMLTextAreaElement) addLabel(widget.element, widget.label || widget.name);
      }
      return draw?.apply(this, args);
    };
  },
});
