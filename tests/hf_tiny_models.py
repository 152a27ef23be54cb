"""Tiny Hugging Face transformers causal LMs (built from configs, no downloads) returning logits, usable as
``--factory hf_tiny_models:<name>`` (tests/ is on sys.path under pytest). Each builder seeds torch and
returns an eval-mode module taking ``ids`` (int64, batch x sequence) and calling the model with
``use_cache=False``. ``SPECS`` holds the ``--input``/``--shapes`` each is built with in the tests."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128
SPECS: dict[str, tuple[str, str]] = {}


class Logits(nn.Module):
    """``model(input_ids=ids, use_cache=False).logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def _lm(config_cls: str, model_cls: str, seed: int, init_std: float | None = None, **cfg) -> nn.Module:
    """With ``init_std`` every weight but the SSM decay parameters is redrawn from N(0, init_std): transformers'
    small initialisation leaves some layers' contributions below float32 resolution of the logits."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, use_cache=False, **cfg)
    model = getattr(transformers, model_cls)(config)
    if init_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith(("A_log", "dt_bias")):
                    p.normal_(0.0, init_std)
    return Logits(model).eval()


SPECS["qwen3_next_lm"] = ("ids:2x70:int64:0..127", "ids:min=1x1,opt=2x70,max=4x130")


def qwen3_next_lm(seed: int = 0) -> nn.Module:
    """Qwen3-Next: a gated-DeltaNet layer (2 key heads, 4 value heads) and a full-attention layer, MoE MLPs."""
    return _lm("Qwen3NextConfig", "Qwen3NextForCausalLM", seed, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
               num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
               layer_types=["linear_attention", "full_attention"])


SPECS["qwen3_5_lm"] = ("ids:2x70:int64:0..127", "ids:min=1x1,opt=2x70,max=4x130")


def qwen3_5_lm(seed: int = 0) -> nn.Module:
    """Qwen3.5 (text): a gated-DeltaNet layer (2 key heads, 4 value heads) and a full-attention layer."""
    return _lm("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", seed, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
               layer_types=["linear_attention", "full_attention"])


SPECS["mamba2_lm"] = ("ids:2x40:int64:0..127", "ids:min=1x1,opt=2x40,max=4x130")


def mamba2_lm(seed: int = 0) -> nn.Module:
    """Mamba-2: 2 SSD layers, 4 heads of 16 in 2 groups, state 16, chunks of 16."""
    return _lm("Mamba2Config", "Mamba2ForCausalLM", seed, hidden_size=32, num_hidden_layers=2, expand=2,
               num_heads=4, head_dim=16, n_groups=2, state_size=16, chunk_size=16)


# The hybrids (Mamba-2 SSD or gated DeltaNet next to attention, some with MoE MLPs), weights redrawn so every
# layer's contribution shows in the logits: layer 0 the recurrent one, layer 1 attention.
_MAMBA = dict(mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=16, mamba_expand=2)
_ATTN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"])
HYBRIDS: dict[str, tuple[str, str, dict]] = {
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(_ATTN, mamba_n_heads=4, attn_layer_indices=[1], **_MAMBA)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(_ATTN, head_dim=16, mamba_n_heads=4, mamba_d_ssm=64,
                                                                 **_MAMBA)),
    "granite_moe_hybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                           dict(_ATTN, mamba_n_heads=4, num_local_experts=2, num_experts_per_tok=1,
                                shared_intermediate_size=32, layer_types=["mamba", "attention"], **_MAMBA)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(_ATTN, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                        chunk_size=16, expand=2, hybrid_override_pattern="M*")),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM",
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, mamba_headdim=16,
                    n_mamba_heads=4, mamba_ngroups=2, mamba_d_state=16, chunk_size=16, mamba_expand=2,
                    layers_block_type=["mamba", "hybrid"], num_mem_blocks=1)),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM",
                    dict(_ATTN, pad_token_id=0, eos_token_id=1, bos_token_id=2, **_GDN)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(_ATTN, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, **_GDN)),
}


def hybrid_lm(family: str, seed: int = 0) -> nn.Module:
    config_cls, model_cls, cfg = HYBRIDS[family]
    return _lm(config_cls, model_cls, seed, init_std=0.3, **cfg)


SPECS["bamba_lm"] = ("ids:2x40:int64:0..127", "ids:min=1x1,opt=2x40,max=4x130")


def bamba_lm(seed: int = 0) -> nn.Module:
    return hybrid_lm("bamba", seed)


SPECS["kimi_linear_lm"] = ("ids:2x70:int64:0..127", "ids:min=1x1,opt=2x70,max=4x130")


def kimi_linear_lm(seed: int = 0) -> nn.Module:
    """Kimi-Linear: a KDA layer (2 heads of 16, per-key decay) and an MLA layer, MoE MLPs."""
    return _lm("KimiLinearConfig", "KimiLinearForCausalLM", seed, init_std=0.3, hidden_size=32, intermediate_size=64,
               moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_local_experts=4,
               num_experts_per_tok=2, n_shared_experts=1, linear_head_dim=16, linear_num_heads=2,
               layer_types=["linear_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)


SPECS["minimax_lm"] = ("ids:2x40:int64:0..127", "ids:min=1x1,opt=2x40,max=4x130")


def minimax_lm(seed: int = 0) -> nn.Module:
    """MiniMax: a lightning-attention layer (blocks of 16) and a softmax-attention layer, MoE MLPs."""
    return _lm("MiniMaxConfig", "MiniMaxForCausalLM", seed, init_std=0.3, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
               num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"], block_size=16)


# Per-token loops of transformers that are linear recurrences (exporter/patches/transformers/selective_scan.py,
# rg_lru.py), and RWKV-4 (a torch scan: rwkv.py).
_MAMBA1 = dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4)
SPECS["mamba_lm"] = ("ids:2x64:int64:0..127", "ids:min=1x1,opt=2x64,max=4x130")


def mamba_lm(seed: int = 0) -> nn.Module:
    """Mamba (Mamba-1): 2 layers, inner width 64, state 8."""
    return _lm("MambaConfig", "MambaForCausalLM", seed, **_MAMBA1)


def falcon_mamba_lm(seed: int = 0) -> nn.Module:
    return _lm("FalconMambaConfig", "FalconMambaForCausalLM", seed, **_MAMBA1)


def jamba_lm(seed: int = 0) -> nn.Module:
    """Jamba: a Mamba-1 layer and an attention layer with a (one-expert) MoE MLP."""
    return _lm("JambaConfig", "JambaForCausalLM", seed, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
               attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
               mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)


def recurrent_gemma_lm(seed: int = 0) -> nn.Module:
    """RecurrentGemma: two RG-LRU blocks and a local-attention block (window 64)."""
    return _lm("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", seed, hidden_size=32, intermediate_size=64,
               num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, lru_width=32,
               attention_window_size=64, conv1d_width=4, head_dim=16)


def rwkv_lm(seed: int = 0) -> nn.Module:
    return _lm("RwkvConfig", "RwkvForCausalLM", seed, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
               intermediate_size=64, context_length=256)


# The other hybrids, built in tests/test_hf_patches.py: one builder each for --factory.
for _family in ("olmo_hybrid", "falcon_h1", "nemotron_h", "granite_moe_hybrid", "zamba2"):
    SPECS[f"{_family}_lm"] = ("ids:2x40:int64:0..127", "ids:min=1x1,opt=2x40,max=4x130")
    globals()[f"{_family}_lm"] = (lambda family: lambda seed=0: hybrid_lm(family, seed))(_family)


# Per-token recurrences exported as torch scans (exporter/patches/transformers/rwkv.py, mlstm.py): RWKV-4
# (``rwkv_lm`` above) and xLSTM.
SPECS["rwkv_lm"] = ("ids:2x64:int64:0..127", "ids:min=1x1,opt=2x64,max=4x130")
SPECS["xlstm_lm"] = ("ids:2x64:int64:0..127", "ids:min=1x1,opt=2x64,max=4x130")


def xlstm_lm(seed: int = 0) -> nn.Module:
    """xLSTM: 2 mLSTM blocks, 2 heads (key dim 8, value dim 16), chunks of 16."""
    return _lm("xLSTMConfig", "xLSTMForCausalLM", seed, hidden_size=32, num_hidden_layers=2, num_heads=2,
               chunk_size=16)
SPECS["qwen3_5_moe_lm"] = ("ids:2x70:int64:0..127", "ids:min=1x1,opt=2x70,max=4x130")


def qwen3_5_moe_lm(seed: int = 0) -> nn.Module:
    """Qwen3.5-MoE: a gated-DeltaNet layer and an attention layer, MoE MLPs of 4 experts, top 2."""
    return hybrid_lm("qwen3_5_moe", seed)
