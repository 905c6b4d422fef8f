"""The trainer on a tiny SD1.5-shaped base: official start, learning, exact resume, checkpoints, loaders, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tiny_sd15 import build_dataset, build_tiny_base, image_tensor
from xpsr_core import build_models, load_checkpoint
from xpsr_core.errors import CheckpointError
from xpsr_core.models.conditional_attention import ConditionalAttention
from xpsr_core.training import ConfigError, Trainer, load_train_config, train_config_from_dict
from xpsr_core.training.__main__ import main
from xpsr_core.training.data import PairedDataset, collate
from xpsr_core.training.from_unet import controlnet_from_unet
from xpsr_core.training.objective import batch_loss, training_alphas_cumprod
from xpsr_core.weights.sd15 import load_sd15

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_base(root), build_dataset(root / "data", without_gt_caption=("rocket",))


@pytest.fixture(scope="module")
def base(tiny):
    return load_sd15(tiny[0].folder)


def config(tiny, output: Path, **overrides):
    values = dict(pretrained_model=str(tiny[0].folder), train_data_dir=str(tiny[1]), output_dir=str(output),
                  resolution=64, progress_bar=False, learning_rate=1e-3, lr_warmup_steps=2, max_train_steps=6,
                  checkpointing_steps=3, original_image_ratio=0.5)
    values.update(overrides)
    return train_config_from_dict(values)


def official_source(key: str) -> str | None:
    """The report's from_unet rule, written out: the UNet tensor a ControlNet tensor starts as, if any."""
    if not key.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")):
        return None
    if re.search(r"\.attentions_connect\..*\.attn2\.to_[kv]\.", key):
        return None
    return re.sub(r"\.attentions_(lowlevel|connect)\.", ".attentions.", key)


def test_initialisation_follows_the_official_from_unet_rules(base):
    torch.manual_seed(0)
    controlnet = controlnet_from_unet(base.unet).state_dict()
    unet = base.unet.state_dict()
    copied = {k for k in controlnet if official_source(k) is not None}
    for key in copied:
        assert torch.equal(controlnet[key], unet[official_source(key)]), key
    lowlevel = ".attentions_lowlevel."
    assert {k for k in copied if lowlevel in k} == {k for k in controlnet if lowlevel in k}
    zero = {k for k in controlnet if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.",
                                                   "controlnet_cond_embedding.conv_out."))}
    assert len(zero) == 2 * (8 + 1) + 2 and all(not controlnet[k].any() for k in zero)
    fresh = [k for k in controlnet if k not in copied | zero and k.endswith("weight")]
    assert any("to_rgbs" in k for k in fresh) and any("conv_degradation" in k for k in fresh)
    assert all(controlnet[k].abs().sum() > 0 for k in fresh)  # torch's default random initialisation
    kv = [k for k in controlnet if official_source(k) is None and ".attentions_connect." in k]
    assert len(kv) == 2 * 4  # (3 blocks x 1 layer + mid) x (to_k, to_v)
    block0 = "down_blocks.0.attentions_connect.0.transformer_blocks.0.attn2.to_k.weight"
    text_k = unet[block0.replace("attentions_connect", "attentions")]
    assert controlnet[block0].shape == text_k.shape  # C = 32 = the text width here: not copied all the same
    assert not torch.equal(controlnet[block0], text_k)
    conditional = ConditionalAttention(base.unet.config)
    out_weights = [v for k, v in conditional.state_dict().items() if k.endswith("proj_out.weight")]
    assert len(out_weights) == 8 and all(w.abs().sum() > 0 for w in out_weights)  # random, not zero-init


def test_dataset_follows_the_official_sample_rules(tiny):
    data = tiny[1]
    always_hr = PairedDataset([str(data)], 64, "caption", 1.0, seed=0)
    never_hr = PairedDataset([str(data)], 64, "empty", 0.0, seed=0)
    names = [r.name for r in never_hr.records]
    i, rocket = names.index("astronaut"), names.index("rocket")
    hr, lr = image_tensor(data / "HR" / "astronaut.png"), image_tensor(data / "LR" / "astronaut.png")
    sample = never_hr[(i, 0)]
    assert torch.equal(sample["control"], lr) and torch.equal(sample["target"], hr * 2 - 1)
    assert sample["highlevel_prompt"] == "" and sample["lowlevel_prompt"] == "slightly blurry, some noise, fair quality"
    sample = always_hr[(i, 0)]
    assert torch.equal(sample["control"], hr)
    assert sample["lowlevel_prompt"] == "sharp and clean, high quality"
    assert sample["highlevel_prompt"] == "an astronaut in a white suit in front of a flag"
    assert always_hr[(rocket, 0)]["lowlevel_prompt"] == "very blurry, colours washed out"  # no GT caption: LR one


def fixed_batch_loss(trainer: Trainer, batch: dict, draws: int = 8) -> float:
    generators = [torch.Generator().manual_seed(123 + i) for i in range(len(batch["keys"]))]
    with torch.no_grad():
        losses = [batch_loss(trainer.trainable, trainer.base, batch, generators, training_alphas_cumprod(),
                             trainer.objective).loss for _ in range(draws)]
    return float(torch.stack(losses).mean())


def test_thirty_steps_on_a_fixed_batch_lower_the_loss(tiny, base, tmp_path):
    data = build_dataset(tmp_path / "two", names=("astronaut", "coffee"))
    trainer = Trainer(config(tiny, tmp_path / "run", train_data_dir=str(data), train_batch_size=2,
                             gradient_accumulation_steps=1, max_train_steps=30, checkpointing_steps=100,
                             lr_warmup_steps=0, original_image_ratio=0.0), base)
    batch = collate([trainer.dataset[(i, 0)] for i in range(2)])
    before = fixed_batch_loss(trainer, batch)
    records = trainer.run()
    after = fixed_batch_loss(trainer, batch)
    assert len(records) == 30 and all(r["lr"] == 1e-3 for r in records)
    assert after < 0.8 * before, (before, after)
    assert records[-1]["dfc"] < records[0]["dfc"]


def test_resume_continues_the_same_run(tiny, base, tmp_path):
    whole = Trainer(config(tiny, tmp_path / "whole", gradient_accumulation_steps=2), base).run()
    first = Trainer(config(tiny, tmp_path / "split", gradient_accumulation_steps=2, max_train_steps=3), base).run()
    resumed_trainer = Trainer(config(tiny, tmp_path / "split", gradient_accumulation_steps=2,
                                     resume_from_checkpoint="latest"), base)
    assert resumed_trainer.global_step == 3
    rest = resumed_trainer.run()
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert first + rest == whole  # bit-identical losses and learning rates
    assert (tmp_path / "split" / "loss_log.jsonl").read_text() == (tmp_path / "whole" / "loss_log.jsonl").read_text()
    a = load_checkpoint(tmp_path / "whole" / "checkpoint-6")
    b = load_checkpoint(tmp_path / "split" / "checkpoint-6")
    for key, tensor in {**a.controlnet, **a.conditional_attention}.items():
        assert torch.equal(tensor, {**b.controlnet, **b.conditional_attention}[key]), key


def test_checkpoint_folder_and_single_file_reproduce_the_trained_modules(tiny, base, tmp_path):
    trainer = Trainer(config(tiny, tmp_path / "run", max_train_steps=2, checkpointing_steps=2), base)
    trainer.run()
    folder = tmp_path / "run" / "checkpoint-2"
    unet_weights = load_checkpoint(folder)
    official_unet = json.loads((folder / "unet" / "config.json").read_text())
    assert official_unet["up_use_lowlevel_prompt"] == [False] * 4 and official_unet["_class_name"] == \
        "UNet2DConditionModel"
    from safetensors.torch import load_file

    full_unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(full_unet[k], v) for k, v in base.unet.state_dict().items())
    g = torch.Generator().manual_seed(5)
    latent, image = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    c_h, c_l, t = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([10, 700])

    @torch.no_grad()
    def eps(controlnet, conditional):
        out = controlnet(latent, t, c_h, image, c_l, return_dfc=True)
        return out, base.unet(latent, t, c_h, out.down_residuals, out.mid_residual, conditional)

    ref_out, ref_eps = eps(trainer.trainable.controlnet, trainer.trainable.conditional_attention)
    assert ref_out.mid_residual.abs().max() > 0  # trained away from the zero init
    for ckpt in (unet_weights, load_checkpoint(folder / "xpsr.safetensors")):
        out, e = eps(*build_models(ckpt))
        torch.testing.assert_close(e, ref_eps, rtol=0, atol=0)
        for a, b in zip(out.down_residuals, ref_out.down_residuals, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_file_base_equals_the_diffusers_folder(tiny, base):
    single = load_sd15(tiny[0].single_file, configs=tiny[0].folder)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(base, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    prompts = ["the cat in an ocean", ""]
    torch.testing.assert_close(single.encode_prompts(prompts), base.encode_prompts(prompts), rtol=0, atol=0)


def test_gradient_checkpointing_and_bf16_autocast_train(tiny, base, tmp_path):
    plain = Trainer(config(tiny, tmp_path / "plain", max_train_steps=2, checkpointing_steps=10), base).run()
    recomputed = Trainer(config(tiny, tmp_path / "ckpt", max_train_steps=2, checkpointing_steps=10,
                                gradient_checkpointing=True), base).run()
    for a, b in zip(plain, recomputed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    bf16 = Trainer(config(tiny, tmp_path / "bf16", max_train_steps=1, mixed_precision="bf16",
                          dfc_form="paper"), base).run()
    assert torch.isfinite(torch.tensor(bf16[0]["loss"]))
    assert next(Trainer(config(tiny, tmp_path / "x"), base).trainable.parameters()).dtype == torch.float32


def test_example_config_is_valid_and_official():
    cfg = load_train_config(REPO / "configs" / "train_example.yaml")
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_weight_decay, cfg.adam_epsilon) == \
        (5e-5, 0.9, 0.999, 1e-2, 1e-8)
    assert (cfg.lr_warmup_steps, cfg.max_grad_norm, cfg.train_batch_size, cfg.gradient_accumulation_steps) == \
        (500, 1.0, 2, 2)
    assert (cfg.original_image_ratio, cfg.dfc_form, cfg.dfc_weight, cfg.highlevel_prompt) == \
        (0.1, "official", 0.05, "empty")


@pytest.mark.parametrize("change, message", [
    ({"learning_rte": 1e-4}, "unknown key 'learning_rte'"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' is 'fp8'; expected one of no, fp16, bf16"),
    ({"max_train_steps": "many"}, "'max_train_steps' is 'many' (str); expected int"),
    ({"resolution": 60}, "expected a multiple of 8"),
    ({"highlevel_prompt": "llava"}, "expected one of empty, caption"),
    ({"pretrained_model": None}, "'pretrained_model' is required"),
    ({"original_image_ratio": 1.5}, "expected 0 to 1"),
])
def test_config_errors_name_the_key(tiny, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(tiny, tmp_path, **change)


def test_data_and_model_errors_name_the_file(tiny, base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty: expected the official layout <root>/HR/<name>.png"):
        Trainer(config(tiny, tmp_path / "o", train_data_dir=str(empty)), base)
    data = build_dataset(tmp_path / "nocap", names=("coffee", "chelsea"))
    (data / "lowlevel_prompt_q" / "chelsea.txt").unlink()
    with pytest.raises(ConfigError, match=r"lowlevel_prompt_q/chelsea.txt: caption file missing"):
        Trainer(config(tiny, tmp_path / "o", train_data_dir=str(data)), base)
    with pytest.raises(ConfigError, match="smaller than the training resolution 128"):
        Trainer(config(tiny, tmp_path / "o", resolution=128), base).run()
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, sdxl)
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors: this is an SDXL checkpoint"):
        load_sd15(sdxl)
    with pytest.raises(CheckpointError, match="holds no tokenizer"):
        load_sd15(tiny[0].single_file)
    with pytest.raises(CheckpointError, match=r"missing key .*; it does not have the shape of the SD1.5 UNet config "
                                              r"\(base_configs"):
        load_sd15(tiny[0].single_file, tokenizer=tiny[0].tokenizer)  # SD1.5's configs by default
    with pytest.raises(CheckpointError, match=r"missing the subfolder\(s\) unet/"):
        load_sd15(empty)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrained_model: x\ntrain_data_dir: y\noutput_dir: z\nseed: [1]\n")
    assert main(["--config", str(bad)]) == 2
    assert "bad.yaml: 'seed' is [1] (list); expected int" in capsys.readouterr().err
