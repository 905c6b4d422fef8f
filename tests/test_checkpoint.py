"""Loading, converting and refusing checkpoints; every refusal names the file, the key and the expectation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity import ParityFixture
from xpsr_core import CheckpointError, convert_official, load_checkpoint
from xpsr_core.weights.checkpoint import (
    CONDITIONAL_PREFIX,
    CONTROLNET_PREFIX,
    build_models,
    load_official,
    save_single_file,
    single_file_metadata,
)
from xpsr_core.weights.safetensors_io import read_header

ROOT = Path(__file__).resolve().parents[1]
BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def copy_official(oracle: ParityFixture, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoint-1"
    shutil.copytree(oracle.checkpoint, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def edit_weights(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


# --- converter ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_converter_round_trip_keeps_every_tensor(oracle: ParityFixture, tmp_path: Path, dtype: torch.dtype):
    official = load_official(oracle.checkpoint)
    out = tmp_path / "xpsr.safetensors"
    convert_official(oracle.checkpoint, out, dtype)
    loaded = load_checkpoint(out)
    assert loaded.controlnet_config == official.controlnet_config
    assert loaded.unet_config == official.unet_config
    for part in ("controlnet", "conditional_attention"):
        ref, got = getattr(official, part), getattr(loaded, part)
        assert ref.keys() == got.keys()
        for k in ref:
            assert got[k].dtype == dtype
            assert torch.equal(got[k], ref[k].to(dtype)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_converted_file_size_is_parameters_times_dtype_bytes_plus_header(oracle: ParityFixture, tmp_path: Path,
                                                                          dtype: torch.dtype):
    official = load_official(oracle.checkpoint)
    params = sum(t.numel() for part in (official.controlnet, official.conditional_attention) for t in part.values())
    assert params == 1_869_821 + 591_040 or oracle.root.name != "xpsr_tiny_official"
    out = tmp_path / "xpsr.safetensors"
    size = convert_official(oracle.checkpoint, out, dtype)
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    assert size == out.stat().st_size == params * BYTES[dtype] + 8 + header_len


def test_converter_holds_only_controlnet_and_conditional_attention(oracle: ParityFixture, tmp_path: Path):
    out = tmp_path / "xpsr.safetensors"
    convert_official(oracle.checkpoint, out)
    keys = read_header(out).tensors
    assert all(k.startswith((CONTROLNET_PREFIX, CONDITIONAL_PREFIX)) for k in keys)
    unet_keys = load_file(oracle.checkpoint / "unet" / "diffusion_pytorch_model.safetensors").keys()
    pixel = {k for k in unet_keys if ".pixel_attentions." in k}
    assert {k[len(CONDITIONAL_PREFIX):] for k in keys if k.startswith(CONDITIONAL_PREFIX)} == pixel


def test_converter_command_line(oracle: ParityFixture, tmp_path: Path):
    out = tmp_path / "xpsr_fp16.safetensors"
    run = subprocess.run([sys.executable, "-m", "xpsr_core.weights.convert", str(oracle.checkpoint), str(out),
                          "--dtype", "fp16"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "fp16" in run.stdout
    assert all(t.dtype == torch.float16 for t in load_checkpoint(out).controlnet.values())


def test_converter_command_line_reports_a_bad_folder(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "xpsr_core.weights.convert", str(tmp_path),
                          str(tmp_path / "o.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1
    assert str(tmp_path) in run.stderr and "controlnet/ and unet/" in run.stderr


def test_converter_refuses_a_unet_whose_rest_is_not_stock_sd(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    edit_weights(unet, lambda t: t.pop("conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"unet.*missing key 'conv_out.bias' \(expected shape \[4\]\)") as e:
        convert_official(folder, tmp_path / "o.safetensors")
    assert str(unet) in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_save_single_file_round_trip(oracle: ParityFixture, tmp_path: Path):
    official = load_official(oracle.checkpoint)
    save_single_file(official, tmp_path / "a.safetensors", torch.bfloat16)
    again = load_checkpoint(tmp_path / "a.safetensors", dtype=torch.float32)
    k = next(iter(official.controlnet))
    assert torch.equal(again.controlnet[k], official.controlnet[k].to(torch.bfloat16).float())


def test_built_modules_own_aligned_weights(oracle: ParityFixture, tmp_path: Path):
    """Not views into the file's buffer: unaligned weights make CPU kernels round differently (and run slower)."""
    convert_official(oracle.checkpoint, tmp_path / "x.safetensors")
    for ckpt in (load_official(oracle.checkpoint), load_checkpoint(tmp_path / "x.safetensors")):
        for module in build_models(ckpt):
            assert all(p.data_ptr() % 64 == 0 for p in module.parameters())


def test_folder_of_checkpoints_points_at_one(oracle: ParityFixture, tmp_path: Path):
    copy_official(oracle, tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint-1: point at one of those"):
        load_checkpoint(tmp_path)


def test_bin_weights_load_through_weights_only(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    for part in ("controlnet", "unet"):
        st = folder / part / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(st), st.with_suffix(".bin"))
        st.unlink()
    a, b = load_checkpoint(folder), load_official(oracle.checkpoint)
    assert all(torch.equal(a.conditional_attention[k], v) for k, v in b.conditional_attention.items())


def test_bin_with_pickled_code_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    st = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    st.unlink()
    weights = load_file(oracle.checkpoint / "controlnet" / st.name)
    torch.save({"weights": weights, "hook": print}, st.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: could not be read.*weights_only=True"):
        load_checkpoint(folder)


# --- refusals -----------------------------------------------------------------------------------------------------

def stock_controlnet_tensors(oracle: ParityFixture) -> dict[str, torch.Tensor]:
    xpsr = load_file(oracle.checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors")
    extra = (".attentions_lowlevel.", ".attentions_connect.", "to_rgbs.", "conv_degradation")
    return {k: v for k, v in xpsr.items() if not any(e in k for e in extra)}


def test_stock_controlnet_file_is_refused_as_single_file(oracle: ParityFixture, tmp_path: Path):
    path = tmp_path / "control_v11p_sd15_tile.safetensors"
    save_file(stock_controlnet_tensors(oracle), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "stock ControlNet" in msg and "attentions_lowlevel" in msg
    assert "python -m xpsr_core.weights.convert" in msg


def test_stock_controlnet_ldm_layout_is_refused(tmp_path: Path):
    path = tmp_path / "control_sd15_canny.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
               "control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"control_sd15_canny.safetensors: this is a stock ControlNet in the "
                                              r"original \(ldm\) layout"):
        load_checkpoint(path)


def test_stock_controlnet_in_official_folder_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    weights = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    save_file(stock_controlnet_tensors(oracle), weights)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    assert str(weights) in str(e.value) and "stock ControlNet" in str(e.value)


def test_stock_controlnet_config_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    config_path = folder / "controlnet" / "config.json"
    config = json.loads(config_path.read_text())
    del config["use_lowlevel_prompt"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"controlnet/config.json: 'use_lowlevel_prompt' is None; this is a stock "
                                              r"ControlNet config, expected an XPSR ControlNet"):
        load_checkpoint(folder)


def test_sdxl_checkpoint_file_is_refused(tmp_path: Path):
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816)}, path)
    with pytest.raises(CheckpointError, match=r"sd_xl_base_1.0.safetensors: this is an SDXL model \(XPSR is built on "
                                              r"Stable Diffusion 1.5\)"):
        load_checkpoint(path)


def test_sdxl_config_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    config_path = folder / "controlnet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(addition_embed_type="text_time", cross_attention_dim=2048)
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError,
                       match=r"controlnet/config.json: this is an SDXL model .*cross_attention_dim 768"):
        load_checkpoint(folder)


def test_sd_checkpoint_is_refused_with_where_it_belongs(tmp_path: Path):
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="a Stable Diffusion checkpoint .*models/checkpoints"):
        load_checkpoint(path)


@pytest.fixture
def converted(oracle: ParityFixture, tmp_path: Path) -> Path:
    path = tmp_path / "xpsr.safetensors"
    convert_official(oracle.checkpoint, path)
    return path


@pytest.mark.parametrize("keep", [0.3, 0.999])
def test_truncated_single_file_is_refused(converted: Path, keep: float):
    data = converted.read_bytes()
    converted.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{converted.name}: truncated: the header declares {len(data)} bytes, "
                                              rf"the file has {int(len(data) * keep)} bytes"):
        load_checkpoint(converted)


def test_truncated_header_is_refused(converted: Path):
    converted.write_bytes(converted.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{converted.name}: truncated: the header declares \d+ bytes of header"):
        load_checkpoint(converted)


def test_truncated_official_weights_are_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated"):
        load_checkpoint(folder)


def _rewrite_single_file(path: Path, edit) -> None:
    header = read_header(path)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=header.metadata)


def test_single_file_missing_key_is_refused(converted: Path):
    key = "controlnet.down_blocks.0.attentions_connect.0.transformer_blocks.0.attn2.to_k.weight"
    _rewrite_single_file(converted, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"{converted.name}: missing key '{key}' \(expected shape \[32, 32\]\); "
                                              r"1 of the \d+ XPSR single-file tensors are missing"):
        load_checkpoint(converted)


def test_single_file_wrong_shape_is_refused(converted: Path):
    key = "conditional_attention.up_blocks.1.pixel_attentions.1.transformer_blocks.0.attn2.to_k.weight"
    _rewrite_single_file(converted, lambda t: t.update({key: torch.zeros(64, 48)}))
    expected = rf"{converted.name}: key '{key}' has shape \[64, 48\], expected \[64, 64\]"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(converted)


def test_single_file_unexpected_key_is_refused(converted: Path):
    _rewrite_single_file(converted, lambda t: t.update({"controlnet.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=rf"{converted.name}: unexpected key 'controlnet.extra.weight'"):
        load_checkpoint(converted)


def test_official_wrong_shape_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    weights = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    key = "controlnet_cond_embedding.to_rgbs.1.weight"
    edit_weights(weights, lambda t: t.update({key: torch.zeros(3, 64, 3, 3)}))
    with pytest.raises(CheckpointError, match=rf"{weights}: key '{key}' has shape \[3, 64, 3, 3\], expected "
                                              r"\[3, 96, 3, 3\] for this XPSR ControlNet config"):
        load_checkpoint(folder)


def test_official_missing_pixel_attention_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    key = "up_blocks.3.pixel_attentions.1.proj_out.bias"
    edit_weights(weights, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"{weights}: missing key '{key}' \(expected shape \[32\]\)"):
        load_checkpoint(folder)


def test_stock_unet_folder_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    edit_weights(weights, lambda t: [t.pop(k) for k in list(t) if ".pixel_attentions." in k])
    with pytest.raises(CheckpointError, match=rf"{weights}: this is a stock SD UNet \(no conditional attention"):
        load_checkpoint(folder)


def test_single_file_without_config_metadata_is_refused(converted: Path):
    header = read_header(converted)
    save_file(load_file(converted), converted, metadata={k: v for k, v in header.metadata.items()
                                                         if k != "unet_config"})
    with pytest.raises(CheckpointError, match=rf"{converted.name}: metadata entry 'unet_config' is missing"):
        load_checkpoint(converted)


def test_unknown_file_is_refused(tmp_path: Path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"hello world, not a model")
    with pytest.raises(CheckpointError, match="notes.safetensors: not a safetensors file"):
        load_checkpoint(path)


def test_single_file_metadata_reads_back(oracle: ParityFixture):
    official = load_official(oracle.checkpoint)
    meta = single_file_metadata(official.controlnet_config, official.unet_config)
    assert json.loads(meta["controlnet_config"])["attention_head_dim"] == list(official.controlnet_config.num_heads)


def test_truncated_bin_is_refused(oracle: ParityFixture, tmp_path: Path):
    folder = copy_official(oracle, tmp_path)
    st = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), st.with_suffix(".bin"))
    st.unlink()
    data = st.with_suffix(".bin").read_bytes()
    st.with_suffix(".bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: could not be read as a PyTorch weights "
                                              r"file .*truncated"):
        load_checkpoint(folder)
