"""Tiny transformers Mamba-1 family models (no downloads) returning logits, for ``--factory``."""

from __future__ import annotations

import torch
from torch import nn


class Logits(nn.Module):
    """``model(input_ids, use_cache=False).logits``: what export sees of a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def mamba(seed: int = 0) -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                      time_step_rank=4, use_cache=False)
    return Logits(MambaForCausalLM(cfg)).eval()


def falcon_mamba(seed: int = 0) -> nn.Module:
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    torch.manual_seed(seed)
    cfg = FalconMambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                            conv_kernel=4, time_step_rank=4, use_cache=False)
    return Logits(FalconMambaForCausalLM(cfg)).eval()


def jamba(seed: int = 0) -> nn.Module:
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(seed)
    cfg = JambaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
                      attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                      mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_cache=False)
    return Logits(JambaForCausalLM(cfg)).eval()


def recurrent_gemma(seed: int = 0) -> nn.Module:
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(seed)
    cfg = RecurrentGemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, lru_width=32, attention_window_size=64,
                               conv1d_width=4, use_cache=False, head_dim=16)
    return Logits(RecurrentGemmaForCausalLM(cfg)).eval()


def rwkv(seed: int = 0) -> nn.Module:
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                     intermediate_size=64, context_length=256, use_cache=False)
    return Logits(RwkvForCausalLM(cfg)).eval()
