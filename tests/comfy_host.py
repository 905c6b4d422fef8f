"""ComfyUI as a test host: imported from COMFYUI_PATH, CPU only, with tiny models and the pack loaded as ComfyUI
loads it.

Tests that import this module are skipped, with the reason, when COMFYUI_PATH is unset.
The tiny MODEL is ComfyUI's own SD1.5 UNet class, shaped and weighted like the parity
fixture's UNet (its stock tensors converted with ComfyUI's key map); CLIP and VAE are
ComfyUI's classes with random weights. The pack's ``models/xpsr`` folder points at a
temporary folder holding the fixture converted to the pack's single file.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import sys
import tempfile
import textwrap
import types
import uuid
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: these tests need a ComfyUI checkout (see README, 'Running the tests')",
                allow_module_level=True)
sys.path.insert(0, COMFYUI_PATH)

from comfy.cli_args import args  # noqa: E402

args.cpu = True
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.utils  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

from parity import parity_fixture  # noqa: E402
from xpsr_core.weights.checkpoint import convert_official, load_official  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="xpsr_host_"))
XPSR_FILE = "xpsr_tiny.safetensors"


# Under dynamic VRAM (ComfyUI 0.16 and later) ComfyUI's Linear and Embedding layers are built with no weight until a
# state dict is loaded into them.
# Text generation from images by a CLIP (ComfyUI's Generate Text node), with Qwen3-VL: both after 0.3.64.
text_generation = pytest.mark.host_feature(
    "text generation from images by a CLIP, with Qwen3-VL (ComfyUI's Generate Text node, after 0.3.64)",
    importlib.util.find_spec("comfy.text_encoders.qwen3vl") is not None and hasattr(comfy.sd.CLIP, "generate"))
deferred_layer_weights = pytest.mark.host_feature(
    "layers without weights until a state dict is loaded, under dynamic VRAM (ComfyUI 0.16 and later)",
    hasattr(comfy.ops.disable_weight_init, "_lazy_load_from_state_dict"))


def _random_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI's ops leave weights uninitialised; give them small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def comfy_unet_config(diffusers_config) -> dict:
    """ComfyUI's SD15 unet_config for a diffusers-layout SD UNet config (the fixture's)."""
    base = diffusers_config.block_out_channels[0]
    layers = diffusers_config.layers_per_block
    n = len(diffusers_config.block_out_channels)
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": base,
        "num_res_blocks": [layers] * n, "channel_mult": [c // base for c in diffusers_config.block_out_channels],
        "transformer_depth": [1] * layers * (n - 1) + [0] * layers, "transformer_depth_middle": 1,
        "transformer_depth_output": [1] * (n - 1) * (layers + 1) + [0] * (layers + 1),
        "use_linear_in_transformer": False, "context_dim": diffusers_config.cross_attention_dim,
        "num_heads": diffusers_config.num_heads[0], "num_head_channels": -1,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def make_model(checkpoint: Path | None = None, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's SD1.5 MODEL in fp32 with the stock weights of an official checkpoint's UNet (the parity fixture's).

    It registers itself as the MODEL's ``cached_patcher_init``, as ComfyUI's loaders do, so ComfyUI can make the
    MODEL a copy of its own (for another GPU); the CPU has no dynamic VRAM to disable.
    """
    checkpoint = checkpoint or parity_fixture().checkpoint
    unet_config = comfy_unet_config(load_official(checkpoint).unet_config)
    config = comfy.supported_models.SD15(unet_config)
    config.unet_config["num_heads"] = unet_config["num_heads"]  # SD15 forces 8 heads in its constructor
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=mm.unet_offload_device())
    weights = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    key_map = comfy.utils.unet_to_diffusers(config.unet_config)
    state = {comfy_key: weights[diffusers_key] for diffusers_key, comfy_key in key_map.items()
             if diffusers_key in weights}
    missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    model.cached_patcher_init = (make_model, (checkpoint,))
    return model


def clone_for_another_device(model: comfy.model_patcher.ModelPatcher,
                             device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """``model`` set up as ComfyUI's multi-GPU support (comfy.multigpu.create_multigpu_deepclones) sets it up for one
    extra device, ``device``: a deep clone of the MODEL for that device, flagged and matched as its own does.

    On the CPU the clone's device is the main device too, so ComfyUI's multi-GPU sampling runs
    every model call on the clone: what the clone computes can be compared with the MODEL.
    """
    import comfy.multigpu  # ComfyUI 0.24 and later

    model = model.clone()
    device_clone = model.deepclone_multigpu(new_load_device=device)
    device_clone.is_multigpu_base_clone = True
    model.set_additional_models("multigpu", [device_clone])
    model.match_multigpu_clones()
    comfy.multigpu.GPUOptionsGroup().register(model)
    return model


def make_clip(width: int = 32) -> comfy.sd.CLIP:
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": {"hidden_size": width, "intermediate_size": 64, "num_attention_heads": 2,
                                       "num_hidden_layers": 2, "projection_dim": width}}
    clip = comfy.sd.CLIP(target, model_options=options)
    _random_init(clip.cond_stage_model, seed=1)
    return clip


def make_vae() -> comfy.sd.VAE:
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    sd = _random_init(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed=2).state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def make_clip_from_diffusers(base: Path) -> comfy.sd.CLIP:
    """ComfyUI's SD1.5 CLIP in fp32 from a diffusers folder's text_encoder/ and tokenizer/ (its own vocabulary)."""
    config = json.loads((base / "text_encoder" / "config.json").read_text())
    model_config = {key: config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                 "num_hidden_layers", "projection_dim", "hidden_act",
                                                 "max_position_embeddings", "vocab_size")}
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=functools.partial(
        comfy.sd1_clip.SDTokenizer, tokenizer_path=str(base / "tokenizer"), embedding_size=config["hidden_size"]))
    target = comfy.supported_models_base.ClipTarget(tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32, "clip_l_model_config": model_config})
    missing, unexpected = clip.load_sd(load_file(base / "text_encoder" / "model.safetensors"))
    # transformers' CLIPTextModel has no text projection; SD1.5 uses the hidden states, never the pooled output
    assert set(missing) <= {"text_projection.weight"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.zero_()
    return clip


def make_vae_from_diffusers(base: Path) -> comfy.sd.VAE:
    """ComfyUI's VAE in fp32 from a diffusers folder's vae/ (ComfyUI converts the diffusers keys itself)."""
    config = json.loads((base / "vae" / "config.json").read_text())
    ch = config["block_out_channels"][0]
    ddconfig = {"double_z": True, "z_channels": config["latent_channels"], "resolution": config["sample_size"],
                "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": ch,
                "ch_mult": [c // ch for c in config["block_out_channels"]],
                "num_res_blocks": config["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
    sd = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": config["latent_channels"]}},
                        dtype=torch.float32)


TINY_VLM_PACK = REPO / "tests" / "tiny_vlm_pack"
"""The tiny Qwen3-VL CLIP as a node (XPSRTestTinyQwen3VL), for in-process graphs and test servers alike."""

TEST_PACK = textwrap.dedent('''
    from pathlib import Path

    from typing_extensions import override
    from comfy_api.latest import ComfyExtension, io
    import comfy_host

    class XPSRTestTinySD15(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="XPSRTestTinySD15", category="testing", inputs=[],
                             outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

        @classmethod
        def execute(cls):
            return io.NodeOutput(comfy_host.make_model(), comfy_host.make_clip(), comfy_host.make_vae())

    class XPSRTestDiffusersSD15(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="XPSRTestDiffusersSD15", category="testing",
                             inputs=[io.String.Input("base"), io.String.Input("checkpoint")],
                             outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

        @classmethod
        def execute(cls, base, checkpoint):
            return io.NodeOutput(comfy_host.make_model(Path(checkpoint)),
                                 comfy_host.make_clip_from_diffusers(Path(base)),
                                 comfy_host.make_vae_from_diffusers(Path(base)))

    class XPSRTestImage(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="XPSRTestImage", category="testing",
                             inputs=[io.Int.Input("height"), io.Int.Input("width"), io.Int.Input("channels", default=3),
                                     io.Int.Input("batch", default=1), io.Int.Input("seed", default=0)],
                             outputs=[io.Image.Output()])

        @classmethod
        def execute(cls, height, width, channels, batch, seed):
            return io.NodeOutput(comfy_host.test_image(height, width, channels, batch, seed))

    class XPSRTestLines(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="XPSRTestLines", category="testing", inputs=[io.String.Input("text")],
                             outputs=[io.String.Output(is_output_list=True)])

        @classmethod
        def execute(cls, text):
            return io.NodeOutput(text.split("|"))

    class XPSRTestCloneForCPU(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="XPSRTestCloneForCPU", category="testing", inputs=[io.Model.Input("model")],
                             outputs=[io.Model.Output()])

        @classmethod
        def execute(cls, model):
            import torch
            return io.NodeOutput(comfy_host.clone_for_another_device(model, torch.device("cpu")))

    class _Ext(ComfyExtension):
        @override
        async def get_node_list(self):
            return [XPSRTestTinySD15, XPSRTestDiffusersSD15, XPSRTestImage, XPSRTestLines, XPSRTestCloneForCPU]

    async def comfy_entrypoint():
        return _Ext()
''')


def test_image(height: int, width: int, channels: int = 3, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A smooth random IMAGE (B, H, W, C) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(batch, channels, max(2, height // 4), max(2, width // 4), generator=g)
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear").movedim(1, -1)


class DummyServer:
    """What PromptExecutor and the progress hooks touch on ComfyUI's server."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


_loaded = False


def setup_host() -> None:
    """Load the pack and the test nodes once, the way ComfyUI loads custom nodes."""
    global _loaded
    if _loaded:
        return
    models = WORK / "models_xpsr"
    models.mkdir()
    convert_official(parity_fixture().checkpoint, models / XPSR_FILE)
    out = WORK / "output"
    out.mkdir()
    folder_paths.set_output_directory(str(out))
    folder_paths.set_temp_directory(str(out))
    folder_paths.folder_names_and_paths["xpsr"] = ([str(models)], {".safetensors"})
    test_pack = WORK / "xpsr_test_nodes"
    test_pack.mkdir()
    (test_pack / "__init__.py").write_text(TEST_PACK)
    sys.modules.setdefault("comfy_host", sys.modules[__name__])
    for pack in (REPO, test_pack, TINY_VLM_PACK):
        assert asyncio.run(nodes.load_custom_node(str(pack), ignore=set(nodes.NODE_CLASS_MAPPINGS))), pack
    _loaded = True


def pack_module(name: str):
    """A module of the pack as ComfyUI imported it (e.g. 'nodes.control')."""
    setup_host()
    return importlib.import_module(f"{str(REPO).replace('.', '_x_')}.{name}")


def with_latent_tiles(model: comfy.model_patcher.ModelPatcher, max_tiles: int | None = None) -> tuple:
    """A clone of ``model`` that evaluates XPSR's latent tiles (16 latent px, overlap 4) with a tiler of its own, as
    each XPSR Sampler run does; returns the clone and its tiler."""
    tiler = pack_module("nodes.tiled_sampling").TiledCondBatch(16, 4, max_tiles=max_tiles)
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_tiles", tiler)
    return clone, tiler


def validate(prompt: dict) -> tuple:
    """ComfyUI's validation of an API prompt (as the server validates a queued one), asserted to pass."""
    setup_host()
    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid[0], valid
    return valid


def run(prompt: dict, valid: tuple | None = None) -> tuple[execution.PromptExecutor, DummyServer]:
    """Execute an API prompt in a fresh executor, validated first unless ``valid`` is its validation."""
    valid = valid or validate(prompt)
    server = DummyServer()
    executor = pack_module("nodes.host_compat").prompt_executor(server)
    asyncio.run(executor.execute_async(prompt, str(uuid.uuid4()), extra_data={}, execute_outputs=valid[2]))
    return executor, server


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py as a fresh module (scripts/ is not a package), for tests that call its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs(executor: execution.PromptExecutor, node_id: str) -> list:
    """A node's outputs from the executor's last prompt, one list per output socket."""
    return pack_module("nodes.host_compat").node_outputs(executor, node_id)


def output(executor: execution.PromptExecutor, node_id: str, index: int = 0):
    return outputs(executor, node_id)[index][0]


def error_message(executor: execution.PromptExecutor) -> str:
    return next((str(data) for event, data in executor.status_messages if event == "execution_error"), "")


def graph(height: int = 37, width: int = 53, channels: int = 3, batch: int = 1, **sampler) -> dict:
    """Tiny SD1.5 -> XPSR Loader -> Dual Prompt Encode -> XPSR Sampler on a generated LR image."""
    settings = {"scale": 4.0, "process_size": 64, "seed": 0, "steps": 3, "cfg": 4.5, "sampler_name": "ddpm",
                "scheduler": "xpsr_official", "start": "official", "denoise": 1.0, "control_strength": 1.0,
                "tile_size": 320, "tile_overlap": 8, "vae_tiling": "auto", "color_fix": "adain"} | sampler
    return {
        "1": {"class_type": "XPSRTestTinySD15", "inputs": {}},
        "2": {"class_type": "XPSRLoader", "inputs": {"model": ["1", 0], "xpsr_model": XPSR_FILE,
                                                      "weight_dtype": "auto"}},
        "3": {"class_type": "XPSRDualPromptEncode", "inputs": {
            "clip": ["1", 1], "high_level": "a (red) brick wall", "low_level": "blurry and noisy",
            "added_prompt": "clean, high-resolution", "negative_high": "blurry", "negative_low": "high resolution",
            "token_mode": "official", "lowlevel_cfg": "official"}},
        "4": {"class_type": "XPSRTestImage", "inputs": {"height": height, "width": width, "channels": channels,
                                                         "batch": batch, "seed": 0}},
        "5": {"class_type": "XPSRSampler", "inputs": {
            "model": ["2", 0], "xpsr_controlnet": ["2", 1], "positive": ["3", 0], "negative": ["3", 1],
            "image": ["4", 0], "vae": ["1", 2], **settings}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def run_ok(prompt: dict) -> tuple[execution.PromptExecutor, DummyServer]:
    executor, server = run(prompt)
    assert executor.success, error_message(executor)
    return executor, server


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def ui_to_api(workflow: dict) -> dict:
    """A UI-format workflow as an API prompt, read through the node schemas ComfyUI reports.

    Widget values are stored by position; each node's INPUT_TYPES says which inputs are
    widgets and which of them carry a control_after_generate value after them.
    """
    setup_host()
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        spec = nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, (kind, *rest) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            options = rest[0] if rest else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                inputs[name] = next(values)
                if options.get("control_after_generate"):
                    next(values)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
