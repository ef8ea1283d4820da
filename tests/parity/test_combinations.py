"""Many features at once: parity with x-transformers 2.31.10 when options interact."""

import pytest
import torch
import x_transformers as xt

from tests.parity.harness import _ragged_mask, _tokens, assert_parity

COMBOS = {
    "rotary+gqa+qknorm+xl-wrapper": (
        dict(max_mem_len=6),
        dict(rotary_pos_emb=True, attn_kv_heads=2, attn_qk_norm=True),
    ),
    "t5+residual-attn+post-norm+memory-tokens": (
        dict(num_memory_tokens=2),
        dict(rel_pos_bias=True, residual_attn=True, pre_norm=False),
    ),
    "mem-kv+t5+talking-heads+topk": (
        {},
        dict(
            rel_pos_bias=True,
            attn_num_mem_kv=2,
            attn_pre_talking_heads=True,
            attn_post_talking_heads=True,
            attn_sparse_topk=4,
        ),
    ),
    "kitchen-sink": (
        dict(num_memory_tokens=2, tie_embedding=True),
        dict(
            alibi_pos_bias=True,
            ff_glu=True,
            ff_swish=True,
            use_rmsnorm=True,
            gate_residual=True,
            attn_gate_values=True,
            attn_head_scale=True,
            sandwich_norm=True,
            macaron=True,
            shift_tokens=1,
            attn_softclamp_logits=True,
            add_value_residual=True,
        ),
    ),
    "hyper-connections+layerscale+xpos+on-attn": (
        {},
        dict(num_residual_streams=2, use_layerscale=True, rotary_xpos=True, attn_on_attn=True),
    ),
}


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination(name):
    wrapper_kw, stack_kw = COMBOS[name]
    torch.manual_seed(40)
    model = xt.TransformerWrapper(
        num_tokens=64,
        max_seq_len=16,
        attn_layers=xt.Decoder(dim=32, depth=2, heads=4, **stack_kw),
        **wrapper_kw,
    )
    with torch.no_grad():  # move every weight off its init (zero-init gates included)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _tokens(41)
    mask = _ragged_mask([10, 6], 10)
    assert_parity(model, (x,), {"mask": mask})
