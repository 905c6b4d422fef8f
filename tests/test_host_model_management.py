"""XPSR's parts are models ComfyUI manages like its own: held by the patcher class ComfyUI holds its own models in,
built only from layers whose weights ComfyUI casts (so dynamic VRAM streams them), cloned per GPU with the MODEL and
its ControlNets, and sharing nothing mutable between two XPSR MODELs of one graph.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.controlnet
import comfy.model_patcher
import comfy.ops
import comfy.utils

from parity import assert_parity, parity_fixture
from test_host_native import CASE, case_inputs, conditional_attention_of
from test_host_parity import conditioning, evaluate_once, with_control, xpsr_model

CPU = torch.device("cpu")
multi_gpu = pytest.mark.host_feature("multi-GPU cloning (ComfyUI 0.24 and later)",
                                     hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"))


def parts(model, control) -> dict[str, torch.nn.Module]:
    return {"controlnet": control.control_model, "conditional_attention": conditional_attention_of(model)}


def test_xpsr_parts_are_held_by_the_patcher_class_comfyui_holds_its_own_models_in(monkeypatch):
    """Where ComfyUI has dynamic VRAM (0.16 and later) main.py rebinds CoreModelPatcher to its streaming patcher:
    both XPSR parts take whatever it is bound to when they load, as ComfyUI's own ControlNet does."""

    class Rebound(comfy.model_patcher.ModelPatcher):
        pass

    core = hasattr(comfy.model_patcher, "CoreModelPatcher")
    if core:
        monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Rebound)
    model, control = xpsr_model()
    attention = model.get_additional_models_with_key(H.pack_module("nodes.unet_patch").PATCH_KEY)[0]
    stock = comfy.controlnet.ControlNet(torch.nn.Linear(1, 1), load_device=CPU)
    assert type(control.control_model_wrapped) is type(stock.control_model_wrapped)
    assert type(attention) is type(stock.control_model_wrapped)
    assert type(attention) is (Rebound if core else comfy.model_patcher.ModelPatcher)
    assert attention.model is conditional_attention_of(model) and control.control_model_wrapped.model is (
        control.control_model)


@pytest.mark.parametrize("weight_dtype", ["auto", "fp8_e4m3fn"])
def test_every_weight_of_xpsr_parts_lies_in_a_layer_whose_weights_comfyui_casts(weight_dtype: str):
    """Dynamic VRAM streams a layer's weights only where the layer has ComfyUI's cast-weights support (built from
    comfy.ops); any other weight-holding module is loaded whole."""
    model, control = H.pack_module("nodes.loader").XPSRLoader.execute(H.make_model(), H.XPSR_FILE,
                                                                       weight_dtype).args
    for part, module in parts(model, control).items():
        holders = {name: m for name, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None}
        assert sum(p.numel() for m in holders.values() for p in m.parameters(recurse=False)) == sum(
            p.numel() for p in module.parameters())
        assert len(holders) > 50, part
        assert [name for name, m in holders.items() if not hasattr(m, "comfy_cast_weights")] == [], part
    assert not hasattr(torch.nn.Linear(1, 1), "comfy_cast_weights")  # what the check tells apart


@H.deferred_layer_weights
@pytest.mark.parametrize("weight_dtype", ["auto", "fp8_e4m3fn"])
def test_xpsr_parts_get_every_weight_where_dynamic_vram_builds_layers_without_them(monkeypatch, weight_dtype: str):
    """Under dynamic VRAM ComfyUI's Linear layers are built with no weight, which only a state dict loaded into
    them gives (a benchmark that filled parameters in place crashed on an H200 at the first step): XPSR Loader's
    parts come out with the same weights as without dynamic VRAM."""
    loader = H.pack_module("nodes.loader").XPSRLoader
    whole = {part: module.state_dict() for part, module in parts(*loader.execute(
        H.make_model(), H.XPSR_FILE, weight_dtype).args).items()}
    monkeypatch.setattr(importlib.import_module("comfy.memory_management"), "aimdo_enabled", True)
    assert comfy.ops.disable_weight_init.Linear(2, 2).weight is None  # what dynamic VRAM does to a layer
    deferred = parts(*loader.execute(H.make_model(), H.XPSR_FILE, weight_dtype).args)
    for part, module in deferred.items():
        assert [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is None
                ] == [], part
        state = module.state_dict()
        assert state.keys() == whole[part].keys(), part
        assert all(torch.equal(state[k], whole[part][k]) and state[k].dtype == whole[part][k].dtype
                   for k in state), part


def perturbed_copy(name: str) -> str:
    """The tiny XPSR file with every weight moved a little (a second XPSR model), under models/xpsr as ``name``."""
    H.setup_host()
    source = H.folder_paths.get_full_path("xpsr", H.XPSR_FILE)
    with safe_open(source, "pt") as f:
        metadata = f.metadata()
        generator = torch.Generator().manual_seed(5)
        tensors = {key: f.get_tensor(key) + 0.05 * torch.randn(f.get_slice(key).get_shape(), generator=generator)
                   for key in f.keys()}
    save_file(tensors, H.folder_paths.get_folder_paths("xpsr")[0] + "/" + name, metadata=metadata)
    return name


def test_two_xpsr_loaders_on_one_model_in_one_graph_each_sample_with_their_own():
    """Two XPSR files (and strengths) on one MODEL in one prompt: each branch gives what it gives alone."""
    other = perturbed_copy("xpsr_tiny_other.safetensors")
    first = H.graph(seed=3)
    second = H.graph(seed=3, control_strength=0.7)
    second["2"]["inputs"]["xpsr_model"] = other
    both = copy.deepcopy(first) | {f"1{key}": copy.deepcopy(second[key]) for key in ("2", "5", "6")}
    both["12"]["inputs"]["model"] = ["1", 0]
    both["15"]["inputs"] |= {"model": ["12", 0], "xpsr_controlnet": ["12", 1], "image": ["4", 0]}
    both["16"]["inputs"]["images"] = ["15", 0]
    together, _ = H.run_ok(both)
    alone = {branch: H.output(H.run_ok(prompt)[0], "5") for branch, prompt in (("first", first), ("second", second))}
    assert_parity(H.output(together, "5"), alone["first"], "first branch, in one prompt with the second")
    assert_parity(H.output(together, "15"), alone["second"], "second branch, in one prompt with the first")
    assert (alone["first"] - alone["second"]).abs().max() > 1e-2  # the two XPSR models differ


@multi_gpu
@torch.no_grad()
def test_a_models_clone_for_another_device_holds_its_own_xpsr_weights_and_computes_the_same():
    model, control = xpsr_model()
    patch_key = H.pack_module("nodes.unet_patch").PATCH_KEY
    clone = model.deepclone_multigpu(new_load_device=CPU)
    own, cloned = conditional_attention_of(model), conditional_attention_of(clone)
    assert clone.model is not model.model and cloned is not own
    assert clone.get_additional_models_with_key(patch_key)[0].load_device == CPU
    for (name, a), (_, b) in zip(own.state_dict().items(), cloned.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    for i in range(len(own)):
        name = f"diffusion_model.output_blocks.{i}"
        marked = {k: m for k, m in clone.object_patches[name].named_children() if k != "xpsr_conditional_attention"}
        assert marked == dict(comfy.utils.get_attr(clone.model, name).named_children()), name
    reference = evaluate_once(model, *case_inputs(model, control), cfg=4.5)
    assert_parity(evaluate_once(clone, *case_inputs(clone, control), cfg=4.5), reference, "the clone's eps")
    for p in own.parameters():
        p.zero_()
    assert_parity(evaluate_once(clone, *case_inputs(clone, control), cfg=4.5), reference,
                  "the clone's eps once the first device's conditional attention is zeroed")


@multi_gpu
@torch.no_grad()
def test_the_xpsr_controlnets_clone_for_another_device_is_an_xpsr_controlnet_of_its_own():
    model, control = xpsr_model()
    clone = control.deepclone_multigpu(CPU, autoregister=True)
    assert type(clone) is type(control) and control.get_instance_for_device(CPU) is clone
    assert clone.control_model is not control.control_model
    assert clone.control_model_wrapped.load_device == CPU
    for (name, a), (_, b) in zip(control.control_model.state_dict().items(),
                                 clone.control_model.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert_parity(evaluate_once(model, *case_inputs(model, clone), cfg=4.5),
                  evaluate_once(model, *case_inputs(model, control), cfg=4.5), "eps with the ControlNet's clone")


def record_calls(modules: list[torch.nn.Module], calls: list[torch.nn.Module]) -> list:
    """Hooks that note each module called (the module itself: a deep copy made later carries the hook along)."""
    return [m.register_forward_pre_hook(lambda module, args: calls.append(module)) for m in modules]


@multi_gpu
@pytest.mark.parametrize("tiles", [False, True], ids=["whole", "tiled"])
@torch.no_grad()
def test_multi_gpu_sampling_runs_every_xpsr_part_on_the_devices_clone(tiles: bool):
    """ComfyUI's multi-GPU sampling with a MODEL cloned for the CPU: every model call runs on the clone (UNet,
    conditional attention, the ControlNet's own clone), none on the first device's, and gives the same eps."""
    model, control = xpsr_model()
    case = parity_fixture().case(CASE)
    latent = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    prompts = conditioning(case["c_h"], case["c_l"])
    positive, negative = with_control(control, prompts, prompts, H.test_image(192, 320, seed=4).movedim(-1, 1),
                                      case.scale)
    sigma = model.get_model_object("model_sampling").sigmas[torch.tensor([500, 500])]
    reference = evaluate_once(H.with_latent_tiles(model)[0] if tiles else model, positive, negative, latent, sigma,
                              cfg=4.5)
    multi = H.clone_for_another_device(H.with_latent_tiles(model)[0] if tiles else model, CPU)
    device_model = multi.get_additional_models_with_key("multigpu")[0]
    first = [model.model.diffusion_model, conditional_attention_of(model), control.control_model]
    calls: list[torch.nn.Module] = []
    hooks = record_calls([*first, device_model.model.diffusion_model, conditional_attention_of(device_model)], calls)
    try:
        eps = evaluate_once(multi, positive, negative, latent, sigma, cfg=4.5)
    finally:
        for hook in hooks:
            hook.remove()
    device_control = positive[0][1]["control"].get_instance_for_device(CPU)
    assert type(device_control) is type(control) and device_control.control_model is not control.control_model
    ran = {id(m) for m in calls}
    assert ran == {id(device_model.model.diffusion_model), id(conditional_attention_of(device_model)),
                   id(device_control.control_model)}
    assert not ran & {id(m) for m in first}
    assert_parity(eps, reference, "eps through ComfyUI's multi-GPU sampling on the clone")


@multi_gpu
def test_the_xpsr_graph_through_a_multi_gpu_model_gives_the_same_image():
    """XPSR Loader -> ComfyUI's multi-GPU cloning (for the CPU) -> XPSR Sampler with latent tiles."""
    plain = H.graph(tile_size=16, tile_overlap=4, seed=9)
    multi = H.graph(tile_size=16, tile_overlap=4, seed=9) | {
        "9": {"class_type": "XPSRTestCloneForCPU", "inputs": {"model": ["2", 0]}}}
    multi["5"]["inputs"]["model"] = ["9", 0]
    images = [H.output(H.run_ok(prompt)[0], "5") for prompt in (plain, multi)]
    assert_parity(images[1], images[0], "the image sampled through the multi-GPU MODEL")
