"""Attention is injectable, layers come from the operations namespace, and fusion arrangements are switchable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from parity import ParityFixture
from xpsr_core import ConditionalAttention, ControlNetConfig, SFAControlNet, UNetConfig, load_checkpoint
from xpsr_core.models import sd15_configs
from xpsr_core.models.attention import Transformer2D, sdpa_attention
from xpsr_core.models.semantic_fusion import semantic_fusion

ROOT = Path(__file__).resolve().parents[1]


def configs(oracle: ParityFixture) -> tuple[ControlNetConfig, UNetConfig]:
    ckpt = load_checkpoint(oracle.checkpoint)
    return ckpt.controlnet_config, ckpt.unet_config


def recording_operations() -> tuple[SimpleNamespace, list[nn.Module]]:
    built: list[nn.Module] = []

    def recorded(base: type) -> type:
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)
        return Recorded

    names = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")
    ops = SimpleNamespace(**{name: recorded(getattr(nn, name)) for name in names})
    return ops, built


def test_every_parameterised_layer_comes_from_operations(oracle: ParityFixture):
    cn_config, un_config = configs(oracle)
    ops, built = recording_operations()
    models = [SFAControlNet(cn_config, operations=ops), ConditionalAttention(un_config, operations=ops)]
    leaves = [m for model in models for m in model.modules() if list(m.parameters(recurse=False))]
    assert leaves and all(any(m is b for b in built) for m in leaves)


@torch.no_grad()
def test_attention_function_gets_every_attention_with_the_call_options(oracle: ParityFixture):
    cn_config, un_config = configs(oracle)
    options = {"call": "this one"}
    calls = []

    def counting(q, k, v, heads, transformer_options=None):
        calls.append(transformer_options)
        return sdpa_attention(q, k, v, heads)

    torch.manual_seed(0)
    reference = SFAControlNet(cn_config)
    counted = SFAControlNet(cn_config, attention=counting)
    counted.load_state_dict(reference.state_dict())
    args = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32), torch.rand(1, 3, 64, 64),
            torch.randn(1, 77, 32))
    assert torch.equal(counted(*args, transformer_options=options).mid_residual, reference(*args).mid_residual)
    transformers = sum(isinstance(m, Transformer2D) for m in counted.modules())
    assert len(calls) == 2 * transformers  # a self- and a cross-attention each
    assert all(c is options for c in calls)

    calls.clear()
    conditional = ConditionalAttention(un_config, attention=counting)
    residuals = [torch.randn(1, d.context_channels, 2, 2) for d in reversed(conditional.layers)]
    for layer, d in enumerate(conditional.layers):
        conditional(torch.randn(1, d.channels, 2, 2), layer, residuals, options)
    assert len(calls) == 2 * len(conditional) and all(c is options for c in calls)


@torch.no_grad()
def test_serial_fusion_is_eq1_and_parallel_is_eq2():
    torch.manual_seed(0)
    high, low, connect = (Transformer2D(32, ctx, 2) for ctx in (16, 16, 32))
    x, c_h, c_l = torch.randn(1, 32, 4, 4), torch.randn(1, 7, 16), torch.randn(1, 7, 16)
    assert torch.equal(semantic_fusion(x, c_h, c_l, high, low, None, "serial"), low(high(x, c_h), c_l))
    tokens = low(x, c_l).flatten(2).transpose(1, 2)
    assert torch.equal(semantic_fusion(x, c_h, c_l, high, low, connect, "parallel"), connect(high(x, c_h), tokens))
    assert torch.equal(semantic_fusion(x, c_h, None, high, low, connect, "parallel"), high(x, c_h))


def test_serial_fusion_switch_builds_without_connect_attentions(oracle: ParityFixture):
    cn_config, _ = configs(oracle)
    raw = cn_config.to_dict() | {"xpsr_fusion": "serial"}
    serial = ControlNetConfig.from_dict(raw)
    assert ControlNetConfig.from_dict(serial.to_dict()) == serial
    keys = SFAControlNet(serial).state_dict().keys()
    assert not any("attentions_connect" in k for k in keys)
    assert any("attentions_lowlevel" in k for k in keys)


def test_config_round_trips_through_its_dict(oracle: ParityFixture):
    cn_config, un_config = configs(oracle)
    assert ControlNetConfig.from_dict(json.loads(json.dumps(cn_config.to_dict()))) == cn_config
    assert UNetConfig.from_dict(json.loads(json.dumps(un_config.to_dict()))) == un_config


def test_sd15_sized_configs_give_the_official_key_counts():
    """The release: ControlNet 736 tensors (620.2 M params), conditional attention 312 (of the UNet's 998)."""
    with torch.device("meta"):
        cn = SFAControlNet(ControlNetConfig.from_dict(sd15_configs.UNET | {"use_lowlevel_prompt": True}))
        ca = ConditionalAttention(UNetConfig.from_dict(sd15_configs.UNET))
    assert len(cn.state_dict()) == 736
    assert round(sum(p.numel() for p in cn.parameters()) / 1e6, 1) == 620.2
    assert len(ca.state_dict()) == 312
    to_k = [ca.up_blocks[b].pixel_attentions[j].transformer_blocks[0].attn2.to_k.in_features
            for b in range(4) for j in range(3)]
    assert to_k == [1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 320]


def test_conditional_attention_memory_is_linear_in_tokens():
    """16,384 query x 16,384 key tokens: the attention matrix alone would be 2 GiB (2 heads, fp32)."""
    script = textwrap.dedent("""
        import resource, torch
        from xpsr_core import ConditionalAttention, UNetConfig
        config = UNetConfig.from_dict(dict(block_out_channels=[32, 32], layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]))
        attention = ConditionalAttention(config)
        last = len(attention) - 1
        hidden, residual = torch.randn(1, 32, 128, 128), torch.randn(1, 32, 128, 128)
        residuals = [residual] * len(attention)
        with torch.no_grad():
            attention(hidden[:, :, :8, :8], last, [residual[:, :, :8, :8]] * len(attention))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = attention(hidden, last, residuals)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    peak_mib = float(run.stdout.strip())
    assert peak_mib < 256, f"peak grew by {peak_mib:.0f} MiB; a materialised attention matrix is 2048 MiB"
