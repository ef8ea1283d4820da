"""Model families as training tasks: how to build, initialise, score and sample each.

Every task turns a batch from ``train.data`` (``tokens [B, T+1]``, ``loss_mask [B, T]``,
``reset [B]``) into a summed next-token loss and a token count, so that validation can
average exactly over batches and bits per byte follow from the mean. Stateful tasks
(Transformer-XL memories, the gallery models) also take and return their recurrent
state; rows flagged by ``reset`` start a new document and forget it.

=====================  =====================================================  ==========
family                 model                                                  batches
=====================  =====================================================  ==========
decoder                ``TransformerWrapper(attn_layers=Decoder(...))``       windows
decoder + max_mem_len  the same with XL memories carried between steps        stream
encoder_decoder        ``XTransformer``: first half of a window -> second     windows
continuous             ``ContinuousAutoregressiveWrapper`` on fixed random    windows
                       vectors standing for the tokens (next-frame MSE)
vit                    ``ViTransformerWrapper``: a window as an image ->      windows
                       the next token (a 256-way classifier on bytes)
nonautoregressive      ``NonAutoregressiveWrapper`` (MaskGIT)                 windows
transformer_xl, ...    the gallery models (``init_state`` / ``state=``)       stream
=====================  =====================================================  ==========
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import xtx
from train.config import ConfigError, ModelConfig
from xtx.config import field_names
from xtx.layers.stack_config import AttentionLayersConfig
from xtx.models.autoregressive import top_k

Array = jax.Array
Batch = dict[str, Array]

_GALLERY = {
    "transformer_xl": (xtx.TransformerXL, xtx.TransformerXLConfig, "segment_len"),
    "memorizing": (xtx.MemorizingTransformer, xtx.MemorizingConfig, "segment_len"),
    "block_recurrent": (xtx.BlockRecurrentTransformer, xtx.BlockRecurrentConfig, "segment_len"),
    "longformer": (xtx.Longformer, xtx.LongformerConfig, "max_seq_len"),
    "rmt": (xtx.RecurrentMemoryTransformer, xtx.RecurrentMemoryConfig, "segment_len"),
}
# Gallery defaults that depend on the sizes (a memory as long as a segment).
_GALLERY_DEFAULTS = {
    "transformer_xl": lambda m: {"mem_len": m.seq_len},
    "memorizing": lambda m: {"mem_len": m.seq_len},
    "block_recurrent": lambda m: {"mem_len": m.seq_len, "block_len": min(64, m.seq_len)},
    "longformer": lambda m: {"window": min(64, m.seq_len)},
    "rmt": lambda m: {},
}


def family_keywords(family: str) -> set[str]:
    """The ``model.options`` keywords a family accepts (for override routing and errors)."""
    wrapper = set(field_names(xtx.TransformerWrapperConfig)) - {"attn_layers", "num_tokens"}
    if family == "decoder":
        return wrapper | AttentionLayersConfig.flat_keywords()
    if family == "encoder_decoder":
        stack = AttentionLayersConfig.flat_keywords()
        return {f"{side}_{k}" for side in ("enc", "dec") for k in stack | wrapper} | {
            "tie_token_emb"
        }
    if family == "nonautoregressive":
        return wrapper | AttentionLayersConfig.flat_keywords() | _nar_keywords()
    if family in _GALLERY:
        return set(field_names(_GALLERY[family][1]))
    if family == "continuous":
        return (
            (set(field_names(xtx.ContinuousConfig)) - {"attn_layers", "dim_out"})
            | AttentionLayersConfig.flat_keywords()
            | _CONTINUOUS_WRAPPER
        )
    if family == "vit":
        return (
            set(field_names(xtx.ViTConfig))
            - {"attn_layers", "image_size", "channels", "num_classes", "channels_last"}
        ) | AttentionLayersConfig.flat_keywords()
    return set()


def _nar_keywords() -> set[str]:
    try:
        from xtx.models.nonautoregressive import NonAutoregressiveWrapper
    except ImportError:
        return set()
    params = inspect.signature(NonAutoregressiveWrapper.__init__).parameters
    return {p for p in params if p not in ("self", "net", "mask_id")}


def _split(options: dict[str, Any], names: set[str]) -> tuple[dict, dict]:
    return (
        {k: v for k, v in options.items() if k in names},
        {k: v for k, v in options.items() if k not in names},
    )


def _take_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def cross_entropy_sum(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Summed next-token cross-entropy over ``mask`` and the number of counted tokens."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


@dataclasses.dataclass
class Task:
    """A model family bound to its sizes.

    Attributes:
      model: the Flax module.
      stateful: batches are streamed and a recurrent state is carried between steps.
      init_state: ``batch_size -> state`` (stateful tasks), else None.
      loss_fn: ``(variables, batch, state, rng, train) -> (loss_sum, count, new_state)``.
      sample_fn: ``(variables, prompt [1, P], n, key) -> [n]`` tokens, or None.
      seq_len: tokens per segment.
      bits: the loss is a cross-entropy in nats (validation also reports bits).
    """

    model: nn.Module
    stateful: bool
    init_state: Callable[[int], Any] | None
    loss_fn: Callable[..., tuple[Array, Array, Any]]
    init_fn: Callable[[Array, Batch], Any]
    sample_fn: Callable[..., Array] | None
    seq_len: int
    bits: bool = True


def build_task(cfg: ModelConfig, vocab_size: int) -> Task:
    """Builds the task for ``cfg`` over a vocabulary of ``vocab_size`` tokens.

    Raises:
      ConfigError: unknown family or a keyword the family's constructor rejects.
    """
    try:
        if cfg.family in ("decoder", "nonautoregressive"):
            return _decoder_task(cfg, vocab_size)
        if cfg.family == "encoder_decoder":
            return _encoder_decoder_task(cfg, vocab_size)
        if cfg.family == "vit":
            return _vit_task(cfg, vocab_size)
        if cfg.family == "continuous":
            return _continuous_task(cfg, vocab_size)
        if cfg.family in _GALLERY:
            return _gallery_task(cfg, vocab_size)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model ({cfg.family}): {e}") from e
    raise ConfigError(f"unknown model.family {cfg.family!r}")


def _decoder_task(cfg: ModelConfig, V: int) -> Task:
    wrapper_names = set(field_names(xtx.TransformerWrapperConfig))
    options = dict(cfg.options)
    nar_options = {}
    if cfg.family == "nonautoregressive":
        nar_options, options = _split(options, _nar_keywords())
    wrapper_kw, stack_kw = _split(options, wrapper_names)
    causal = cfg.family == "decoder"
    stack = (xtx.Decoder if causal else xtx.Encoder)(
        dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, **stack_kw
    )
    num_tokens = V + (0 if causal else 1)  # the NAR mask token is an extra id
    model = xtx.TransformerWrapper(
        num_tokens=num_tokens, max_seq_len=cfg.seq_len, attn_layers=stack, **wrapper_kw
    )
    if not causal:
        return _nar_task(cfg, model, V, nar_options)
    M = model.config.max_mem_len
    dropout = bool(xtx.models.transformer_wrapper.dropout_rates(model.config))

    def init_fn(key, batch):
        return model.init(key, batch["tokens"][:, :-1])

    if not M:

        def loss_fn(variables, batch, state, rng, train):
            tokens = batch["tokens"]
            logits = model.apply(
                variables,
                tokens[:, :-1],
                deterministic=not (train and dropout),
                rngs={"dropout": rng} if train and dropout else None,
            )
            total, count = cross_entropy_sum(logits, tokens[:, 1:], batch["loss_mask"])
            return total, count, state

        sampler = xtx.AutoregressiveWrapper(model)

        def sample_fn(variables, prompt, n, key):
            out = sampler.generate(
                variables, prompt, n, key=key, temperature=1.0, filter_kwargs={"k": 10}
            )
            return out[0]

        return Task(model, False, None, loss_fn, init_fn, sample_fn, cfg.seq_len)

    # Transformer-XL style: memories of every self-attention layer, with a validity mask.
    def init_state(batch_size):
        probe = jnp.zeros((batch_size, cfg.seq_len), jnp.int32)
        shapes = jax.eval_shape(
            lambda: model.init_with_output(jax.random.key(0), probe, return_mems=True)[0][1]
        )
        mems = tuple(jnp.zeros((batch_size, M, s.shape[-1]), s.dtype) for s in shapes)
        return {"mems": mems, "valid": jnp.zeros((batch_size, M), bool)}

    def run(variables, tokens, state, reset, rng, train):
        keep = ~reset
        valid = state["valid"] & keep[:, None]
        mems = tuple(jnp.where(keep[:, None, None], m, 0) for m in state["mems"])
        logits, new_mems = model.apply(
            variables,
            tokens,
            mems=mems,
            mem_masks=(valid,) * len(mems),
            return_mems=True,
            deterministic=not (train and dropout),
            rngs={"dropout": rng} if train and dropout else None,
        )
        T = tokens.shape[1]
        valid = jnp.concatenate([valid, jnp.ones((tokens.shape[0], T), bool)], 1)[:, -M:]
        return logits, {"mems": new_mems, "valid": valid}

    return _stateful_task(model, run, init_state, init_fn, cfg.seq_len)


def _nar_task(cfg: ModelConfig, model, V: int, options: dict) -> Task:
    try:
        from xtx.models.nonautoregressive import NonAutoregressiveWrapper
    except ImportError as e:  # pragma: no cover - the module ships with xtx
        raise ConfigError("nonautoregressive needs xtx.models.nonautoregressive") from e
    # x-transformers 2.31's default MDLM weight schedule'(t) / (1 - schedule(t)) is
    # negative for its decreasing schedules, which would make minimising the loss raise
    # the cross-entropy: train on the unweighted masked-token cross-entropy unless asked.
    options = {"use_simple_mdlm_loss_weight": False, **options}
    wrapper = NonAutoregressiveWrapper(model, mask_id=V, **options)

    def init_fn(key, batch):
        return wrapper.init(key, batch["tokens"][:, 1:])

    def loss_fn(variables, batch, state, rng, train):
        # The MaskGIT objective is a mean over the masked positions of the batch; weight
        # it by the batch's token count so validation averages like the other tasks.
        # Validation uses one fixed masking draw, so its figure is comparable over time.
        key = rng if rng is not None else jax.random.key(0)
        losses = wrapper.apply(variables, batch["tokens"][:, 1:], rngs={"mask": key})
        count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        return losses.loss * count, count, state

    return Task(model, False, None, loss_fn, init_fn, None, cfg.seq_len)


def _encoder_decoder_task(cfg: ModelConfig, V: int) -> Task:
    half = cfg.seq_len // 2
    if half < 1:
        raise ConfigError(f"encoder_decoder needs model.seq_len >= 2, got {cfg.seq_len}")
    kwargs = {
        "enc_num_tokens": V,
        "dec_num_tokens": V,
        "enc_max_seq_len": half,
        "dec_max_seq_len": cfg.seq_len - half,
        "enc_depth": cfg.depth,
        "dec_depth": cfg.depth,
        "enc_heads": cfg.heads,
        "dec_heads": cfg.heads,
        **cfg.options,
    }
    model = xtx.XTransformer(dim=cfg.dim, **kwargs)

    def split(batch):
        tokens = batch["tokens"]
        return tokens[:, :half], tokens[:, half:]

    def logits_of(variables, src, tgt_in):
        return model.apply(variables, src, tgt_in, method=lambda m, s, t: m.decode(t, m.encode(s)))

    def init_fn(key, batch):
        src, tgt = split(batch)
        return model.init(key, src, tgt[:, :-1])

    def loss_fn(variables, batch, state, rng, train):
        src, tgt = split(batch)
        logits = logits_of(variables, src, tgt[:, :-1])
        # The decoder predicts the continuation: targets are tokens half+1 .. T.
        total, count = cross_entropy_sum(logits, tgt[:, 1:], batch["loss_mask"][:, half:])
        return total, count, state

    return Task(model, False, None, loss_fn, init_fn, None, cfg.seq_len)


def _vit_task(cfg: ModelConfig, V: int) -> Task:
    """A ViT as a next-token classifier: the ``seq_len`` tokens before a position, laid
    out row by row as a one-channel ``sqrt(seq_len)``-square image (token id / V),
    predict the token at that position (``num_classes = V``)."""
    side = math.isqrt(cfg.seq_len)
    if side * side != cfg.seq_len:
        raise ConfigError(f"vit needs a square model.seq_len (an image side^2), got {cfg.seq_len}")
    options = dict(cfg.options)
    patch = options.pop("patch_size", 4 if side % 4 == 0 else 1)
    wrapper_kw, stack_kw = _split(options, set(field_names(xtx.ViTConfig)))
    model = xtx.ViTransformerWrapper(
        image_size=side,
        patch_size=patch,
        channels=1,
        channels_last=True,
        num_classes=V,
        attn_layers=xtx.Encoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, **stack_kw),
        **wrapper_kw,
    )

    def images(batch):  # [B, T + 1] -> [B, side, side, 1] and labels [B]
        tokens = batch["tokens"]
        pixels = tokens[:, : cfg.seq_len].astype(jnp.float32) / V
        return pixels.reshape(-1, side, side, 1), tokens[:, cfg.seq_len]

    def init_fn(key, batch):
        return model.init(key, images(batch)[0])

    def loss_fn(variables, batch, state, rng, train):
        img, labels = images(batch)
        logits = model.apply(variables, img)  # [B, V]
        return (*cross_entropy_sum(logits, labels, batch["loss_mask"][:, -1]), state)

    return Task(model, False, None, loss_fn, init_fn, None, cfg.seq_len)


def _continuous_task(cfg: ModelConfig, V: int) -> Task:
    """``ContinuousAutoregressiveWrapper`` on token frames: every token id is drawn as a
    fixed random ``dim_in``-vector (seeded, not learned), and the model regresses the next
    frame (mean squared error by default)."""
    from xtx.models.continuous_autoregressive import ContinuousAutoregressiveWrapper

    options = dict(cfg.options)
    dim_in = options.pop("dim_in", 16)
    wrapper_kw = _split(options, _CONTINUOUS_WRAPPER)[0]
    net_kw, stack_kw = _split(
        {k: v for k, v in options.items() if k not in wrapper_kw},
        set(field_names(xtx.ContinuousConfig)),
    )
    net = xtx.ContinuousTransformerWrapper(
        dim_in=dim_in,
        dim_out=dim_in,
        max_seq_len=cfg.seq_len,
        attn_layers=xtx.Decoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, **stack_kw),
        **net_kw,
    )
    wrapper = ContinuousAutoregressiveWrapper(net, **wrapper_kw)
    table = jax.random.normal(jax.random.key(cfg.depth * 7919 + V), (V, dim_in))

    def frames(batch):  # [B, T + 1] -> [B, T + 1, dim_in]
        return jnp.take(table, batch["tokens"], axis=0)

    def init_fn(key, batch):
        return wrapper.init(key, frames(batch)[:, :-1])

    def loss_fn(variables, batch, state, rng, train):
        mask = batch["loss_mask"]
        loss = wrapper.apply(variables, frames(batch), mask=mask)
        count = jnp.sum(mask.astype(jnp.float32))
        return loss * count, count, state

    return Task(net, False, None, loss_fn, init_fn, None, cfg.seq_len, bits=False)


_CONTINUOUS_WRAPPER = {"loss_fn", "use_l1_loss", "equal_loss_weight_batch"}


def _gallery_task(cfg: ModelConfig, V: int) -> Task:
    cls, config_cls, length_name = _GALLERY[cfg.family]
    kwargs = {
        "num_tokens": V,
        "dim": cfg.dim,
        "depth": cfg.depth,
        "heads": cfg.heads,
        length_name: cfg.seq_len,
        **_GALLERY_DEFAULTS[cfg.family](cfg),
        **cfg.options,
    }
    model = cls(**kwargs)
    params = inspect.signature(cls.__call__).parameters
    dropout = "deterministic" in params and any(
        getattr(model.config, f, 0) for f in ("dropout", "attn_dropout")
    )

    def run(variables, tokens, state, reset, rng, train):
        extra = {}
        if dropout:
            extra = {"deterministic": not train, "rngs": {"dropout": rng} if train else None}
        return model.apply(variables, tokens, state=state, reset=reset, **extra)

    def init_fn(key, batch):
        tokens = batch["tokens"][:, :-1]
        return model.init(key, tokens, state=model.init_state(tokens.shape[0]))

    return _stateful_task(model, run, model.init_state, init_fn, cfg.seq_len)


def _stateful_task(
    model: nn.Module, run: Callable, init_state: Callable, init_fn: Callable, seq_len: int
) -> Task:
    """A streamed task from ``run(variables, tokens, state, reset, rng, train) ->
    (logits, state)``."""

    def loss_fn(variables, batch, state, rng, train):
        tokens = batch["tokens"]
        logits, state = run(variables, tokens[:, :-1], state, batch["reset"], rng, train)
        total, count = cross_entropy_sum(logits, tokens[:, 1:], batch["loss_mask"])
        return total, count, state

    def logits_of(variables, tokens, state):
        return run(variables, tokens, state, jnp.zeros((tokens.shape[0],), bool), None, False)[0]

    sample_fn = _buffer_sampler(logits_of, init_state, seq_len)
    return Task(model, True, init_state, loss_fn, init_fn, sample_fn, seq_len)


def _buffer_sampler(logits_of: Callable, init_state: Callable, seq_len: int) -> Callable:
    """Sampling for models without a KV cache: a fixed ``[1, seq_len]`` buffer is rerun
    once per new token (causality hides the slots not yet written), from a fresh state.
    At most ``seq_len - P`` tokens follow a prompt of length P."""

    @jax.jit
    def run(variables, buffer, start, key):
        state = init_state(1)

        def body(i, carry):
            buffer, key = carry
            logits = logits_of(variables, buffer, state)[0, i - 1]  # [V]
            key, sub = jax.random.split(key)
            token = jax.random.categorical(sub, top_k(logits[None], k=10)[0])
            return buffer.at[0, i].set(token.astype(buffer.dtype)), key

        buffer, _ = jax.lax.fori_loop(start, seq_len, body, (buffer, key))
        return buffer

    def sample(variables, prompt, n, key):
        P = prompt.shape[1]
        if P >= seq_len:
            prompt, P = prompt[:, -(seq_len // 2) :], seq_len // 2
        buffer = jnp.zeros((1, seq_len), jnp.int32).at[:, :P].set(prompt)
        out = run(variables, buffer, P, key)
        return out[0, P : min(P + n, seq_len)]

    return sample
