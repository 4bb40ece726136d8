"""Typed run configuration: nested dataclasses loaded from TOML with `section.key=value`
overrides. Every key is checked here, before any process trains, so a typo or a bad value
fails fast with the key's name and what is allowed."""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from balancing.registry import INTERNAL_ARGUMENTS
from models.config import ModelConfig


class ConfigError(ValueError):
    """A configuration key is unknown or has a value outside what it allows."""


@dataclass
class DataConfig:
    path: str = "data/census"
    global_batch_size: int = 512
    eval_batch_size: int = 4096
    eval_split: Literal["valid", "test"] = "test"
    shuffle: bool = True
    prefetch: int = 2
    id_policy: Literal["hash", "error"] = "hash"
    bad_rows: Literal["error", "skip"] = "error"


@dataclass
class ShardingConfig:
    type: Literal["auto", "table_wise", "row_wise", "column_wise"] = "auto"


@dataclass
class TrainConfig:
    steps: int = 0
    epochs: float = 1.0
    seed: int = 0
    dense_lr: float = 1e-3
    # L2 weight decay of the dense Adam (torch.optim.Adam's weight_decay); PUB's paper uses 1e-6
    weight_decay: float = 0.0
    embedding_optimizer: Literal["sgd", "adagrad", "rowwise_adagrad"] = "rowwise_adagrad"
    embedding_lr: float = 0.05
    log_every: int = 50
    eval_every: int = 0
    threads_per_rank: int = 1
    # "auto": CUDA when this process sees a GPU, else the CPU; "cuda" fails before launch without one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # non-finite steps in a row after which the run saves a checkpoint and stops
    max_nonfinite_in_row: int = 20


@dataclass
class BalanceConfig:
    method: str = "equal"
    level: Literal["representation", "parameters"] = "representation"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricsConfig:
    """`[metrics]`: the Prometheus exporter (served by rank 0 only, see docs/observability.md)
    and the end-of-run Pushgateway push."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9400  # 0: pick a free port and print it
    pushgateway: str = ""  # URL; empty: no push
    job: str = "recbalance"
    run_id: str = ""  # empty: generated (the launcher's run id, else time + random suffix)


@dataclass
class CheckpointConfig:
    """`[checkpoint]`: torch.distributed.checkpoint directories under `dir` (default:
    OUTPUT_DIR/checkpoints), saved every `every` steps (0: only at the end and on SIGTERM),
    the newest `keep` kept; a run resumes from the newest complete one when `resume`."""

    dir: str = ""
    every: int = 0
    keep: int = 2
    resume: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


POSITIVE_KEYS = {
    "data.global_batch_size", "data.eval_batch_size", "data.prefetch",
    "model.cross_rank", "model.num_experts", "model.task_experts", "model.ple_layers", "train.log_every", "train.threads_per_rank",
    "checkpoint.keep", "train.max_nonfinite_in_row",
}
NON_NEGATIVE_KEYS = {"model.cross_layers", "train.steps", "train.eval_every", "train.seed", "checkpoint.every"}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    if typing.get_origin(tp) is dict:
        return "a table"
    return f"a {getattr(tp, '__name__', tp)}"


def _finite(key: str, value: Any) -> Any:
    """`value`, refused when it is (or, in a table or list, holds) a float that is not finite:
    TOML accepts inf and nan, which train nothing but NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': {value} is not allowed; expected a finite number")
    if isinstance(value, dict):
        return {k: _finite(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': {value!r} is not allowed; expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return _finite(key, dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return _finite(key, float(value))
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{(prefix + '.' if prefix else '') + unknown[0]}' in {where}; "
            f"allowed keys: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(raw[name], dict):
                raise ConfigError(f"config key '{key}' must be a table (section)")
            kwargs[name] = _build(tp, raw[name], key)
        else:
            kwargs[name] = _coerce(key, raw[name], tp)
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> None:
    for key in POSITIVE_KEYS | NON_NEGATIVE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        minimum = 1 if key in POSITIVE_KEYS else 0
        if value < minimum:
            raise ConfigError(f"config key '{key}': {value} is not allowed; expected an integer >= {minimum}")
    for key, value in {
        "train.dense_lr": cfg.train.dense_lr,
        "train.embedding_lr": cfg.train.embedding_lr,
        "train.epochs": cfg.train.epochs,
    }.items():
        if not value > 0:
            raise ConfigError(f"config key '{key}': {value} is not allowed; expected a number > 0")
    if not cfg.train.weight_decay >= 0:
        raise ConfigError(f"config key 'train.weight_decay': {cfg.train.weight_decay} is not allowed; expected a number >= 0")
    for key in ("model.dense_layers", "model.shared_layers", "model.expert_layers", "model.tower_layers"):
        section, name = key.split(".")
        layers = getattr(cfg.model, name)
        if not layers or any(width < 1 for width in layers):
            raise ConfigError(f"config key '{key}': {layers} is not allowed; expected a non-empty list of positive widths")
    _check_metrics(cfg.metrics)
    for name in INTERNAL_ARGUMENTS:
        if name in cfg.balance.options:
            raise ConfigError(
                f"config key 'balance.options.{name}' is not allowed: the trainer sets the {name} itself; "
                "balance.options holds the method's own options"
            )


def _check_metrics(metrics: MetricsConfig) -> None:
    if not 0 <= metrics.port <= 65535:
        raise ConfigError(
            f"config key 'metrics.port': {metrics.port} is not allowed; expected an integer from 0 to 65535 "
            "(0 picks a free port)"
        )
    if not metrics.host.strip():
        raise ConfigError("config key 'metrics.host': '' is not allowed; expected an address such as '127.0.0.1' or '0.0.0.0'")
    if metrics.pushgateway and not metrics.pushgateway.startswith(("http://", "https://")):
        raise ConfigError(
            f"config key 'metrics.pushgateway': {metrics.pushgateway!r} is not allowed; "
            "expected an http:// or https:// URL, or '' for no push"
        )
    if not metrics.job.strip() or "/" in metrics.job:
        raise ConfigError(f"config key 'metrics.job': {metrics.job!r} is not allowed; expected a non-empty name without '/'")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word such as `method=multibalance` is a string
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    _check_ranges(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return config_from_dict(apply_overrides(raw, overrides or []))
