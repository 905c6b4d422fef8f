"""The core's default layers: torch.nn's, with a Linear that computes F.linear through oneDNN on fp32 CPU inputs.

The Linear is a drop-in for nn.Linear: same parameters and keys, the same product within fp32
rounding, the same gradients, contiguous outputs (the attention after it needs them to take
its fused kernel), and PyTorch's own path wherever oneDNN would not be the faster one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xpsr_core.models import operations
from xpsr_core.models.controlnet import SFAControlNet
from xpsr_core.models.operations import Linear, default_operations, onednn_linear


def _layers(seed: int = 0, in_features: int = 96, out_features: int = 80) -> tuple[Linear, nn.Linear]:
    torch.manual_seed(seed)
    ours = Linear(in_features, out_features)
    reference = nn.Linear(in_features, out_features)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize("make_input", [
    pytest.param(lambda: torch.randn(2, 300, 96), id="tokens"),
    pytest.param(lambda: torch.randn(2, 96), id="vectors"),
    pytest.param(lambda: torch.randn(96), id="one-vector"),
    pytest.param(lambda: torch.randn(2, 96, 12, 25).flatten(2).transpose(1, 2), id="feature-map-tokens"),
    pytest.param(lambda: torch.randn(3, 2, 5, 96)[:, 1], id="strided-rows"),
])
def test_linear_is_nn_linear_within_fp32_rounding(make_input):
    ours, reference = _layers()
    x = make_input()
    with torch.no_grad():
        out, expected = ours(x), reference(x)
    assert out.shape == expected.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_linear_without_bias():
    torch.manual_seed(1)
    x, weight = torch.randn(4, 50, 64), torch.randn(32, 64)
    torch.testing.assert_close(onednn_linear(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_linear_gradients_are_nn_linears():
    ours, reference = _layers(seed=2)
    x = torch.randn(2, 40, 96)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 40, 80)
    ours(x_ours).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-4)


def test_linear_has_nn_linears_parameters_and_keys():
    ours, reference = _layers()
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]


def test_linear_takes_onednn_for_fp32_cpu_inputs(monkeypatch):
    calls = []
    monkeypatch.setattr(operations, "onednn_linear", lambda *args: calls.append(args) or F.linear(*args))
    layer, _ = _layers()
    layer(torch.randn(2, 96))
    assert len(calls) == 1


def test_linear_takes_pytorchs_path_outside_fp32_cpu(monkeypatch):
    """Other dtypes (bf16 already runs through oneDNN; fp64 has no oneDNN kernel), empty inputs and oneDNN switched
    off are F.linear's."""
    def refuse(*args, **kwargs):
        raise AssertionError("took the oneDNN path")

    monkeypatch.setattr(operations, "onednn_linear", refuse)
    for dtype in (torch.float64, torch.bfloat16):
        layer = _layers()[0].to(dtype)
        x = torch.randn(2, 7, 96, dtype=dtype)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer = _layers()[0]
    assert layer(torch.randn(0, 96)).shape == (0, 80)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    x = torch.randn(2, 96)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_core_models_are_built_from_the_default_layers_unless_a_host_passes_its_own():
    from xpsr_core.models.config import ControlNetConfig

    config = ControlNetConfig.from_dict(dict(
        block_out_channels=[32, 32], layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], use_lowlevel_prompt=True))
    built = SFAControlNet(config)
    linears = [m for m in built.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is default_operations.Linear for m in linears)
    host = SFAControlNet(config, operations=nn)
    assert all(type(m) is nn.Linear for m in host.modules() if isinstance(m, nn.Linear))
