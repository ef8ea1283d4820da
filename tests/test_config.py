"""Configs are frozen, hashable, printable and round-trip through dicts and JSON.

A training run must be reproducible from its config file alone, so every model config
goes to a plain dict (and JSON) and back to an equal config, and a model rebuilt from
the copy computes exactly what the original computes with the same variables.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from xtx import (
    AttentionConfig,
    AttentionLayersConfig,
    ContinuousConfig,
    ContinuousTransformerWrapper,
    Decoder,
    Encoder,
    FeedForwardConfig,
    TransformerWrapper,
    TransformerWrapperConfig,
    ViTConfig,
    ViTransformerWrapper,
    XTransformer,
    XTransformerConfig,
)

B, T, V, D, HEADS = 2, 16, 64, 32, 4
IMAGE, PATCH = 16, 4


def _key(seed):
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU.
    return jax.random.key(seed, impl="rbg")


def _stack_config():
    return AttentionLayersConfig.from_flat(
        dim=D,
        custom_layers=["a", "c", "f", "f"],  # a list, stored as a tuple
        heads=HEADS,
        cross_attend=True,
        rotary_pos_emb=True,
        attn_kv_heads=2,
        attn_dim_head=16,
        cross_attn_dim_head=8,
        ff_glu=True,
        ff_mult=2.5,
    )


def _wrapper_config():
    return TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        emb_dropout=0.1,
        num_memory_tokens=2,
        attn_layers=Decoder(dim=D, depth=2, heads=HEADS, attn_kv_heads=2, ff_glu=True),
    ).config


def _xtransformer_config():
    return XTransformer(
        dim=D,
        enc_num_tokens=V,
        enc_depth=1,
        enc_heads=HEADS,
        enc_max_seq_len=T,
        enc_num_memory_tokens=3,
        dec_num_tokens=V,
        dec_depth=1,
        dec_heads=HEADS,
        dec_max_seq_len=T,
        dec_rotary_pos_emb=True,
        tie_token_emb=True,
    ).config


def _vit_config():
    return ViTransformerWrapper(
        image_size=IMAGE,
        patch_size=PATCH,
        num_classes=10,
        num_register_tokens=2,
        channels_last=True,
        attn_layers=Encoder(dim=D, depth=1, heads=HEADS, use_rmsnorm=True),
    ).config


def _continuous_config():
    return ContinuousTransformerWrapper(
        dim_in=8,
        dim_out=3,
        max_seq_len=T,
        probabilistic=True,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, alibi_pos_bias=True),
    ).config


CONFIGS = {
    "stack": _stack_config,
    "wrapper": _wrapper_config,
    "xtransformer": _xtransformer_config,
    "vit": _vit_config,
    "continuous": _continuous_config,
    "attention": lambda: AttentionConfig(dim_head=16, kv_heads=2, num_mem_kv=4),
    "feedforward": lambda: FeedForwardConfig(mult=2, glu=True, swish=True),
}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]()


def _is_plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def test_dict_round_trip(config):
    data = config.to_dict()
    assert _is_plain(data)
    copy = type(config).from_dict(data)
    assert copy == config
    assert copy is not config
    assert hash(copy) == hash(config)
    assert copy.to_dict() == data


def test_json_round_trip(config):
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    copy = type(config).from_json(text)
    assert copy == config
    assert hash(copy) == hash(config)
    assert type(config).from_json(copy.to_json(indent=2)) == config


def test_round_trip_restores_nested_types():
    stack = _stack_config()
    assert stack.custom_layers == ("a", "c", "f", "f")
    data = json.loads(stack.to_json())
    assert data["custom_layers"] == ["a", "c", "f", "f"]
    copy = AttentionLayersConfig.from_dict(data)
    assert type(copy.custom_layers) is tuple
    assert type(copy.attn) is AttentionConfig and copy.attn.kv_heads == 2
    assert type(copy.cross_attn) is AttentionConfig and copy.cross_attn.dim_head == 8
    assert type(copy.ff) is FeedForwardConfig and copy.ff.mult == 2.5
    assert copy.layer_types == ("a", "c", "f", "f")

    xcfg = XTransformerConfig.from_json(_xtransformer_config().to_json())
    assert type(xcfg.enc) is TransformerWrapperConfig
    assert type(xcfg.dec.attn_layers) is AttentionLayersConfig
    assert xcfg.enc.num_memory_tokens == 3 and xcfg.dec.attn_layers.rotary_pos_emb

    # A wrapper accepts its stack as a dict as well.
    wrapper = _wrapper_config()
    rebuilt = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        emb_dropout=0.1,
        num_memory_tokens=2,
        attn_layers=wrapper.attn_layers.to_dict(),
    )
    assert rebuilt.config == wrapper


def test_configs_are_hashable_keys_and_static_jit_args():
    a, b = _wrapper_config(), _wrapper_config()
    assert a is not b and a == b
    table = {a: "first"}
    assert table[b] == "first"
    assert len({a, b, _vit_config(), ViTConfig.from_dict(_vit_config().to_dict())}) == 2

    traces = []

    def scale(x, cfg):
        traces.append(cfg)
        return x * cfg.attn_layers.dim

    scale = jax.jit(scale, static_argnums=1)
    x = np.ones(3, np.float32)
    np.testing.assert_array_equal(scale(x, a), x * D)
    np.testing.assert_array_equal(scale(x, b), x * D)  # equal config: no retrace
    assert len(traces) == 1
    np.testing.assert_array_equal(scale(x, a.replace(num_tokens=V + 1)), x * D)
    assert len(traces) == 2


def test_configs_are_frozen():
    cfg = _wrapper_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_tokens = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.attn_layers.heads = 2


def test_replace_swaps_a_feature():
    stack = _wrapper_config().attn_layers
    rotary = dataclasses.replace(stack, rotary_pos_emb=True)
    assert rotary.rotary_pos_emb and not stack.rotary_pos_emb
    assert rotary == stack.replace(rotary_pos_emb=True)
    assert rotary != stack
    assert rotary.abs_pos_emb_disabled and not stack.abs_pos_emb_disabled
    # Everything else is kept.
    assert dataclasses.replace(rotary, rotary_pos_emb=False) == stack
    # The checks run again on the new config.
    with pytest.raises(ValueError, match="rel_pos_bias and alibi_pos_bias exclude each other"):
        stack.replace(rel_pos_bias=True, alibi_pos_bias=True)
    with pytest.raises(TypeError, match=r"'rotary_pos_embed' \(did you mean 'rotary_pos_emb'\?\)"):
        stack.replace(rotary_pos_embed=True)


def test_str_shows_the_non_default_fields_one_per_line():
    assert str(AttentionLayersConfig(dim=D, depth=1)) == (
        "AttentionLayersConfig(\n    dim=32,\n    depth=1,\n)"
    )
    assert str(FeedForwardConfig()) == "FeedForwardConfig()"

    text = str(_wrapper_config())
    lines = text.splitlines()
    assert lines[0] == "TransformerWrapperConfig("
    assert lines[-1] == ")"
    for line in (
        "    num_tokens=64,",
        "    emb_dropout=0.1,",
        "    num_memory_tokens=2,",
        "    attn_layers=AttentionLayersConfig(",
        "        causal=True,",
        "        attn=AttentionConfig(",
        "            kv_heads=2,",
        "        ff=FeedForwardConfig(",
        "            glu=True,",
    ):
        assert line in lines, line
    for default_field in ("post_emb_norm", "tie_embedding", "rotary_pos_emb", "dim_head", "swish"):
        assert default_field not in text
    assert repr(_wrapper_config()) != text  # repr stays the full dataclass repr


@pytest.mark.parametrize(
    ("cls", "data", "bad", "good"),
    [
        (AttentionConfig, {"dim_heads": 8}, "dim_heads", "dim_head"),
        (AttentionLayersConfig, {"dim": D, "depth": 1, "casual": True}, "casual", "causal"),
        (ViTConfig, {"image_size": IMAGE, "patch_sizes": PATCH}, "patch_sizes", "patch_size"),
    ],
)
def test_from_dict_unknown_key(cls, data, bad, good):
    with pytest.raises(TypeError, match=rf"from_dict .*'{bad}' \(did you mean '{good}'\?\)"):
        cls.from_dict(data)


def test_from_dict_unknown_nested_key():
    data = _wrapper_config().to_dict()
    data["attn_layers"]["attn"]["num_mem_kvs"] = 4
    with pytest.raises(TypeError, match=r"'num_mem_kvs' \(did you mean 'num_mem_kv'\?\)"):
        TransformerWrapperConfig.from_dict(data)
    with pytest.raises(TypeError, match="expects a mapping"):
        TransformerWrapperConfig.from_dict([("num_tokens", V)])


def _lm():
    model = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        emb_dropout=0.1,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, rotary_pos_emb=True, ff_glu=True),
    )
    return model, (jax.random.randint(_key(0), (B, T), 0, V),)


def _xtransformer():
    model = XTransformer(
        dim=D,
        enc_num_tokens=V,
        enc_depth=1,
        enc_heads=HEADS,
        enc_max_seq_len=T,
        dec_num_tokens=V,
        dec_depth=1,
        dec_heads=HEADS,
        dec_max_seq_len=T,
        tie_token_emb=True,
    )
    src = jax.random.randint(_key(0), (B, T), 0, V)
    tgt = jax.random.randint(_key(1), (B, T), 0, V)
    return model, (src, tgt)


def _vit():
    model = ViTransformerWrapper(
        image_size=IMAGE,
        patch_size=PATCH,
        num_classes=10,
        attn_layers=Encoder(dim=D, depth=1, heads=HEADS),
    )
    return model, (jax.random.normal(_key(5), (B, 3, IMAGE, IMAGE)),)


def _continuous():
    model = ContinuousTransformerWrapper(
        dim_in=32,
        dim_out=100,
        max_seq_len=T,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS),
    )
    return model, (jax.random.normal(_key(0), (B, T, 32)),)


MODELS = {"lm": _lm, "xtransformer": _xtransformer, "vit": _vit, "continuous": _continuous}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_rebuilt_from_round_tripped_config_matches(name):
    model, inputs = MODELS[name]()
    variables = model.init(_key(7), *inputs)
    config = model.config
    copy = type(config).from_json(config.to_json())
    rebuilt = type(model)(config=copy)
    assert rebuilt.config == config
    np.testing.assert_array_equal(
        rebuilt.apply(variables, *inputs), model.apply(variables, *inputs)
    )
    # The rebuilt model has the same parameter tree as well.
    shapes = jax.eval_shape(rebuilt.init, _key(7), *inputs)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)


def test_continuous_config_checks_run_on_from_dict():
    data = _continuous_config().to_dict()
    data["dim_out"] = None
    with pytest.raises(ValueError, match="probabilistic=True needs dim_out"):
        ContinuousConfig.from_dict(data)
