"""Typed configuration: YAML files and ``a.b=value`` overrides into frozen dataclasses.

Every job has one top-level frozen dataclass built from the shared groups below. A job is launched as
``python -m jobs.<stage> --config FILE key.sub=value ...``; ``load_config`` parses that command line,
and a user mistake (unknown key, wrong type, missing key) ends the process with a one-line message and
exit code 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

REDACTED = "***"
_SECRET_SUFFIXES = ("api_key", "token", "password", "secret")


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message names the key and the fix."""


# ----------------------------------------------------------------------------- shared groups


@dataclass(frozen=True)
class ModelConfig:
    """Which vision-language model to build or load."""

    preset: Literal["tiny", "tiny-qwen2.5-vl", "tiny-gemma3", "tiny-qwen3-vl"] | None = None
    """Build a model locally from a preset (no download): ``tiny`` is LLaVA-1.5, ``tiny-qwen2.5-vl``
    Qwen2.5-VL, ``tiny-gemma3`` Gemma 3 (MedGemma), ``tiny-qwen3-vl`` Qwen3-VL. Exactly one of preset /
    name_or_path."""
    name_or_path: str | None = None
    """A Hugging Face checkpoint of a supported family (LLaVA-1.5 in the llava-hf layout, Qwen2.5-VL;
    hub id or local directory), loaded via the Auto classes."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype; bfloat16 on GPU."""
    seed: int = 0
    """Seed for the random weights of a preset model."""
    min_pixels: int | None = None
    """Families that resize each image within pixel bounds (Qwen2.5-VL): the fewest pixels an image is
    resized to; None keeps the processor's. LLaVA crops every image to one size and refuses both."""
    max_pixels: int | None = None
    """The most pixels an image is resized to (Qwen2.5-VL: max_pixels / 28**2 image tokens at most)."""

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.name_or_path is None):
            raise ConfigError("model: set exactly one of model.preset (e.g. 'tiny') or model.name_or_path")
        for key in ("min_pixels", "max_pixels"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be a positive pixel count, got {getattr(self, key)}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"model.min_pixels ({self.min_pixels}) must not exceed model.max_pixels "
                              f"({self.max_pixels})")  # fmt: skip
        # Ray workers and submitted jobs run in another working directory: a relative path to a local
        # checkpoint is made absolute here, where it was written; a hub id is left as it is.
        if self.name_or_path and not os.path.isabs(self.name_or_path) and os.path.exists(self.name_or_path):
            object.__setattr__(self, "name_or_path", os.path.abspath(self.name_or_path))


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the language model and on the vision tower (METHOD §2); the projector trains fully."""

    llm_r: int = 128
    llm_alpha: int = 256
    llm_dropout: float = 0.05
    llm_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers of the language model that get an adapter."""
    vit_r: int = 32
    vit_alpha: int = 64
    vit_dropout: float = 0.2
    vit_targets: list[str] | None = None
    """Linear layers of the vision tower that get an adapter; None: the model family's own (CLIP:
    q_proj,k_proj,v_proj,out_proj,fc1,fc2; Qwen2.5-VL: qkv,proj,gate_proj,up_proj,down_proj)."""
    train_vit: bool = True
    """Attach and train the ViT LoRA at all."""
    train_embeddings: bool = False
    """Also train the LLM's input embeddings and output head in full (PEFT ``modules_to_save``, in the
    LLM learning-rate group). For a randomly initialised model such as the ``tiny`` preset, whose random
    token vectors a LoRA cannot move; a pretrained model keeps them frozen (the paper)."""

    def __post_init__(self) -> None:
        for name in ("llm_r", "vit_r", "llm_alpha", "vit_alpha"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"lora.{name} must be > 0, got {getattr(self, name)}")
        for name in ("llm_dropout", "vit_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"lora.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide a job runs."""

    address: str | None = None
    """An existing cluster ('auto', 'ray://…'); None starts a local Ray on 127.0.0.1."""
    num_workers: int = 2
    """Ray Train workers (training jobs) or engine actors (inference jobs)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    num_cpus: int | None = None
    """CPUs given to a locally started Ray (None: all of this machine's)."""
    max_failures: int = 1
    """Worker failures a training run survives by restarting from its last checkpoint."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"ray.num_workers must be >= 1, got {self.num_workers}")


# ----------------------------------------------------------------------------- building


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn ``value`` (from YAML or an override) into type ``tp``, or raise naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '2e-4' as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected float, got {value!r}")
        # .inf and .nan parse as floats, and pass every range check: an lr of inf trains to NaN.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise ConfigError(f"unknown key '{prefix}{name}'{_closest(name, list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not str(err).startswith(prefix.split(".")[0]):
            raise ConfigError(f"{prefix}{err}") from None
        raise


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a group")
        node = child
    node[parts[-1]] = value


MAX_VALUE_UNITS = 1_000_000
"""The most one config value may hold once YAML aliases are expanded, counted as one per scalar, list or
mapping plus one per character of text: far above any real config, far below a few aliases that expand
into gigabytes (an 800-byte "billion laughs")."""


def _expanded_units(node: Any, memo: dict[int, float], active: set[int]) -> float:
    """``node``'s size with every alias written out (each shared list counted each time it is used),
    computed once per distinct object; a structure that contains itself is infinite."""
    if isinstance(node, str):
        return 1 + len(node)
    if not isinstance(node, (dict, list)):
        return 1
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        return math.inf
    active.add(key)
    children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
    total = 1.0
    for child in children:
        total += _expanded_units(child, memo, active)
        if total > MAX_VALUE_UNITS:
            break  # big enough to refuse; no need to count the rest
    active.discard(key)
    memo[key] = total
    return total


def check_expanded_size(value: Any, key: str) -> None:
    """Refuse a value (a config file's mapping, an override's value) that aliases blow up, naming the
    innermost key whose value is too large."""
    memo: dict[int, float] = {}
    if _expanded_units(value, memo, set()) <= MAX_VALUE_UNITS:
        return
    node, path = value, key
    while isinstance(node, dict):
        big = [(k, v) for k, v in node.items() if _expanded_units(v, memo, set()) > MAX_VALUE_UNITS]
        if not big:
            break
        name, node = big[0]
        path = f"{path}.{name}" if path else str(name)
    size = _expanded_units(node, memo, set())
    what = ("refers to itself" if math.isinf(size)
            else f"expands to over {MAX_VALUE_UNITS:,} items and characters")
    raise ConfigError(f"{path or 'the config'}: the value {what} (YAML anchors and aliases?); write the "
                      "value out in full, or shorter")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=x"]`` → ``[("a.b", 1), ("c", "x")]``; values are read as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has no key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        check_expanded_size(value, key.strip())
        parsed.append((key.strip(), value))
    return parsed


def build_config(cls: type[T], data: dict[str, Any] | None = None, overrides: list[str] = ()) -> T:
    """Build ``cls`` from a mapping plus dotted overrides; raises ``ConfigError`` on any mistake."""
    merged = dict(data or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(merged, key, value)
    return _build(cls, merged)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (a binary file?); pass a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests too deeply to read; a config is a few levels "
                          "deep") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        check_expanded_size(data, "")
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    return data


def load_config(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse ``--config FILE key=value ...`` into ``cls``; a user mistake exits with code 2."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        data = read_yaml(args.config) if args.config else {}
        return build_config(cls, data, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- writing


def _is_secret(name: str) -> bool:
    return name.lower().endswith(_SECRET_SUFFIXES)


def config_to_dict(cfg: Any, redact: bool = True) -> Any:
    """A plain, YAML-ready view of ``cfg``; secret-looking fields become ``***`` when set."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if redact and (_is_secret(f.name) or f.metadata.get("secret")) and value:
                out[f.name] = REDACTED
            else:
                out[f.name] = config_to_dict(value, redact)
        return out
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v, redact) for v in cfg]
    if isinstance(cfg, dict):
        return {k: REDACTED if redact and _is_secret(str(k)) and v else config_to_dict(v, redact)
                for k, v in cfg.items()}
    return cfg


def write_config(cfg: Any, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config (secrets redacted) to ``output_dir/config.yaml``."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
