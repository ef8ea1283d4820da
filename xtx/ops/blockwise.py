"""Blockwise (flash-style) attention in pure JAX: memory linear in sequence length.

FlashAttention (arXiv 2205.14135) restated for XLA: queries are cut into blocks; each
query block walks over key blocks with an online softmax (running max ``m``, running
normaliser ``l``, running output ``acc``), so the ``[T, S]`` score matrix never exists.
Key blocks that the mask hides entirely (the future of a causal query block, keys
outside a sliding window) are not visited: the loop bounds come from the mask
description, not from the mask values. The backward pass is a ``jax.custom_vjp`` that
recomputes each block's probabilities from the saved log-normaliser instead of storing
them.

Numerics match ``reference_attention``: float32 logits and softmax, masked logits
never contribute, a query with no visible key outputs zeros.

An additive bias is either a dense array (sliced per block) or a ``RelativeBias``: a
table over key-query distances that each block gathers its bias from, in the forward
and in the recomputing backward pass, which scatter-adds each block's logit gradient
back into the table. Relative biases (T5, ALiBi, dynamic) then cost memory linear in
the sequence length too.

Shapes: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` (N = G * K, query head i reads kv head
i mod K), output ``[B, T, N, H]``. Inside, heads-major ``[B, K, G, T, H]``; within a
block the G query heads that share a kv head are folded into one query axis of G * bq
rows, so each block costs one matmul per product rather than G. Keys and values are cut
into blocks (keys also transposed) once per call, and the backward pass works keys-major,
so no matmul inside the loops waits on a transposing copy (XLA:CPU's matmul kernels take
the contracting axis last on the left and first on the right).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from xtx.ops.masks import AttentionMask
from xtx.ops.relative_bias import RelativeBias

Array = jax.Array

_NEG = -1e30  # finite "minus infinity" for running maxima of fully masked rows


def _split_heads(q: Array, K: int) -> Array:
    B, T, N, H = q.shape
    return q.reshape(B, T, N // K, K, H).transpose(0, 3, 2, 1, 4)  # [B, K, G, T, H]


def _merge_heads(o: Array) -> Array:
    B, K, G, T, H = o.shape
    return o.transpose(0, 3, 2, 1, 4).reshape(B, T, G * K, H)


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    n = x.shape[axis]
    pad = (-n) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _key_block_range(mask: AttentionMask, T: int, S: int, qi: Array, bq: int, bk: int):
    """First and one-past-last key block that query block ``qi`` can see."""
    n_kb = -(-S // bk)
    lo, hi = jnp.int32(0), jnp.int32(n_kb)
    if mask.q_offset is not None and jnp.ndim(mask.q_offset) > 0:
        return lo, hi  # per-row offsets: keep every block, the dense test masks rows
    P = mask.prefix  # key index = position + P
    offset = S - P - T if mask.q_offset is None else mask.q_offset
    first_q = qi * bq + offset
    last_q = jnp.minimum(qi * bq + bq, T) - 1 + offset
    left, right = mask.window
    if mask.causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:
        hi = jnp.clip((last_q + right + P) // bk + 1, 0, n_kb)
    if left is not None:
        lo = jnp.clip((first_q - left + P) // bk, 0, n_kb)
    return jnp.asarray(lo, jnp.int32), jnp.maximum(hi, lo).astype(jnp.int32)


def _unmasked_block_range(mask: AttentionMask, T: int, S: int, qi, lo, hi, bq: int, bk: int):
    """Key blocks in ``[lo, hi)`` that every real query of block ``qi`` fully sees.

    Those blocks skip building and applying the mask (most blocks of a long causal or
    windowed sequence). Returns an empty range when the mask depends on data (key
    padding, segment ids, per-row offsets): then every block is masked.
    """
    if (
        mask.key_padding is not None
        or mask.q_segment_ids is not None
        or (mask.q_offset is not None and jnp.ndim(mask.q_offset) > 0)
    ):
        return lo, lo
    P = mask.prefix  # key index = position + P
    offset = S - P - T if mask.q_offset is None else mask.q_offset
    first_q = qi * bq + offset
    # Padded query rows past T are computed and cut away: they need no mask.
    last_q = jnp.minimum(qi * bq + bq, T) - 1 + offset
    left, right = mask.window
    if mask.causal:
        right = 0 if right is None else min(right, 0)
    full_lo, full_hi = lo, jnp.minimum(hi, S // bk)  # a partial last key block is masked
    full_lo = jnp.maximum(full_lo, -(-P // bk))  # blocks holding prefix keys are masked
    if right is not None:  # block end - first query <= right
        full_hi = jnp.minimum(full_hi, (first_q + right + 1 + P) // bk)
    if left is not None:  # block start - last query >= -left
        full_lo = jnp.maximum(full_lo, -((left - last_q - P) // bk))
    full_lo = jnp.clip(full_lo, lo, hi).astype(jnp.int32)
    return full_lo, jnp.clip(full_hi, full_lo, hi).astype(jnp.int32)


def _visit_key_blocks(mask, T, S, qi, bq, bk, body, init):
    """``fori_loop`` over the visible key blocks: masked edges, unmasked interior.

    ``body(masked)`` returns the loop body; the online softmax does not care about the
    order in which blocks arrive.
    """
    lo, hi = _key_block_range(mask, T, S, qi, bq, bk)
    full_lo, full_hi = _unmasked_block_range(mask, T, S, qi, lo, hi, bq, bk)
    carry = init
    prefix_blocks = -(-mask.prefix // bk)
    if prefix_blocks:  # prefix keys are seen by all: their blocks outside [lo, hi) too
        carry = jax.lax.fori_loop(0, jnp.minimum(prefix_blocks, lo), body(True), carry)
        carry = jax.lax.fori_loop(hi, jnp.maximum(prefix_blocks, hi), body(True), carry)
    carry = jax.lax.fori_loop(lo, full_lo, body(True), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, body(False), carry)
    return jax.lax.fori_loop(full_hi, hi, body(True), carry)


def _block_mask(mask, T, S, qi, kj, bq, bk, kp, qseg, kseg):
    """Bool ``[B|1, 1, 1, bq, bk]`` for one (query block, key block) pair."""
    q_idx = qi * bq + jnp.arange(bq)
    k_idx = kj * bk + jnp.arange(bk)
    keep = (q_idx[:, None] < T) & (k_idx[None, :] < S)
    keep = keep[None, None, None]
    if mask.causal or mask.window != (None, None):
        q_pos = mask.query_positions(T, S)  # [T] or [B, T]
        q_pos = jnp.pad(q_pos, [(0, 0)] * (q_pos.ndim - 1) + [(0, bq)])
        q_pos = jax.lax.dynamic_slice_in_dim(q_pos, qi * bq, bq, axis=-1)
        k_pos = k_idx - mask.prefix
        rel = k_pos[None, :] - q_pos[..., :, None]  # [bq, bk] or [B, bq, bk]
        ok = jnp.ones(rel.shape, bool)
        left, right = mask.window
        if mask.causal:
            right = 0 if right is None else min(right, 0)
        if right is not None:
            ok &= rel <= right
        if left is not None:
            ok &= rel >= -left
        ok |= k_pos[None, :] < 0  # prefix keys: seen by every query
        keep = keep & (ok[None, None, None] if ok.ndim == 2 else ok[:, None, None])
    if kp is not None:
        kpb = jax.lax.dynamic_slice_in_dim(kp, kj * bk, bk, axis=1)  # [B, bk]
        keep = keep & kpb[:, None, None, None, :]
    if qseg is not None:
        qs = jax.lax.dynamic_slice_in_dim(qseg, qi * bq, bq, axis=1)
        ks = jax.lax.dynamic_slice_in_dim(kseg, kj * bk, bk, axis=1)
        keep = keep & (qs[:, :, None] == ks[:, None, :])[:, None, None]
    return keep


def _block_bias(bias, qi, kj, bq, bk, K, shapes):
    """One ``[B|1, K|1, G|1, bq, bk]`` block of the bias (tiled heads: n = g * K + k).

    Sliced from a padded dense ``[B|1, N|1, Tp, Sp]`` bias, or gathered from the table of
    a ``RelativeBias``.
    """
    if bias is None:
        return None
    if isinstance(bias, RelativeBias):
        b = bias.block(qi * bq, kj * bk, bq, bk, *shapes)  # [B|1, N|1, bq, bk]
    else:
        b = jax.lax.dynamic_slice_in_dim(bias, qi * bq, bq, axis=2)
        b = jax.lax.dynamic_slice_in_dim(b, kj * bk, bk, axis=3)
    Bb, Nb = b.shape[:2]
    if Nb == 1:
        return b[:, None]  # [B, 1, 1, bq, bk]
    return b.reshape(Bb, Nb // K, K, bq, bk).transpose(0, 2, 1, 3, 4)


def _prepare(q, k, v, mask, bias, bq, bk):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    qh = _pad_to(_split_heads(q, K), 3, bq)  # [B, K, G, Tp, H]
    kh = _pad_to(k.transpose(0, 2, 1, 3), 2, bk)  # [B, K, Sp, H]
    vh = _pad_to(v.transpose(0, 2, 1, 3), 2, bk)
    kp = qseg = kseg = None
    if mask.key_padding is not None:
        kp = _pad_to(jnp.broadcast_to(mask.key_padding.astype(bool), (B, S)), 1, bk)
    if mask.q_segment_ids is not None:
        qseg = _pad_to(mask.q_segment_ids, 1, bq)
        kseg = _pad_to(mask.kv_segment_ids, 1, bk)
    if isinstance(bias, RelativeBias):
        bias = dataclasses.replace(bias, table=bias.table.astype(jnp.float32))
    elif bias is not None:
        bias = jnp.broadcast_to(bias, (*bias.shape[:-2], T, S)).astype(jnp.float32)
        while bias.ndim < 4:
            bias = bias[None]
        bias = _pad_to(_pad_to(bias, 2, bq), 3, bk)
    return qh, kh, vh, kp, qseg, kseg, bias


def _dropout_scale(rng, rate, qi, kj, n_kb, shape):
    """Keep-mask / (1 - rate) of one (query block, key block) pair, or None.

    The mask of block (qi, kj) comes from ``fold_in(rng, qi * n_kb + kj)``, so the
    backward pass regenerates exactly the mask the forward pass used.
    """
    if rate == 0.0:
        return None
    keep = jax.random.bernoulli(jax.random.fold_in(rng, qi * n_kb + kj), 1.0 - rate, shape)
    return keep.astype(jnp.float32) / (1.0 - rate)


def _query_rows(x: Array, qi, bq: int) -> Array:
    """Query block ``qi`` of ``[B, K, G, Tp, ...]`` as ``[B, K, G * bq, ...]``."""
    x = jax.lax.dynamic_slice_in_dim(x, qi * bq, bq, axis=3)
    return x.reshape(*x.shape[:2], x.shape[2] * bq, *x.shape[4:])


def _queries_major(x: Array, G: int) -> Array:
    """``[B|1, K|1, G|1, bq, bk]`` -> ``[B|1, K|1, G * bq, bk]`` (row g * bq + q)."""
    x = jnp.broadcast_to(x, (*x.shape[:2], G, *x.shape[3:]))
    return x.reshape(*x.shape[:2], G * x.shape[3], x.shape[4])


def _keys_major(x: Array, G: int) -> Array:
    """``[B|1, K|1, G|1, bq, bk]`` -> ``[B|1, K|1, bk, G * bq]`` (column g * bq + q)."""
    x = jnp.moveaxis(x, -1, 2)  # [B, K, bk, G|1, bq]
    x = jnp.broadcast_to(x, (*x.shape[:3], G, x.shape[-1]))
    return x.reshape(*x.shape[:3], G * x.shape[-1])


def _block_logits(spec, a, b, scale, bias_b, keep, layout, G):
    """One block's scaled float32 logits ``einsum(spec, a, b)``, in ``layout``
    (``_queries_major`` or ``_keys_major``), plus its bias; masked entries (``keep``, if
    given) set to ``_NEG``. Returns the logits and the mask in the same layout."""
    s = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32) * scale
    if bias_b is not None:
        s = s + layout(bias_b, G)
    if keep is None:
        return s, None
    keep = layout(keep, G)
    return jnp.where(keep, s, _NEG), keep


def _key_blocks(x: Array, bk: int) -> Array:
    """``[B, K, Sp, H]`` -> ``[Sp / bk, B, K, bk, H]``."""
    B, K, Sp, H = x.shape
    return jnp.moveaxis(x.reshape(B, K, Sp // bk, bk, H), 2, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, mask, bias, rng, scale, bq, bk, shapes, rate):
    out, _ = _flash_fwd_impl(q, k, v, mask, bias, rng, scale, bq, bk, shapes, rate)
    return out


def _flash_fwd_impl(q, k, v, mask, bias, rng, scale, bq, bk, shapes, rate):
    """Online softmax over key blocks, queries-major: ``s = q k^T``, ``acc += p v``.

    The query groups of a kv head are folded into the query axis and the keys are cut
    into transposed blocks once, so both matmuls read their operands as laid out.
    """
    T, S = shapes
    K = k.shape[2]
    qh, kh, vh, kp, qseg, kseg, biasp = _prepare(q, k, v, mask, bias, bq, bk)
    B, _, G, Tp, H = qh.shape
    n_qb, n_kb = Tp // bq, kh.shape[2] // bk
    kTblocks = jnp.swapaxes(_key_blocks(kh, bk), 3, 4)  # [n_kb, B, K, H, bk]
    vblocks = _key_blocks(vh, bk)  # [n_kb, B, K, bk, H]

    def q_block(qi):
        qb = _query_rows(qh, qi, bq)  # [B, K, G*bq, H]

        def body(masked):
            return functools.partial(step, masked)

        def step(masked, kj, carry):
            m, l, acc = carry
            keep = _block_mask(mask, T, S, qi, kj, bq, bk, kp, qseg, kseg) if masked else None
            bias_b = _block_bias(biasp, qi, kj, bq, bk, K, shapes)
            s, keep = _block_logits(
                "bkqh,bkhs->bkqs", qb, kTblocks[kj], scale, bias_b, keep, _queries_major, G
            )
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            if masked:
                p = jnp.where(keep, p, 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            # Dropout acts on the normalised probabilities: drop p, not the normaliser.
            drop = _dropout_scale(rng, rate, qi, kj, n_kb, (B, K, G, bq, bk))
            p_out = p if drop is None else p * _queries_major(drop, G)
            vb = vblocks[kj]
            pv = jnp.einsum("bkqs,bksh->bkqh", p_out.astype(vb.dtype), vb)
            acc = acc * corr[..., None] + pv.astype(jnp.float32)
            return m_new, l, acc

        init = (
            jnp.full((B, K, G * bq), _NEG, jnp.float32),
            jnp.zeros((B, K, G * bq), jnp.float32),
            jnp.zeros((B, K, G * bq, H), jnp.float32),
        )
        m, l, acc = _visit_key_blocks(mask, T, S, qi, bq, bk, body, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out.reshape(B, K, G, bq, H), lse.reshape(B, K, G, bq)

    outs, lses = jax.lax.map(q_block, jnp.arange(n_qb))  # [n_qb, B, K, G, bq, ...]
    out = jnp.moveaxis(outs, 0, 3).reshape(B, K, G, Tp, H)[:, :, :, :T]
    lse = jnp.moveaxis(lses, 0, 3).reshape(B, K, G, Tp)
    return _merge_heads(out).astype(v.dtype), lse


def _flash_fwd(q, k, v, mask, bias, rng, scale, bq, bk, shapes, rate):
    out, lse = _flash_fwd_impl(q, k, v, mask, bias, rng, scale, bq, bk, shapes, rate)
    return out, (q, k, v, mask, bias, rng, out, lse)


def _flash_bwd(scale, bq, bk, shapes, rate, res, g):
    """Recomputes each block's probabilities, keys-major.

    Every block product is laid out as ``[keys, queries]`` (the query groups of a kv head
    folded into the query axis) so that each matmul reads its operands in the layout
    XLA's CPU kernels take without a transposing copy: ``s^T = k q^T``,
    ``dv = p^T dO``, ``dp^T = v dO^T``, ``dk = ds^T q``, ``dq^T = k^T ds^T``. The
    transposes of q and dO happen once per query block, of k once per call.
    """
    q, k, v, mask, bias, rng, out, lse = res
    T, S = shapes
    K = k.shape[2]
    qh, kh, vh, kp, qseg, kseg, biasp = _prepare(q, k, v, mask, bias, bq, bk)
    B, _, G, Tp, H = qh.shape
    Sp = kh.shape[2]
    do = _pad_to(_split_heads(g, K), 3, bq).astype(jnp.float32)
    o = _pad_to(_split_heads(out, K), 3, bq).astype(jnp.float32)
    # rowsum(dO * O) equals rowsum(P * dP) with or without dropout (O = drop(P) V).
    delta = jnp.sum(do * o, axis=-1)  # [B, K, G, Tp]
    n_qb, n_kb = Tp // bq, Sp // bk
    # Keys and values cut into blocks once, block index leading: each step reads one
    # contiguous block (a strided slice of the minor axis cost more than the matmuls saved).
    kblocks = _key_blocks(kh, bk)  # [n_kb, B, K, bk, H]
    kTblocks = jnp.swapaxes(kblocks, 3, 4).astype(jnp.float32)  # [n_kb, B, K, H, bk]
    vblocks = _key_blocks(vh, bk).astype(jnp.float32)

    def q_block(carry, qi):
        dk, dv, dbias = carry
        qb = _query_rows(qh, qi, bq)  # [B, K, G*bq, H]
        qT = jnp.swapaxes(qb, 2, 3)
        qb32 = qb.astype(jnp.float32)
        dob = _query_rows(do, qi, bq)
        doT = jnp.swapaxes(dob, 2, 3)
        lseb = _query_rows(lse, qi, bq)[:, :, None]  # [B, K, 1, G*bq]
        deltab = _query_rows(delta, qi, bq)[:, :, None]

        def body(masked):
            return functools.partial(step, masked)

        def step(masked, kj, inner):
            dqT, dk, dv, dbias = inner
            kb, kbT, vb = kblocks[kj], kTblocks[kj], vblocks[kj]
            keep = _block_mask(mask, T, S, qi, kj, bq, bk, kp, qseg, kseg) if masked else None
            bias_b = _block_bias(biasp, qi, kj, bq, bk, K, shapes)
            sT, keepT = _block_logits(
                "bksh,bkhq->bksq", kb, qT, scale, bias_b, keep, _keys_major, G
            )
            pT = jnp.exp(sT - lseb)  # [B, K, bk, G*bq]
            if masked:
                pT = jnp.where(keepT, pT, 0.0)
            drop = _dropout_scale(rng, rate, qi, kj, n_kb, (B, K, G, bq, bk))
            dropT = None if drop is None else _keys_major(drop, G)
            dv_b = jnp.einsum("bksq,bkqh->bksh", pT if dropT is None else pT * dropT, dob)
            dpT = jnp.einsum("bksh,bkhq->bksq", vb, doT)
            dpT = dpT if dropT is None else dpT * dropT
            dsT = pT * (dpT - deltab)
            dqT = dqT + jnp.einsum("bkhs,bksq->bkhq", kbT, dsT) * scale
            dk_b = jnp.einsum("bksq,bkqh->bksh", dsT, qb32) * scale
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, kj * bk, bk, axis=2) + dk_b, kj * bk, axis=2
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, kj * bk, bk, axis=2) + dv_b, kj * bk, axis=2
            )
            if dbias is not None:
                ds = jnp.moveaxis(dsT.reshape(B, K, bk, G, bq), 2, -1)  # [B, K, G, bq, bk]
                if isinstance(biasp, RelativeBias):
                    ds_heads = ds.transpose(0, 2, 1, 3, 4).reshape(B, G * K, bq, bk)
                    dbias = biasp.block_grad(dbias, ds_heads, qi * bq, kj * bk, T, S)
                else:
                    dbias = _accumulate_bias_grad(dbias, ds, qi, kj, bq, bk, K)
            return dqT, dk, dv, dbias

        dq0 = jnp.zeros((B, K, H, G * bq), jnp.float32)
        dqT, dk, dv, dbias = _visit_key_blocks(mask, T, S, qi, bq, bk, body, (dq0, dk, dv, dbias))
        dq = jnp.swapaxes(dqT, 2, 3).reshape(B, K, G, bq, H)
        return (dk, dv, dbias), dq

    dk0 = jnp.zeros((B, K, Sp, H), jnp.float32)
    dv0 = jnp.zeros((B, K, Sp, H), jnp.float32)
    if isinstance(biasp, RelativeBias):
        dbias0 = jnp.zeros(biasp.table.shape, jnp.float32)  # the table's gradient
    else:
        dbias0 = None if biasp is None else jnp.zeros(biasp.shape, jnp.float32)
    (dk, dv, dbias), dqs = jax.lax.scan(q_block, (dk0, dv0, dbias0), jnp.arange(n_qb))
    dq = jnp.moveaxis(dqs, 0, 3).reshape(B, K, G, Tp, H)[:, :, :, :T]
    dq = _merge_heads(dq).astype(q.dtype)
    dk = dk[:, :, :S].transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv[:, :, :S].transpose(0, 2, 1, 3).astype(v.dtype)
    # The mask holds ints and bools: no cotangent (None is JAX's symbolic zero).
    if bias is None:
        return dq, dk, dv, None, None, None
    if isinstance(bias, RelativeBias):
        # Only the table is differentiable; q_offset holds ints.
        dtable = dbias.astype(bias.table.dtype)
        return dq, dk, dv, None, dataclasses.replace(bias, table=dtable, q_offset=None), None
    dbias = dbias[:, :, :T, :S]
    dbias = _sum_to_shape(dbias, bias.shape).astype(bias.dtype)
    return dq, dk, dv, None, dbias, None


def _accumulate_bias_grad(dbias, ds, qi, kj, bq, bk, K):
    """Adds a block's logit gradient ``[B, K, G, bq, bk]`` into ``[B|1, N|1, Tp, Sp]``."""
    Bb, Nb = dbias.shape[:2]
    B, _, G = ds.shape[:3]
    if Nb == 1:
        blk = ds.sum(axis=(1, 2))[:, None]
    else:
        blk = ds.transpose(0, 2, 1, 3, 4).reshape(B, G * K, bq, bk)
    if Bb == 1:
        blk = blk.sum(0, keepdims=True)
    cur = jax.lax.dynamic_slice(dbias, (0, 0, qi * bq, kj * bk), (Bb, Nb, bq, bk))
    return jax.lax.dynamic_update_slice(dbias, cur + blk, (0, 0, qi * bq, kj * bk))


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    while x.ndim > len(shape):
        x = x.sum(0)
    axes = tuple(
        i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1
    )
    return x.sum(axes, keepdims=True) if axes else x


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | RelativeBias | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Attention over blocks with an online softmax; same results as the reference.

    Args:
      q, k, v, mask, bias, scale: as ``xtx.ops.attention``. ``mask.explicit`` is not
        supported here (a dense mask defeats the purpose): use the reference backend.
        A ``RelativeBias`` is expanded block by block and gets a gradient for its table.
      dropout_rate, dropout_rng: dropout on the attention probabilities. Each
        (query block, key block) draws its mask from ``fold_in(dropout_rng, index)``,
        so results depend on the block sizes (they are not the reference backend's
        draws; both are exact dropout with the same expectation).
      block_q, block_k: block sizes (clipped to the sequence lengths); default
        ``default_block_size`` of T and of S.

    Returns:
      ``[B, T, N, H]``.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("attention dropout_rate > 0 needs dropout_rng (or deterministic=True)")
    mask = AttentionMask() if mask is None else mask
    if mask.explicit is not None:
        raise ValueError("the blockwise backend takes no explicit dense mask; use 'reference'")
    T, S, H = q.shape[1], k.shape[1], q.shape[-1]
    scale = H**-0.5 if scale is None else scale
    bq = max(1, min(block_q or default_block_size(T), T))
    bk = max(1, min(block_k or default_block_size(S), S))
    if isinstance(bias, RelativeBias):
        bias.check(q.shape[0], q.shape[2], T, S)
    elif bias is not None:
        bias = jnp.asarray(bias)
    rng = dropout_rng if dropout_rate > 0.0 else None
    return _flash(q, k, v, mask, bias, rng, float(scale), bq, bk, (T, S), float(dropout_rate))


def default_block_size(length: int | None = None) -> int:
    """Block size along an axis of ``length`` tokens: on CPU 64 below 512, else 128;
    128 elsewhere.

    Measured with ``python -m bench.attention`` on the project's 2-core CPU (causal,
    fwd + bwd, 8 heads of 64, heads split over the two cores): 64x64 blocks were about
    15% faster than 128x128 at 256 tokens, 128x128 about 8% faster at 512 and 15-20%
    faster at 1024 and 4096. Accelerators want larger tiles.
    """
    if jax.default_backend() != "cpu":
        return 128
    return 64 if length is not None and length < 512 else 128


def blockwise_supported(mask: AttentionMask | None) -> bool:
    """Whether ``blockwise_attention`` handles this mask (no dense explicit mask)."""
    return mask is None or mask.explicit is None
