"""Converting the x-transformers training wrappers (2.31) into their xtx counterparts.

``wrapper_from_x_transformers(model, convert)`` handles ``AutoregressiveWrapper``,
``XLAutoregressiveWrapper``, ``NonAutoregressiveWrapper`` and
``ContinuousAutoregressiveWrapper``: the wrapped
networks go through ``convert`` (``from_x_transformers`` with the caller's options, so
they are verified the same way), the wrapper's options are carried over, and its own
weights (self-conditioning, the self-critic head) are transposed from torch's
``Linear`` layout ``[out, in]`` to xtx kernels ``[in, out]``. An option xtx does not
implement raises ``UnsupportedOption`` naming it. x-transformers' ``tbptt_steps`` of the
XL wrapper is an argument of each call in xtx: pass ``bptt_segments=model.tbptt_steps`` to
``apply`` (the loss value does not depend on it, only its gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from xtx.interop.layout import _fail
from xtx.models.autoregressive import AutoregressiveWrapper
from xtx.models.continuous_autoregressive import ContinuousAutoregressiveWrapper
from xtx.models.nonautoregressive import NonAutoregressiveWrapper
from xtx.models.xl_autoregressive import XLAutoregressiveWrapper

__all__ = ["WRAPPER_CLASSES", "is_torch_wrapper", "wrapper_from_x_transformers"]

WRAPPER_CLASSES = (
    "AutoregressiveWrapper",
    "XLAutoregressiveWrapper",
    "NonAutoregressiveWrapper",
    "ContinuousAutoregressiveWrapper",
)

Converter = Callable[[Any], tuple[Any, dict[str, Any]]]


def is_torch_wrapper(model: Any) -> bool:
    """Whether ``model`` is one of the x-transformers wrappers converted here."""
    cls = type(model)
    return cls.__name__ in WRAPPER_CLASSES and cls.__module__.startswith("x_transformers")


def _array(tensor: Any) -> jnp.ndarray:
    return jnp.asarray(tensor.detach().float().cpu().numpy(), jnp.float32)


def _autoregressive(model: Any, convert: Converter) -> tuple[Any, dict[str, Any]]:
    if model.add_attn_z_loss:
        raise _fail("add_attn_z_loss", "AutoregressiveWrapper")
    net, variables = convert(model.net)
    wrapper = AutoregressiveWrapper(
        net,
        ignore_index=model.ignore_index,
        pad_value=model.pad_value,
        mask_prob=float(model.mask_prob),
    )
    return wrapper, variables


def _xl_autoregressive(model: Any, convert: Converter) -> tuple[Any, dict[str, Any]]:
    # Test-time training and episodic memories (x-transformers 2.31) have no xtx version.
    if model.ttt_paths_map or model.ttt_custom_loss_module is not None:
        raise _fail("ttt_module_paths / ttt_low_rank_paths / ttt_next_latent_loss")
    if model.has_episodic_mem:
        raise _fail("episodic_mem_len")
    net, variables = convert(model.net)
    wrapper = XLAutoregressiveWrapper(
        net, ignore_index=model.ignore_index, pad_value=model.pad_value
    )
    return wrapper, variables


def _schedule_name(model: Any) -> str:
    from x_transformers import nonautoregressive_wrapper as nar

    names = {nar.linear_schedule: "linear", nar.cosine_schedule: "cosine"}
    if model.schedule_fn not in names:
        raise _fail("a custom schedule callable", "NonAutoregressiveWrapper; pass a jax one")
    return names[model.schedule_fn]


def _nonautoregressive(model: Any, convert: Converter) -> tuple[Any, dict[str, Any]]:
    net, net_variables = convert(model.net)
    params: dict[str, Any] = {"net": net_variables["params"]}
    critic = model.token_critic
    critic_module, self_token_critic = None, False
    if critic is not None:
        if type(critic).__name__ == "SelfCritic":
            if critic.net is not model.net:
                raise _fail("a SelfCritic around another network")
            self_token_critic = True
            params["critic_head"] = {
                "kernel": _array(critic.to_logits.weight).T,  # [D, 1]
                "bias": _array(critic.to_logits.bias),
            }
        elif type(critic).__name__ == "TransformerWrapper":
            critic_module, critic_variables = convert(critic)
            params["token_critic"] = critic_variables["params"]
        else:
            raise _fail(f"token_critic of class {type(critic).__name__}")
    if model.self_cond:
        params["null_embed"] = _array(model.null_embed)
        params["to_self_cond"] = {"kernel": _array(model.to_self_cond.weight).T}  # [E, E]
    wrapper = NonAutoregressiveWrapper(
        net,
        mask_id=int(model.mask_id),
        steps=model.steps,
        self_cond=model.self_cond,
        self_cond_train_prob=getattr(model, "self_cond_train_prob", 0.75),
        no_replace_prob=model.no_replace_prob,
        random_token_prob=model.random_token_prob,
        schedule=_schedule_name(model),
        can_mask_prev_unmasked=model.can_mask_prev_unmasked,
        token_critic=critic_module,
        self_token_critic=self_token_critic,
        critic_loss_weight=model.critic_loss_weight,
        use_simple_mdlm_loss_weight=model.loss_weight_fn is not None,
    )
    return wrapper, {"params": params}


def _continuous_autoregressive(model: Any, convert: Converter) -> tuple[Any, dict[str, Any]]:
    net, variables = convert(model.net)
    loss = model.loss_fn
    name = type(loss).__name__
    kinds = {"MSELoss": "mse", "L1Loss": "l1", "GaussianNLL": "gaussian_nll"}
    if name not in kinds:
        raise _fail(f"loss_fn of class {name}", "ContinuousAutoregressiveWrapper")
    if name != "GaussianNLL" and loss.reduction != "none":
        raise _fail(f"a loss_fn with reduction={loss.reduction!r}")
    wrapper = ContinuousAutoregressiveWrapper(
        net,
        loss_fn=kinds[name],
        equal_loss_weight_batch=bool(model.equal_loss_weight_batch),
    )
    return wrapper, variables


def wrapper_from_x_transformers(model: Any, convert: Converter) -> tuple[Any, dict[str, Any]]:
    """Converts an x-transformers wrapper.

    Args:
      model: an x-transformers ``AutoregressiveWrapper``, ``XLAutoregressiveWrapper``,
        ``NonAutoregressiveWrapper`` or ``ContinuousAutoregressiveWrapper``.
      convert: converts a network (``from_x_transformers`` with its options bound).

    Returns:
      ``(wrapper, variables)``: the xtx wrapper with the same options, and its variables.

    Raises:
      UnsupportedOption: the wrapper uses an option xtx cannot convert.
    """
    name = type(model).__name__
    if name == "AutoregressiveWrapper":
        return _autoregressive(model, convert)
    if name == "XLAutoregressiveWrapper":
        return _xl_autoregressive(model, convert)
    if name == "NonAutoregressiveWrapper":
        return _nonautoregressive(model, convert)
    if name == "ContinuousAutoregressiveWrapper":
        return _continuous_autoregressive(model, convert)
    raise _fail(f"wrapper class {name}")
