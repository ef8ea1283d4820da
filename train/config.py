"""The training program's configuration: nested frozen dataclasses, presets, overrides.

A run is described by one ``RunConfig`` (model, data, optimiser, mesh, loop settings).
It is saved as ``config.json`` in the run directory and rebuilt from it on ``--resume``.
Presets are named ``RunConfig`` values (``PRESETS``); any field can be overridden from
the command line with a dotted path, ``--model.depth=12 --optim.lr=3e-4 --steps=2000``.

``ModelConfig`` names the model family and the four sizes every family has (width,
depth, heads, segment length). Any other constructor keyword of the family goes in
``model.options`` and can be set directly: ``--model.rotary_pos_emb=true`` is routed
to ``options`` when it is a keyword the family accepts. Unknown names raise an error
that suggests the nearest valid one, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from train.data import DataConfig

FAMILIES = (
    "decoder",
    "encoder_decoder",
    "nonautoregressive",
    "continuous",
    "vit",
    "transformer_xl",
    "memorizing",
    "block_recurrent",
    "longformer",
    "rmt",
)
RULE_SETS = ("auto", "data", "fsdp", "tensor", "fsdp_tensor", "sequence")


class ConfigError(ValueError):
    """A configuration or command-line problem, reported before any compilation."""


def suggest(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to train and its sizes.

    Attributes:
      family: one of ``FAMILIES``: ``decoder`` (TransformerWrapper + Decoder; with
        ``max_mem_len > 0`` it trains as Transformer-XL over streamed segments),
        ``encoder_decoder`` (XTransformer), ``nonautoregressive`` (MaskGIT-style
        NonAutoregressiveWrapper), ``continuous`` (ContinuousAutoregressiveWrapper on
        vectors standing for the tokens), ``vit`` (a ViT classifying the next token from the
        window drawn as an image), or a gallery model.
      dim, depth, heads: width, layers, attention heads.
      seq_len: tokens per training segment (``max_seq_len`` / ``segment_len``).
      options: any other keyword of the family's constructor (x-transformers style
        flat keywords for ``decoder``, e.g. ``rotary_pos_emb``, ``attn_flash``,
        ``ff_glu``, ``max_mem_len``, ``scan_layers``, ``remat_policy``, ``dtype``).
    """

    family: str = "decoder"
    dim: int = 256
    depth: int = 4
    heads: int = 4
    seq_len: int = 256
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, clipping and accumulation.

    Attributes:
      lr: peak learning rate, reached after ``warmup_steps``.
      min_lr_ratio: the cosine ends at ``lr * min_lr_ratio`` at the last step.
      weight_decay: decoupled decay, applied to weight matrices only (not to norms,
        biases or embeddings) unless ``decay_all``.
      clip_norm: global gradient-norm clip (0 disables).
      grad_accum: micro-batches per update (each step of the loop is one micro-batch
        of ``batch_size`` rows; the update applies their mean gradient).
    """

    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    decay_all: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The device mesh and how parameters map onto it.

    Attributes:
      data, fsdp, tensor: mesh axis sizes; one of them may be -1 (all remaining
        devices). Their product must equal the device count.
      rules: logical-axis rule set, one of ``RULE_SETS``; ``auto`` picks from the
        axis sizes (``fsdp_tensor`` if both are > 1, else whichever is > 1, else
        ``data``).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "auto"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run needs; saved as ``config.json``.

    Attributes:
      steps: optimiser updates.
      batch_size: global rows per micro-batch (split over the ``data`` and ``fsdp``
        mesh axes and over hosts).
      log_every, eval_every, save_every: intervals in steps (0 disables eval/save
        except the final ones).
      eval_batches: validation batches per evaluation.
      samples, sample_len: generated samples printed at each evaluation.
      keep: checkpoints kept.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    steps: int = 600
    batch_size: int = 16
    seed: int = 0
    log_every: int = 25
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 3
    samples: int = 2
    sample_len: int = 120
    async_checkpoints: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return _build(cls, data, "")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config field {prefix + key!r}{suggest(key, fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = _build(tp, value, f"{prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _small(family: str, **fields: Any) -> RunConfig:
    return RunConfig(model=ModelConfig(family=family, **fields))


PRESETS: dict[str, RunConfig] = {
    # The default run: a byte-level decoder on the standard library's sources.
    "default": RunConfig(
        model=ModelConfig(dim=256, depth=4, heads=4, seq_len=256, options={"rotary_pos_emb": True}),
        eval_every=100,
    ),
    "gpt_small": RunConfig(
        model=ModelConfig(
            dim=512,
            depth=6,
            heads=8,
            seq_len=512,
            options={"rotary_pos_emb": True, "attn_flash": True, "ff_glu": True},
        ),
        optim=OptimConfig(lr=6e-4, warmup_steps=200),
        steps=5000,
        batch_size=32,
        eval_every=500,
        save_every=500,
    ),
    # x-transformers' enwik8 example: 6 x 512, 1024 tokens, the 90M/5M/5M split.
    "enwik8_base": RunConfig(
        model=ModelConfig(
            dim=512, depth=6, heads=8, seq_len=1024, options={"rotary_pos_emb": True}
        ),
        data=DataConfig(source="data/enwik8", format="bytes", split="enwik8"),
        optim=OptimConfig(lr=1e-4, warmup_steps=500, weight_decay=0.0),
        steps=100_000,
        batch_size=4,
        eval_every=500,
        save_every=1000,
    ),
    # Transformer-XL as a TransformerWrapper with memories, over streamed segments.
    "xl_decoder": _small("decoder", seq_len=128, options={"max_mem_len": 128}),
    "transformer_xl": _small("transformer_xl", seq_len=128, options={"mem_len": 128}),
    "memorizing": _small(
        "memorizing", seq_len=128, options={"mem_len": 128, "knn_memory_size": 2048}
    ),
    "block_recurrent": _small("block_recurrent", seq_len=128, options={"block_len": 64}),
    "longformer": _small("longformer", seq_len=512, options={"window": 64}),
    "rmt": _small("rmt", seq_len=128, options={"num_memory": 8}),
    "encoder_decoder": _small("encoder_decoder", seq_len=256),
    "nonautoregressive": _small("nonautoregressive", seq_len=128),
    "continuous": _small("continuous", seq_len=128),
    "vit": _small("vit", seq_len=256),
}


def parse_value(text: str) -> Any:
    """A command-line value: JSON (numbers, true/false/null, lists, objects), else the
    string itself; ``none``/``True``/``False`` are accepted too."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Checks a command-line value against the field's annotation (int, float, bool, str)."""
    origin = typing.get_origin(tp)
    allowed = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{path} cannot be None")
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is str and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{path} expects {names}, got {value!r}")


def apply_overrides(
    config: RunConfig, overrides: Mapping[str, Any], family_keywords: Iterable[str] = ()
) -> RunConfig:
    """Returns ``config`` with dotted-path overrides applied.

    Args:
      config: the base run config (a preset or a saved run).
      overrides: ``{"model.depth": 12, "optim.lr": 3e-4, "steps": 100}``. A
        ``model.<name>`` that is not a ``ModelConfig`` field but is in
        ``family_keywords`` goes to ``model.options``.
      family_keywords: the keywords the model family accepts.

    Raises:
      ConfigError: an unknown field (with the nearest valid one), or a value of the
        wrong type.
    """
    family_keywords = set(family_keywords)
    for path, value in overrides.items():
        config = _set(config, path.split("."), value, path, family_keywords)
    return config


def _set(obj: Any, parts: list[str], value: Any, path: str, family_keywords: set[str]) -> Any:
    name, rest = parts[0], parts[1:]
    if isinstance(obj, ModelConfig) and name == "options":
        if len(rest) != 1:
            raise ConfigError(f"{path}: write model.options.<keyword>=value")
        return dataclasses.replace(obj, options={**obj.options, rest[0]: value})
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        if isinstance(obj, ModelConfig) and not rest and name in family_keywords:
            return dataclasses.replace(obj, options={**obj.options, name: value})
        valid = list(fields) + (sorted(family_keywords) if isinstance(obj, ModelConfig) else [])
        raise ConfigError(f"unknown config field {path!r}{suggest(name, valid)}")
    current = getattr(obj, name)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{path}: {name!r} has no sub-fields")
        return dataclasses.replace(obj, **{name: _set(current, rest, value, path, family_keywords)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{path} is a section; set one of its fields ({path}.<field>=...)")
    if name == "options":
        if not isinstance(value, dict):
            raise ConfigError(f"{path} expects a JSON object, got {value!r}")
        return dataclasses.replace(obj, options=dict(value))
    hint = typing.get_type_hints(type(obj))[name]
    return dataclasses.replace(obj, **{name: _coerce(path, hint, value)})


def field_paths(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every ``(dotted path, value)`` of a config, for ``--help``."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(field_paths(value, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, value))
    return out


def validate(config: RunConfig) -> None:
    """Checks the values a model constructor would not (loop settings, optimiser)."""
    m, o = config.model, config.optim
    if m.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {FAMILIES}, got {m.family!r}")
    for path, value in (
        ("model.dim", m.dim),
        ("model.depth", m.depth),
        ("model.heads", m.heads),
        ("model.seq_len", m.seq_len),
        ("steps", config.steps),
        ("batch_size", config.batch_size),
        ("log_every", config.log_every),
        ("optim.grad_accum", o.grad_accum),
        ("keep", config.keep),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path} must be an int >= 1, got {value!r}")
    for path, value in (
        ("eval_every", config.eval_every),
        ("save_every", config.save_every),
        ("eval_batches", config.eval_batches),
        ("samples", config.samples),
        ("sample_len", config.sample_len),
        ("optim.warmup_steps", o.warmup_steps),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{path} must be an int >= 0, got {value!r}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr!r}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio!r}")
    if o.weight_decay < 0 or o.clip_norm < 0:
        raise ConfigError("optim.weight_decay and optim.clip_norm must be >= 0")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError(f"optim.b1/b2 must be in [0, 1), got {o.b1!r}, {o.b2!r}")
    if config.mesh.rules not in RULE_SETS:
        raise ConfigError(
            f"mesh.rules must be one of {RULE_SETS}, got {config.mesh.rules!r}"
            f"{suggest(str(config.mesh.rules), RULE_SETS)}"
        )
