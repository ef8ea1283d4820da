"""Attention options: ``AttentionConfig`` (the x-transformers ``attn_*`` keywords) and
the rotary settings a stack hands to its self-attention layers.

See ``xtx.layers.attention`` for what each option does and its paper.
"""

from __future__ import annotations

import dataclasses

import jax

from xtx.config import Config

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(Config):
    """Per-layer attention options; x-transformers keywords with the ``attn_`` prefix.

    Attributes:
      dim_head: width of each head (x-transformers default 64, independent of ``dim``).
      kv_heads: number of key/value heads (grouped-query attention); None = ``heads``.
      one_kv_head: multi-query attention (``kv_heads = 1``).
      dropout: dropout on the attention probabilities.
      num_mem_kv: learned memory key/values prepended to every head's keys and values.
      dim_context: width of the cross-attention context (None = model dim).
      flash: accepted for x-transformers compatibility: use the fast attention path
        (same results; xtx picks the fastest backend for the platform anyway).
      implementation: ``xtx.ops.attention`` backend (``"auto"``, ``"reference"``, ...).
      sparse_topk: attend only to the k largest logits of each row (1912.11637); all keys
        when k >= the number of keys (x-transformers 2.31 raises there).
      sparse_topk_straight_through: with ``sparse_topk``, backpropagate the gradient of
        the dense normaliser (2505.22074).
      pre_talking_heads: mix the heads' logits, ``S + W·S`` (2003.02436); W ``[N, N]``,
        identity init.
      post_talking_heads: mix the heads' probabilities after dropout, ``A <- W·A``.
      talking_heads: the seed's keyword: sets ``pre_talking_heads`` and
        ``post_talking_heads`` (2.31 semantics, not the seed's random non-residual
        mixing) and reads False afterwards.
      hard: one-hot attention at each row's largest logit, with the softmax gradient
        (straight-through).
      softclamp_logits: ``tanh(S / c) · c`` on the biased logits, before masking, with
        ``c = logit_softclamp_value``.
      use_entmax15: 1.5-entmax instead of softmax (seed x-transformers; 1909.00015).
      on_attn: attention on attention: output projection to 2D followed by a GLU.
      gate_values: gate the heads' outputs by ``sigmoid(W x)`` (W zero-initialised).
      head_scale: a learned scalar per head on the heads' outputs (initialised to 1).
      qk_norm: l2-normalise q and k per group of ``dim_head // qk_norm_groups`` dims;
        the logits scale becomes ``qk_norm_scale``. Memory keys are normalised too.
      qk_norm_groups: number of groups of the qk-norm.
      qk_norm_scale: logits scale with ``qk_norm`` (ignored with ``qk_norm_dim_scale``).
      qk_norm_dim_scale: learned per-head, per-dim gains on the normalised q and k
        (initialised to ``dim_head ** 0.25``) and the usual ``dim_head ** -0.5`` scale.
      qk_rmsnorm: RMSNorm on q and k with per-head, per-dim gains (stored minus one).
      collab_heads: seed-only collaborative heads: one query and one key projection of
        width ``int(collab_compression * heads * dim_head)`` shared by the heads, mixed
        per head by a learned ``[heads, width]`` matrix. No x-transformers 2.31 equivalent.
      collab_compression: the width ratio of ``collab_heads``.
    """

    dim_head: int = 64
    kv_heads: int | None = None
    one_kv_head: bool = False
    dropout: float = 0.0
    num_mem_kv: int = 0
    dim_context: int | None = None
    flash: bool = False
    implementation: str = "auto"
    # Logits-side features (x-transformers keywords without the attn_ prefix).
    sparse_topk: int | None = None
    sparse_topk_straight_through: bool = False
    pre_talking_heads: bool = False
    post_talking_heads: bool = False
    talking_heads: bool = False
    hard: bool = False
    softclamp_logits: bool = False
    logit_softclamp_value: float = 50.0
    use_entmax15: bool = False
    # Projection-side features.
    on_attn: bool = False
    gate_values: bool = False
    head_scale: bool = False
    qk_norm: bool = False
    qk_norm_groups: int = 1
    qk_norm_scale: float = 10.0
    qk_norm_dim_scale: bool = False
    qk_rmsnorm: bool = False
    collab_heads: bool = False
    collab_compression: float = 0.3

    def __post_init__(self):
        if self.dim_head <= 0:
            raise ValueError(f"attn_dim_head must be a positive int, got {self.dim_head}")
        if self.kv_heads is not None and self.kv_heads <= 0:
            raise ValueError(f"attn_kv_heads must be a positive int, got {self.kv_heads}")
        if self.one_kv_head and self.kv_heads not in (None, 1):
            raise ValueError(
                f"attn_one_kv_head=True means one key/value head, but attn_kv_heads={self.kv_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.dropout}")
        if self.num_mem_kv < 0:
            raise ValueError(f"attn_num_mem_kv must be >= 0, got {self.num_mem_kv}")
        self._check_projection_options()
        self._check_logit_options()

    def _check_logit_options(self):
        if self.talking_heads:
            # The seed spelling: 2.31 semantics (identity-initialised 1x1 head mixing, the
            # pre-softmax one residual), stored as the two 2.31 switches.
            object.__setattr__(self, "pre_talking_heads", True)
            object.__setattr__(self, "post_talking_heads", True)
            object.__setattr__(self, "talking_heads", False)
        k = self.sparse_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"attn_sparse_topk must be a positive int or None, got {k!r}")
        if self.sparse_topk_straight_through and k is None:
            raise ValueError("attn_sparse_topk_straight_through=True needs attn_sparse_topk")
        if self.softclamp_logits and not self.logit_softclamp_value > 0:
            raise ValueError(
                f"attn_logit_softclamp_value must be > 0, got {self.logit_softclamp_value!r}"
            )
        if self.hard and self.use_entmax15:
            raise ValueError("attn_hard=True and attn_use_entmax15=True exclude each other")
        if self.hard and k is not None:
            raise ValueError(f"attn_hard=True and attn_sparse_topk={k} exclude each other")

    @property
    def normalizer(self) -> str:
        """The ``xtx.ops.attention`` normaliser these options select."""
        if self.hard:
            return "hard"
        return "entmax15" if self.use_entmax15 else "softmax"

    def _check_projection_options(self):
        if self.qk_norm:
            g = self.qk_norm_groups
            if not isinstance(g, int) or g < 1 or self.dim_head % g:
                raise ValueError(
                    f"attn_qk_norm_groups must be an int >= 1 dividing attn_dim_head "
                    f"({self.dim_head}), got {g!r}"
                )
            if self.dim_head // g <= 2:
                # x-transformers asserts the same: 2 dims per group do not train.
                raise ValueError(
                    f"attn_qk_norm_groups={g} leaves attn_dim_head // groups = "
                    f"{self.dim_head // g} dims per group; it must be > 2"
                )
        elif self.qk_norm_dim_scale:
            raise ValueError("attn_qk_norm_dim_scale=True needs attn_qk_norm=True")
        if self.collab_heads:
            if not self.collab_compression > 0:
                raise ValueError(
                    f"attn_collab_compression must be > 0, got {self.collab_compression!r}"
                )
            others = {
                "attn_num_mem_kv": self.num_mem_kv,
                "attn_kv_heads": self.kv_heads,
                "attn_one_kv_head": self.one_kv_head,
                "attn_qk_norm": self.qk_norm,
                "attn_qk_rmsnorm": self.qk_rmsnorm,
            }
            for name, value in others.items():
                if value:
                    # Collaborative heads share one key projection of a compressed width,
                    # which these per-head key options cannot be defined on.
                    raise ValueError(f"attn_collab_heads=True excludes {name} (got {value!r})")

    def collab_dim(self, heads: int) -> int:
        """Width of the shared query/key projection of collaborative heads (2006.16362)."""
        width = int(self.collab_compression * heads * self.dim_head)
        if width < 1:
            raise ValueError(
                f"attn_collab_compression={self.collab_compression} gives a shared query/key "
                f"width of int({self.collab_compression} * heads * dim_head) = {width}; "
                "it must be >= 1"
            )
        return width

    def num_kv_heads(self, heads: int) -> int:
        kv = 1 if self.one_kv_head else (self.kv_heads or heads)
        if heads % kv:
            raise ValueError(
                f"heads ({heads}) must be divisible by the number of key/value heads ({kv})"
            )
        return kv


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotarySettings(Config):
    """Rotary embedding options shared by every self-attention layer of a stack.

    ``xpos_scale_base`` turns on xPos (2212.10554): queries are scaled by
    ``xpos_scale(positions)`` and keys by its reciprocal; None = plain rotary.
    """

    dim: int
    base: float = 10000.0
    interpolation_factor: float = 1.0
    base_rescale_factor: float = 1.0
    interleaved: bool = True
    xpos_scale_base: float | None = None
