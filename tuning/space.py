"""The sweep's search space, from `tune.search_space` (dotted config key -> distribution), and
the trial configs it yields. Every key and value is checked against the experiment config
before any trial starts, so a typo fails at once, naming the key."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import yaml
from ray import tune

from cafe.config import ConfigError, ExperimentConfig, config_from_dict

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Dimension:
    key: str  # dotted config key
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # grid/choice: the values; uniform/loguniform: (low, high)

    def to_tune(self):
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return (tune.uniform if self.kind == "uniform" else tune.loguniform)(*self.values)

    def samples(self) -> tuple:
        """Values that bound what a trial may get (all of them for grid and choice)."""
        return self.values


def _number(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as a string; a sweep means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_dimension(key: str, text: str) -> Dimension:
    match = _CALL.match(text)
    if not match or match.group(1) not in DISTRIBUTIONS:
        raise ConfigError(f"tune.search_space[{key!r}]: {text!r} is not one of "
                          f"{', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
    kind, args = match.group(1), match.group(2)
    try:
        values = tuple(_number(v) for v in yaml.safe_load(f"[{args}]"))
    except yaml.YAMLError as err:
        raise ConfigError(f"tune.search_space[{key!r}]: cannot read the values of {text!r}: {err}") from None
    if kind in ("grid", "choice") and not values:
        raise ConfigError(f"tune.search_space[{key!r}]: {kind}() needs at least one value")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError(f"tune.search_space[{key!r}]: {kind}(low, high) needs numbers with "
                              f"{'0 < ' if kind == 'loguniform' else ''}low < high, got {text!r}")
        values = tuple(float(v) for v in values)
    return Dimension(key, kind, values)


def trial_values(cfg: ExperimentConfig, sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's dotted config values: its arm's (if any) and the sampled ones."""
    values = dict(sampled)
    arm = values.pop(ARM, None)
    return {**{k: _number(v) for k, v in cfg.tune.arms.get(arm, {}).items()}, **values}


def with_values(base: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """`base` with each dotted key set, re-validated (unknown key or wrong type: ConfigError)."""
    raw = dataclasses.asdict(base)
    for dotted, value in values.items():
        *path, leaf = dotted.split(".")
        node = raw
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown key {dotted!r}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown key {dotted!r}; valid keys here: {sorted(node)}")
        node[leaf] = value
    return config_from_dict(raw)


ARM = "arm"  # the Tune parameter naming a trial's arm (tune.arms)


def search_space(cfg: ExperimentConfig) -> list[Dimension]:
    """The parsed dimensions, each checked by building a config with every value it may take;
    `tune.arms` become one grid dimension over the arm names, each arm checked whole."""
    if not cfg.tune.search_space and not cfg.tune.arms:
        raise ConfigError("tune.search_space and tune.arms are empty: name at least one key, "
                          "e.g. loss.con_weight: grid(0.1, 0.5)")
    dims = [parse_dimension(key, text) for key, text in cfg.tune.search_space.items()]
    for arm, values in cfg.tune.arms.items():
        clash = sorted(set(values) & set(cfg.tune.search_space))
        if clash:
            raise ConfigError(f"tune.arms[{arm!r}] sets {clash}, which tune.search_space also sweeps")
        try:
            with_values(cfg, {k: _number(v) for k, v in values.items()})
        except ConfigError as err:
            raise ConfigError(f"tune.arms[{arm!r}]: {err}") from None
    if cfg.tune.arms:
        dims.insert(0, Dimension(ARM, "grid", tuple(cfg.tune.arms)))
    for dim in dims:
        if dim.key == ARM:
            continue
        if dim.key.startswith("tune."):
            raise ConfigError(f"tune.search_space[{dim.key!r}]: the sweep's own settings cannot be swept")
        for value in dim.samples():
            try:
                with_values(cfg, {dim.key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.search_space[{dim.key!r}]: {err}") from None
    return dims
