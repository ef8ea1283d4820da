"""Weights to and from the PyTorch library x-transformers (2.31).

``from_x_transformers(torch_model)`` reads a constructed x-transformers model (its
structure gives the config, its ``state_dict`` the weights) and returns the equivalent
xtx module and its variables. ``to_x_transformers(module, variables)`` goes back: a
``state_dict`` that loads with ``strict=True`` into the equivalent x-transformers model.

Both directions go through one table of (xtx path, torch key, layout) built from the
xtx config, so they cannot drift apart. A torch option that xtx does not implement (yet)
raises ``UnsupportedOption`` naming it, a torch weight that no table row consumes raises
too, and ``verify=True`` (the default) runs both models on a small input and raises if
they disagree: a conversion is never silently wrong.

Layouts: torch ``Linear.weight`` is ``[out, in]``; xtx kernels are ``[in..., out...]``
with head axes kept apart (``to_q``: ``[D, N, H]``, ``to_out``: ``[N, H, D]``), the head
index being the slow axis of torch's ``(h d)``.

This module imports torch lazily; xtx itself does not depend on it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from xtx.interop.layout import (
    UnsupportedOption,
    params_from_state_dict,
    state_dict_from_params,
    with_stack_options,
)
from xtx.interop.reading import config_from_x_transformers, module_for_config
from xtx.interop.torch_build import torch_model_from_config
from xtx.interop.verify import example_inputs, verify_against
from xtx.interop.wrappers import is_torch_wrapper, wrapper_from_x_transformers

__all__ = [
    "UnsupportedOption",
    "config_from_x_transformers",
    "example_inputs",
    "from_x_transformers",
    "module_for_config",
    "params_from_state_dict",
    "state_dict_from_params",
    "to_x_transformers",
    "torch_model_from_config",
    "verify_against",
    "with_stack_options",
]


def from_x_transformers(
    model: Any,
    *,
    verify: bool = True,
    atol: float = 1e-4,
    scan_layers: bool = False,
    remat_policy: str = "none",
) -> tuple[nn.Module, dict[str, Any]]:
    """Converts a constructed x-transformers 2.31 model into xtx.

    Args:
      model: an x-transformers ``TransformerWrapper``, ``XTransformer``,
        ``ViTransformerWrapper`` or ``ContinuousTransformerWrapper``, or one of the
        training wrappers ``AutoregressiveWrapper``, ``XLAutoregressiveWrapper``,
        ``NonAutoregressiveWrapper``, ``ContinuousAutoregressiveWrapper`` (its networks
        are converted with these options; see ``xtx.interop.wrappers``).
      verify: run both models on a small random input and raise if the outputs differ
        by more than ``atol``.
      atol: tolerance of the verification.
      scan_layers, remat_policy: how xtx runs every stack of the model (see
        ``AttentionLayersConfig``); with ``scan_layers`` the layer weights are stacked
        along a leading depth axis (``blocks/layers_{j}``).

    Returns:
      ``(module, variables)`` such that ``module.apply(variables, ...)`` equals
      ``model(...)`` (in eval mode).

    Raises:
      UnsupportedOption: the model uses an option xtx cannot convert.
    """
    if is_torch_wrapper(model):
        options = dict(verify=verify, atol=atol, scan_layers=scan_layers, remat_policy=remat_policy)
        return wrapper_from_x_transformers(model, lambda net: from_x_transformers(net, **options))
    config = config_from_x_transformers(model)
    config = with_stack_options(config, scan_layers=scan_layers, remat_policy=remat_policy)
    module = module_for_config(config)
    variables = {"params": params_from_state_dict(config, model.state_dict())}
    if verify:
        verify_against(model, module, variables, atol=atol)
    return module, variables


def to_x_transformers(module: nn.Module, variables: dict[str, Any]) -> dict[str, Any]:
    """The torch ``state_dict`` of the x-transformers model equivalent to ``module``.

    Build the torch model with ``torch_model_from_config(module.config)`` (or by hand
    with the same keywords) and ``load_state_dict(state_dict, strict=True)``.
    """
    params = variables["params"] if "params" in variables else variables
    return state_dict_from_params(module.config, params)
