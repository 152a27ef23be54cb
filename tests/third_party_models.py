"""Builders for third-party models in small configurations (no weights downloaded), usable as
``--factory third_party_models:<name>`` (tests/ is on sys.path under pytest) or from Python.

Each builder seeds torch, returns an eval-mode ``nn.Module`` and imports its package lazily, so this
module imports without the packages (tests skip with ``pytest.importorskip``). ``SPECS`` holds the
``--input``/``--shapes`` strings each model is built with in the tests.
"""

from __future__ import annotations

import torch
from torch import nn

# --input / --shapes for each builder (names match the models' forward parameters)
SPECS: dict[str, tuple[list[str], list[str]]] = {
    "linformer_fixed": (["x:2x64x64:float32"], ["x:min=1x64x64,opt=2x64x64,max=4x64x64"]),
    "linformer_padder": (["x:2x48x64:float32"], ["x:min=1x1x64,opt=2x48x64,max=4x64x64"]),
    "linformer_lm_padder": (["tensor:2x48:int64:0..99"], ["tensor:min=1x1,opt=2x48,max=4x64"]),
    "x_decoder_lowrank": (["x:2x32:int64:0..255"], ["x:min=1x1,opt=2x32,max=2x128"]),
    "x_encdec_lowrank": (["src:2x24:int64:0..255", "tgt:2x16:int64:0..255"],
                         ["src:min=1x1,opt=2x24,max=2x64", "tgt:min=1x2,opt=2x16,max=2x48"]),
    "bert_factorized": (["input_ids:2x32:int64:0..127", "attention_mask:2x32:int64:1..1"],
                        ["input_ids:min=1x1,opt=2x32,max=2x128", "attention_mask:min=1x1,opt=2x32,max=2x128"]),
}

LINFORMER_LEN = 64  # linformer-pytorch input_size (the fixed sequence length)
LOWRANK_INNER = 64  # x-transformers: every Linear(a, b) -> Linear(a, 64) -> Linear(64, b)


# ---------------------------------------------------------------------------------------------- linformer


def linformer(method: str = "learnable", sharing: str = "layerwise", depth: int = 2, seed: int = 0) -> nn.Module:
    """linformer-pytorch ``Linformer`` (n=64, d=64, k=16, 2 heads): E/F as Linear(n, k) ('learnable'),
    Conv1d kernel=stride=n/k ('convolution') or a fixed random n x k matrix ('no_params')."""
    from linformer_pytorch import Linformer

    torch.manual_seed(seed)
    return Linformer(input_size=LINFORMER_LEN, channels=64, dim_k=16, dim_ff=128, nhead=2, depth=depth,
                     dropout=0.0, dropout_ff=0.0, parameter_sharing=sharing, method=method).eval()


def linformer_fixed(method: str = "learnable", sharing: str = "layerwise") -> nn.Module:
    """The Linformer as it is: sequence fixed at 64 (lrexport pins that axis, batch stays dynamic)."""
    return linformer(method, sharing)


def linformer_padder(method: str = "learnable", sharing: str = "layerwise") -> nn.Module:
    """linformer-pytorch's own ``Padder`` around the Linformer: any length 1..64."""
    from linformer_pytorch import Padder

    return Padder(linformer(method, sharing)).eval()


def linformer_lm_padder(sharing: str = "kv", seed: int = 0) -> nn.Module:
    """``Padder(LinformerLM)`` over token ids (vocab 100), sinusoidal positions, shared E=F ('kv')."""
    from linformer_pytorch import LinformerLM, Padder

    torch.manual_seed(seed)
    lm = LinformerLM(num_tokens=100, input_size=LINFORMER_LEN, channels=64, dim_k=16, dim_ff=128, nhead=2,
                     depth=1, dropout=0.0, dropout_ff=0.0, dropout_tokens=0.0, parameter_sharing=sharing)
    return Padder(lm).eval()


# ---------------------------------------------------------------------------------------------- x-transformers


def lowrank_linears(module: nn.Module, inner: int = LOWRANK_INNER) -> int:
    """Replace every nn.Linear(a, b) below ``module`` (recursively) by Sequential(Linear(a, inner),
    Linear(inner, b)); the first factor has no bias, the second keeps the original's. Returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            pair = nn.Sequential(nn.Linear(child.in_features, inner, bias=False),
                                 nn.Linear(inner, child.out_features, bias=child.bias is not None))
            setattr(module, name, pair)
            count += 1
        else:
            count += lowrank_linears(child, inner)
    return count


def x_decoder_lowrank(seed: int = 0) -> nn.Module:
    """x-transformers decoder-only LM (vocab 256, d=128, depth 2, 4 heads, max 128), every Linear low-rank."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(seed)
    model = TransformerWrapper(num_tokens=256, max_seq_len=128,
                               attn_layers=Decoder(dim=128, depth=2, heads=4, attn_dim_head=32))
    lowrank_linears(model)
    return model.eval()


class XEncDec(nn.Module):
    """x-transformers encoder + cross-attending decoder returning logits (XTransformer's forward returns
    the training loss of its AutoregressiveWrapper, so the two TransformerWrappers are composed here,
    as XTransformer composes them)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from x_transformers import Decoder, Encoder, TransformerWrapper

        torch.manual_seed(seed)
        self.encoder = TransformerWrapper(num_tokens=256, max_seq_len=64, return_only_embed=True,
                                          attn_layers=Encoder(dim=64, depth=1, heads=2, attn_dim_head=32))
        self.decoder = TransformerWrapper(num_tokens=256, max_seq_len=48,
                                          attn_layers=Decoder(dim=64, depth=1, heads=2, attn_dim_head=32,
                                                              cross_attend=True))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.decoder(tgt, context=self.encoder(src, return_embeddings=True))


def x_encdec_lowrank(seed: int = 0) -> nn.Module:
    model = XEncDec(seed)
    lowrank_linears(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------- transformers


def bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, max_position_embeddings=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def bert_dense(seed: int = 0) -> nn.Module:
    """A BertModel from a config (random init, no download). Biases get small random values as in a
    trained model (BERT initializes them to zero; the exporter would then share one zero initializer
    among all biases, which a trained model never shows)."""
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(bert_config())
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.02)
    return model.eval()


def bert_factorized(fraction: float = 0.5, seed: int = 0) -> nn.Module:
    """``bert_dense`` factorized by ``exporter.factorize`` (what ``lrexport factorize`` runs) at half the
    break-even rank of every Linear; the FactorizeReport is kept as ``model.factorize_report``."""
    from exporter.factorize import factorize

    model = bert_dense(seed)
    report = factorize(model, fraction=fraction)
    model.factorize_report = report  # plain attribute (not a module/parameter)
    return model.eval()


# ------------------------------------------------------------------------------------ causal linear attention
SPECS["lat_causal_lm"] = (["ids:1x128:int64:0..255"], ["ids:min=1x1,opt=1x128,max=2x256"])
SPECS["performer_causal_lm"] = (["ids:1x32:int64:0..255"], ["ids:min=1x16,opt=1x32,max=2x32"])


SPECS["lat_bucketed_lm"] = (["ids:1x128:int64:0..255"], ["ids:min=1x4,opt=1x128,max=2x256"])
SPECS["lat_causal_lm_1024"] = (["ids:1x64:int64:0..255"], ["ids:min=1x16,opt=1x64,max=1x1024"])


def lat_causal_lm(seed: int = 0, blindspot_size: int = 1, max_seq_len: int = 256, depth: int = 2,
                  use_axial_pos_emb: bool = True) -> nn.Module:
    """linear-attention-transformer's causal LM (lucidrains). Its causal linear attention splits the sequence into
    buckets of ``blindspot_size`` (B): per-bucket sums of k v^T ('bhund,bhune->bhude'), CumSum over buckets, a
    3-operand einsum with the normalizer's reciprocal. B = 1 is exact causal linear attention; with B > 1 the sums
    are shifted by one bucket (F.pad + slice: query i sees only buckets before its own) and the sequence must be a
    multiple of B. Its default axial position embedding slices a table (``pos_emb[:, :n]``);
    ``use_axial_pos_emb=False`` takes ``nn.Embedding(arange(n))`` instead."""
    from linear_attention_transformer import LinearAttentionTransformerLM

    torch.manual_seed(seed)
    return LinearAttentionTransformerLM(num_tokens=256, dim=64, heads=4, depth=depth, max_seq_len=max_seq_len,
                                        causal=True, blindspot_size=blindspot_size, n_local_attn_heads=0,
                                        ff_chunks=1, reversible=False, use_axial_pos_emb=use_axial_pos_emb).eval()


def lat_bucketed_lm(seed: int = 0, blindspot_size: int = 4) -> nn.Module:
    """``lat_causal_lm`` with buckets of 4: an exclusive prefix over buckets, sequence a multiple of 4."""
    return lat_causal_lm(seed, blindspot_size)


def performer_causal_lm(seed: int = 0) -> nn.Module:
    """performer-pytorch's causal LM on the CPU path: a Python loop over chunks (CumSum + carried sums per chunk,
    '...nde,...nd,...n->...ne' einsums) that fixes the sequence length at export."""
    from performer_pytorch import PerformerLM

    torch.manual_seed(seed)
    return PerformerLM(num_tokens=256, max_seq_len=32, dim=64, depth=1, heads=4, causal=True, nb_features=16).eval()


# ------------------------------------------------------------- causal libraries behind export patches (issue 8)
# performer-pytorch, fast-transformers and fla as their authors wrote them; lrexport's export patches
# (exporter/patches*.py) make each exportable with a dynamic sequence. Ranges reach n = 1024.
SPECS["performer_causal_lm_long"] = (["ids:1x128:int64:0..255"], ["ids:min=1x1,opt=1x128,max=2x1024"])
SPECS["fast_transformers_causal"] = (["x:1x128x64:float32"], ["x:min=1x1x64,opt=1x128x64,max=2x1024x64"])
SPECS["fla_linear_attention"] = (["x:1x128x64:float32"], ["x:min=1x1x64,opt=1x128x64,max=2x1024x64"])


def performer_causal_lm_long(seed: int = 0, max_seq_len: int = 1024) -> nn.Module:
    """performer-pytorch's causal LM with positions up to 1024 (CPU path: the Python loop over chunk(128))."""
    from performer_pytorch import PerformerLM

    torch.manual_seed(seed)
    return PerformerLM(num_tokens=256, max_seq_len=max_seq_len, dim=64, depth=1, heads=4, causal=True,
                       nb_features=16).eval()


class FastTransformersCausal(nn.Module):
    """fast-transformers' encoder with attention_type="causal-linear" (the "Transformers are RNNs" model);
    its attention needs a lower-triangular mask, made for the input's length."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from fast_transformers.builders import TransformerEncoderBuilder

        torch.manual_seed(seed)
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            n_layers=2, n_heads=4, query_dimensions=16, value_dimensions=16, feed_forward_dimensions=128,
            attention_type="causal-linear", activation="gelu").get()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fast_transformers.masking import TriangularCausalMask

        return self.encoder(x, attn_mask=TriangularCausalMask(x.shape[1], device=x.device))


def fast_transformers_causal(seed: int = 0) -> nn.Module:
    return FastTransformersCausal(seed).eval()


class FlaLinearAttention(nn.Module):
    """fla's LinearAttention layer (elu feature map, normalized, RMSNorm output norm); returns its output."""

    def __init__(self, seed: int = 0, mode: str = "chunk", feature_map: str = "elu", normalize: bool = True):
        super().__init__()
        from fla.layers import LinearAttention

        torch.manual_seed(seed)
        self.attn = LinearAttention(mode=mode, hidden_size=64, num_heads=4, feature_map=feature_map,
                                    do_feature_map_norm=normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)[0]


def fla_linear_attention(seed: int = 0, mode: str = "chunk") -> nn.Module:
    return FlaLinearAttention(seed, mode).eval()


def lat_causal_lm_long(seed: int = 0, max_seq_len: int = 4096) -> nn.Module:
    """``lat_causal_lm``'s configuration with positions up to ``max_seq_len`` (benchmarks at n = 4096)."""
    from linear_attention_transformer import LinearAttentionTransformerLM

    torch.manual_seed(seed)
    return LinearAttentionTransformerLM(num_tokens=256, dim=64, heads=4, depth=2, max_seq_len=max_seq_len,
                                        causal=True, blindspot_size=1, n_local_attn_heads=0, ff_chunks=1,
                                        reversible=False).eval()


# ------------------------------------------------------------------------------------------- GPT-2 Conv1D pairs
SPECS["gpt2_conv1d_pairs"] = (["input_ids:2x16:int64:0..99"], ["input_ids:min=1x1,opt=2x16,max=2x128"])


class _LastHidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).last_hidden_state


def gpt2_conv1d_pairs(rank: int = 8, seed: int = 0) -> nn.Module:
    """A 2-layer GPT2Model (d=64, no cache) whose 8 Hugging Face ``Conv1D`` layers (c_attn, c_proj, c_fc,
    mlp c_proj) are each a low-rank pair ``Sequential(Conv1D(rank, in), Conv1D(out, rank))``, biases
    random (as trained). Returns the last hidden state."""
    from transformers import GPT2Config, GPT2Model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=100, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2Model(config)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                pair = nn.Sequential(Conv1D(rank, n_in), Conv1D(n_out, rank))
                for conv in pair:
                    nn.init.normal_(conv.bias, 0.0, 0.02)
                setattr(parent, name, pair)
    return _LastHidden(model).eval()


class Qwen3NextTiny(nn.Module):
    """transformers' Qwen3-Next (a gated-delta-rule linear-attention layer and a full-attention layer, MoE
    MLPs) in a tiny config; with fla installed, transformers runs fla's Triton kernels for the linear layer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import Qwen3NextConfig, Qwen3NextModel

        cfg = Qwen3NextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_value_heads=2,
                              linear_num_key_heads=1, linear_key_head_dim=16, linear_value_head_dim=16,
                              num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                              shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
        torch.manual_seed(seed)
        self.model = Qwen3NextModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).last_hidden_state


def qwen3_next_tiny(seed: int = 0) -> nn.Module:
    return Qwen3NextTiny(seed).eval()


# ------------------------------------------------------------------- a Python loop over chunks
SPECS["gated_deltanet"] = (["x:1x10x64:float32"], ["x:min=1x2x64,opt=1x10x64,max=2x40x64"])


class GatedDeltaNet(nn.Module):
    """transformers' gated-DeltaNet layer (``Qwen3NextGatedDeltaNet``, the linear attention of Qwen3-Next /
    Qwen3.5 / OLMo-hybrid) on its PyTorch fallback ``torch_chunk_gated_delta_rule``: a Python loop over chunks,
    which torch.export unrolls to the example's chunk count. The fallback is called with a chunk of
    ``chunk_size`` (the library's 64 makes the unrolled export minutes long), and always the fallback: with
    flash-linear-attention importable, transformers would pick fla's Triton kernel, which has no CPU path."""

    def __init__(self, seed: int = 0, chunk_size: int = 4):
        super().__init__()
        from transformers import Qwen3NextConfig
        from transformers.models.qwen3_next import modeling_qwen3_next as mq

        torch.manual_seed(seed)
        cfg = Qwen3NextConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, linear_key_head_dim=16,
                              linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                              layer_types=["linear_attention"], use_cache=False)
        self.attn = mq.Qwen3NextGatedDeltaNet(cfg, 0)
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import functools

        from transformers.models.qwen3_next import modeling_qwen3_next as mq

        dispatch = mq.torch_chunk_gated_delta_rule
        fallback = getattr(dispatch, "__wrapped__", dispatch)  # the torch code under the kernel dispatch
        mq.torch_chunk_gated_delta_rule = functools.partial(fallback, chunk_size=self.chunk_size)
        try:
            return self.attn(x)
        finally:
            mq.torch_chunk_gated_delta_rule = dispatch


def gated_deltanet(seed: int = 0, chunk_size: int = 4) -> nn.Module:
    return GatedDeltaNet(seed, chunk_size).eval()


SPECS["minimax_lm"] = (["ids:1x56:int64:0..127"], ["ids:min=1x16,opt=1x56,max=2x160"])


class MiniMaxLM(nn.Module):
    """transformers' MiniMax (lightning attention: a Python loop over blocks of ``block_size``) returning logits."""

    def __init__(self, seed: int = 0, block_size: int = 16):
        super().__init__()
        from transformers import MiniMaxConfig, MiniMaxForCausalLM

        torch.manual_seed(seed)
        cfg = MiniMaxConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=32, num_local_experts=2,
                            num_experts_per_tok=1, layer_types=["linear_attention"], block_size=block_size,
                            use_cache=False)
        self.lm = MiniMaxForCausalLM(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def minimax_lm(seed: int = 0, block_size: int = 16) -> nn.Module:
    return MiniMaxLM(seed, block_size).eval()


SPECS["xlstm_lm"] = (["ids:1x72:int64:0..127"], ["ids:min=1x16,opt=1x72,max=2x160"])


class XLSTMLM(nn.Module):
    """transformers' xLSTM (mLSTM, native chunkwise kernels over chunks of ``chunk_size``) returning logits."""

    def __init__(self, seed: int = 0, chunk_size: int = 16):
        super().__init__()
        from transformers import xLSTMConfig, xLSTMForCausalLM

        torch.manual_seed(seed)
        cfg = xLSTMConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_heads=2, chunk_size=chunk_size,
                          use_cache=False, autocast_kernel_dtype="float32", inference_state_dtype="float32",
                          max_inference_chunksize=chunk_size * 8)
        self.lm = xLSTMForCausalLM(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def xlstm_lm(seed: int = 0, chunk_size: int = 16) -> nn.Module:
    return XLSTMLM(seed, chunk_size).eval()
