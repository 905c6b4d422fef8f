"""A trained checkpoint loads through ComfyUI's XPSR Loader and predicts what the trainer's modules predict."""

from __future__ import annotations

import shutil

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH

from parity import assert_parity, parity_fixture
from test_host_parity import conditioning, evaluate_once, with_control
from tiny_sd15 import build_dataset, build_tiny_base
from xpsr_core.training import Trainer, train_config_from_dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trainer:
    """Two steps on the tiny base, whose UNet is the fixture UNet the host's MODEL is built from."""
    root = tmp_path_factory.mktemp("host_train")
    tiny = build_tiny_base(root)
    config = train_config_from_dict(dict(
        pretrained_model=str(tiny.folder), train_data_dir=str(build_dataset(root / "data")),
        output_dir=str(root / "run"), resolution=64, max_train_steps=2, checkpointing_steps=2, learning_rate=1e-3,
        lr_warmup_steps=0, progress_bar=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from threads and lose much on shared CPUs
    try:
        trainer = Trainer(config)
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    H.setup_host()
    checkpoint = root / "run" / "checkpoint-2"
    shutil.copy(checkpoint / "xpsr.safetensors", H.WORK / "models_xpsr" / "trained_tiny.safetensors")
    shutil.copytree(checkpoint, H.WORK / "models_xpsr" / "trained_tiny_run" / "checkpoint-2")
    return trainer


@pytest.mark.parametrize("name", ["trained_tiny.safetensors", "trained_tiny_run/checkpoint-2"])
def test_trained_checkpoint_runs_in_comfyui_like_the_trainer(trained: Trainer, name: str):
    assert name in H.pack_module("nodes.model_files").list_models()
    model, control = H.pack_module("nodes.loader").XPSRLoader.execute(H.make_model(), name, "auto").args
    case = parity_fixture().case(1)
    sigma = model.get_model_object("model_sampling").sigmas[case["timestep"]]
    cond = conditioning(case["c_h"], case["c_l"])
    positive, negative = with_control(control, cond, cond, case["control_image"], case.scale)
    with torch.no_grad():
        eps = evaluate_once(model, positive, negative, case["latent"], sigma, cfg=1.0)
        out = trained.trainable.controlnet(case["latent"], case["timestep"], case["c_h"], case["control_image"],
                                           case["c_l"], conditioning_scale=case.scale)
        expected = trained.base.unet(case["latent"], case["timestep"], case["c_h"], out.down_residuals,
                                     out.mid_residual, trained.trainable.conditional_attention)
    assert out.mid_residual.abs().max() > 0  # the zero convs have left zero, so the ControlNet takes part
    assert_parity(eps, expected, f"{name}: eps")
