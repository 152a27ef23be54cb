"""Patches for Hugging Face transformers' own code (exporter/patches/transformers/): each replacement equals
transformers' own torch code (never fla's Triton kernel, never lrexport's op as its own reference) at lengths
that are and are not multiples of the model's chunk, and is chosen by what the model's modules are and undone
after. Each architecture built whole from a save_pretrained folder: tests/test_hf_architectures.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import hf_tiny_models as hf  # noqa: E402
from exporter.patches import applied, reference_patches, select_patches  # noqa: E402

LENGTHS = (1, 63, 64, 65, 130)  # transformers' gated-delta chunk is 64


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------- gated DeltaNet


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_gated_delta_rule_equals_transformers_torch_code(n, with_state):
    """Both transformers functions (chunked and per-token), 2 key heads serving 4 value heads, q/k L2-normalised
    in the kernel, an initial state carried in and the final state out."""
    from transformers.models.qwen3_next import modeling_qwen3_next as mq

    from exporter.patches.transformers.gated_delta import gated_delta_rule

    torch.manual_seed(n)
    q, k = torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16)
    v = torch.randn(2, n, 4, 8)
    g, beta = -2 * torch.rand(2, n, 4), torch.rand(2, n, 4)
    state = torch.randn(2, 4, 16, 8) if with_state else None
    kw = dict(g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = gated_delta_rule(q, k, v, **kw)
    for fn in (mq.torch_chunk_gated_delta_rule, mq.torch_recurrent_gated_delta_rule):
        ref_out, ref_final = fn.__wrapped__(q, k, v, **kw)  # the torch code under transformers' kernel dispatch
        assert out.shape == ref_out.shape and final.shape == ref_final.shape
        assert _max_err(out, ref_out) < 2e-5 and _max_err(final, ref_final) < 2e-5
    # no state asked for: none returned, as transformers
    assert gated_delta_rule(q, k, v, g=g, beta=beta)[1] is None


def test_gated_delta_patch_chosen_by_identity_and_reference_is_transformers_torch_code():
    """The swap is found from the model's own modeling module; export swaps in the op, the eager reference
    transformers' torch code (with fla importable transformers dispatches to fla's Triton kernel, which has
    no CPU path here); both undone on exit."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    from exporter.patches.transformers.gated_delta import gated_delta_rule

    model = hf.qwen3_5_lm()
    dispatch = mq.torch_chunk_gated_delta_rule
    patches = select_patches(model)
    assert [p.replacement for p in patches] == ["lrexport linear_attention gated_delta"]
    ids = torch.randint(0, hf.VOCAB, (2, 65))
    with torch.no_grad():
        with reference_patches(model):
            assert mq.torch_chunk_gated_delta_rule is dispatch.__wrapped__
            ref = model(ids)
        with applied(model, patches):
            assert mq.torch_chunk_gated_delta_rule is gated_delta_rule
            assert mq.torch_recurrent_gated_delta_rule is gated_delta_rule
            got = model(ids)
    assert mq.torch_chunk_gated_delta_rule is dispatch  # restored
    assert _max_err(got, ref) < 1e-5


def test_fla_kernel_fails_on_cpu_unpatched():
    """Why the reference needs the patch: with fla importable, transformers runs fla's Triton kernel."""
    pytest.importorskip("fla")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: fla's Triton kernels run unpatched")
    with pytest.raises(RuntimeError, match="active drivers"), torch.no_grad():
        hf.qwen3_5_lm()(torch.randint(0, hf.VOCAB, (1, 8)))


# ------------------------------------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_dense_experts_equal_transformers_experts(n, impl):
    """transformers' experts (its default ``grouped_mm``, eager on CPU, and the per-expert ``eager`` loop)
    against the dense form, top-2 of 4."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    from exporter.patches.transformers.moe import PATCHES

    torch.manual_seed(n)
    cfg = Qwen3NextConfig(hidden_size=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          shared_expert_intermediate_size=16)
    cfg._experts_implementation = impl
    block = Qwen3NextSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, n, 32)
    with torch.no_grad():
        ref = block(x)
        (patch,) = PATCHES
        with applied(block, [patch]):
            assert "forward" in vars(block.experts)
            got = block(x)
    assert "forward" not in vars(block.experts)
    assert _max_err(got, ref) < 1e-5


# ---------------------------------------------------------------------------------------------- Mamba-2 SSD


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_ssd_chunk_scan_equals_transformers_torch_code(n, with_state):
    """Mamba-2's scan as the gated rule (q = C, k = dt B, v = x, g = dt A, plus D x) against transformers'
    ``mamba2_chunk_scan`` torch code with chunks of 16: 4 heads in 2 groups, softplus'd dt with bias."""
    from transformers.models.mamba2 import modeling_mamba2 as mm

    from exporter.patches.transformers.mamba2 import ssd_chunk_scan

    torch.manual_seed(n)
    x, dt = torch.randn(2, n, 4, 8), torch.randn(2, n, 4)
    A, D, dt_bias = -3 * torch.rand(4), torch.randn(4), torch.randn(4)
    B, C = torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16)
    state = torch.randn(2, 4, 8, 16) if with_state else None
    kw = dict(chunk_size=16, D=D, dt_bias=dt_bias, initial_states=state, dt_softplus=True, return_final_states=True)
    out, final = ssd_chunk_scan(x, dt, A, B, C, **kw)
    ref_out, ref_final = mm.mamba2_chunk_scan.__wrapped__(x, dt, A, B, C, **kw)
    assert out.shape == ref_out.shape and final.shape == ref_final.shape
    scale = ref_out.abs().max().item()
    assert _max_err(out, ref_out) < 2e-6 * scale and _max_err(final, ref_final) < 2e-6 * ref_final.abs().max().item()


# ------------------------------------------------------------------------------------------------- hybrids

_EXPECTED = {"bamba": ["gated"], "falcon_h1": ["gated"], "granite_moe_hybrid": ["gated", "dense"],
             "nemotron_h": ["gated"], "zamba2": ["gated"], "olmo_hybrid": ["gated_delta"],
             "qwen3_5_moe": ["gated_delta", "dense"]}


@pytest.mark.parametrize("family", sorted(_EXPECTED))
def test_hybrid_patched_equals_transformers(family):
    """Every family that defines transformers' scans (its own copy of ``mamba2_chunk_scan`` or the gated
    delta rule) or decorated experts gets the patch, and the whole patched model equals transformers' own
    torch code at a length that is not a multiple of the chunk (37) and at 1 token."""
    model = hf.hybrid_lm(family)
    patches = select_patches(model)
    assert [p.replacement.split()[-1] if "linear_attention" in p.replacement else p.replacement.split()[0]
            for p in patches] == _EXPECTED[family]
    for n in (1, 37):
        ids = torch.randint(0, hf.VOCAB, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            with reference_patches(model):
                ref = model(ids)
            with applied(model, patches):
                got = model(ids)
        assert _max_err(got, ref) < 1e-5 * max(1.0, ref.abs().max().item()), family


# ---------------------------------------------------------------------------------------- Kimi delta attention


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_kimi_delta_attention_equals_transformers_torch_code(n, with_state):
    """KDA (gated delta rule, decay per key dim) against both transformers functions, chunks of 64."""
    from transformers.models.kimi_linear import modeling_kimi_linear as mk

    from exporter.patches.transformers.kda import kimi_delta_attention

    torch.manual_seed(n)
    q, k, v = torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 8)
    g, beta = -torch.rand(2, n, 2, 16), torch.rand(2, n, 2)
    state = torch.randn(2, 2, 16, 8) if with_state else None
    kw = dict(g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = kimi_delta_attention(q, k, v, **kw)
    for fn in (mk.chunk_kimi_delta_attention, mk.recurrent_kimi_delta_attention):
        ref_out, ref_final = fn.__wrapped__(q, k, v, **kw)
        assert _max_err(out, ref_out) < 2e-5 and _max_err(final, ref_final) < 2e-5


# ------------------------------------------------------------------------------------ MiniMax lightning


@pytest.mark.parametrize("n", [1, 15, 16, 17, 50])
def test_lightning_attention_equals_transformers_block_loop(n):
    """MiniMax's lightning layer (a Python loop over blocks of 16) against the op's gated rule, whole model."""
    model = hf.minimax_lm()
    patches = select_patches(model)
    assert [p.replacement for p in patches] == ["lrexport linear_attention gated", "dense routed experts"]
    ids = torch.randint(0, hf.VOCAB, (2, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        ref = model(ids)
        with applied(model, patches):
            got = model(ids)
    assert _max_err(got, ref) < 1e-5 * max(1.0, ref.abs().max().item())


def test_kernel_bound_on_the_instance_is_swapped_too():
    """Releases that bind the kernel on the layer (``self.chunk_gated_delta_rule = chunk_gated_delta_rule``,
    fla's when importable) get it swapped there: for the op when exporting, for transformers' torch code
    in the eager reference; restored after."""
    fla_gdr = pytest.importorskip("fla.ops.gated_delta_rule")
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    from exporter.patches.transformers.gated_delta import gated_delta_rule

    model = hf.qwen3_5_lm()
    layer = next(m for m in model.modules() if isinstance(m, mq.Qwen3_5GatedDeltaNet))
    layer.chunk_gated_delta_rule = fla_gdr.chunk_gated_delta_rule
    with applied(model, select_patches(model)):
        assert layer.chunk_gated_delta_rule is gated_delta_rule
    with reference_patches(model):  # transformers' torch code (any modeling module's copy: they are the same)
        ref = layer.chunk_gated_delta_rule
        assert ref.__name__ == "torch_chunk_gated_delta_rule" and ref.__module__.startswith("transformers.models.")
        assert not hasattr(ref, "__wrapped__")
    assert layer.chunk_gated_delta_rule is fla_gdr.chunk_gated_delta_rule
