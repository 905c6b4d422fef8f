"""Semantic-Fusion Attention (paper Sec. 3.4, Eq. 1 and 2): how the ControlNet reads both prompts.

Each cross-attention layer of the SFA-ControlNet holds three Transformer2Ds, under the
official key names of its block: ``attentions`` (CA_h, over the high-level prompt c_h),
``attentions_lowlevel`` (CA_l, over the low-level prompt c_l) and ``attentions_connect``
(CA_f, the fusion). The UNet's own layers keep the single text attention.
"""

from __future__ import annotations

import torch

from .attention import Transformer2D, feature_map_to_tokens


def semantic_fusion(x: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None, high: Transformer2D,
                    low: Transformer2D, connect: Transformer2D | None, fusion: str,
                    transformer_options: dict | None = None) -> torch.Tensor:
    """One semantic-fusion attention on the feature map x_k, giving x_{k+1}.

    parallel, Eq. 2 (the released model): x_{k+1} = CA_f(CA_h(x_k, c_h), CA_l(x_k, c_l)); the
    fusion takes its queries from the high-level result and its keys/values from the
    low-level result's tokens, so each branch sees only its own prompt.
    serial, Eq. 1 (the paper's ablation): x_{k+1} = CA_l(CA_h(x_k, c_h), c_l).
    Without a low-level embedding the official code keeps the high-level branch only.

    Shapes: x (B, C, H, W); c_h and c_l (B, 77, 768) CLIP-L text embeddings (B, L, D in general);
    the low-level tokens CA_f attends to (B, H*W, C); returns (B, C, H, W).
    ``transformer_options`` go to every attention call (see ``AttentionFunction``).
    """
    x_h = high(x, c_h, transformer_options)
    if c_l is None:
        return x_h
    if fusion == "serial":
        return low(x_h, c_l, transformer_options)
    return connect(x_h, feature_map_to_tokens(low(x, c_l, transformer_options)), transformer_options)
