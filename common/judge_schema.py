"""The reward-system file of the RIM judges (`configs/reward_system/*.yaml`): its keys, defaults and checks.

Read by `load_reward_system` through the same builder as the scripts' configs (common/config.py): unknown and
missing keys, types (typed mapping values included) and `RANGES` give one error naming the file and the key; the
checks that tie keys together are in `RewardSystemConfig.validate`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from common.config import ConfigError, load_config_file
from common.judge_prompts import JUDGE_TEMPLATES

REPO_ROOT = Path(__file__).resolve().parent.parent
JUDGE_NAMES = tuple(JUDGE_TEMPLATES)
Aggregation = Literal["lowest_uncertainty", "mean"]
AGGREGATIONS = typing.get_args(Aggregation)


@dataclass
class ModelsConfig:
    small_model: str                      # any litellm model string, e.g. gemini/gemini-2.5-flash
    large_model: str                      # escalation / arbiter model
    api_base: Optional[str] = None        # e.g. http://127.0.0.1:8000/v1 for an OpenAI-compatible server
    api_key_env: Optional[str] = None     # NAME of the env var holding the key; the value is never stored


@dataclass
class AntiGamingConfig:
    cap_score: float = 0.3                # reward ceiling for a gamed trajectory
    check_answer_leak: bool = True        # cap when the guidance states the ground-truth answer
    use_judge_flag: bool = True           # cap when a judge's verdict sets "gaming": true


@dataclass
class ParallelExecutionConfig:
    max_workers: int = 8                  # judge calls in flight across the whole batch
    # Processes running the litellm calls (1: this one; common/judge_client.py). "auto": one per
    # 8 calls in flight, at most 4 -- litellm's ~5 ms of CPU per call saturates one event loop
    # at a few dozen calls in flight, far below that with slow providers.
    client_processes: Union[int, Literal["auto"]] = "auto"

    def resolved_client_processes(self) -> int:
        if self.client_processes == "auto":
            return max(1, min(4, self.max_workers // 8))
        return self.client_processes


@dataclass
class FailureStopConfig:
    max_failure_rate: float = 0.5         # a step is bad when more than this fraction of calls fail
    consecutive_steps: int = 3            # this many bad steps in a row stop the run


@dataclass
class RewardSystemConfig:
    models: ModelsConfig
    active_judges: dict[str, bool]
    temperatures: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8])
    judge_weights: Optional[dict[str, float]] = None
    aggregation: Aggregation = "lowest_uncertainty"
    variance_threshold: float = 0.15
    uncertainty_threshold: float = 0.3
    max_tokens: int = 1024
    timeout: float = 60.0                 # seconds per request
    max_retries: int = 3
    retry_backoff: float = 1.0            # seconds before the first retry; doubles each retry
    cache: bool = True
    anti_gaming: AntiGamingConfig = field(default_factory=AntiGamingConfig)
    parallel_execution: ParallelExecutionConfig = field(default_factory=ParallelExecutionConfig)
    failure_stop: FailureStopConfig = field(default_factory=FailureStopConfig)

    RANGES = {
        "temperatures": "[0, inf)", "judge_weights": "[0, inf)", "variance_threshold": "[0, 1]",
        "uncertainty_threshold": "[0, 1]", "max_tokens": "[1, inf)", "timeout": "(0, inf)", "max_retries": "[0, inf)",
        "retry_backoff": "[0, inf)", "anti_gaming.cap_score": "[0, 1]", "parallel_execution.max_workers": "[1, inf)",
        "parallel_execution.client_processes": "[1, inf)", "failure_stop.max_failure_rate": "[0, 1]",
        "failure_stop.consecutive_steps": "[1, inf)",
    }

    @property
    def judges(self) -> list[str]:
        return [name for name, on in self.active_judges.items() if on]

    def validate(self) -> None:
        """What ties keys together (ranges and types are checked before this, by the builder)."""
        where = getattr(self, "_source", "<RewardSystemConfig>")
        for name in self.active_judges:
            if name not in JUDGE_NAMES:
                raise ConfigError(f"{where}: key 'active_judges.{name}': expected one of {', '.join(JUDGE_NAMES)}")
        if not self.judges:
            raise ConfigError(f"{where}: key 'active_judges' = {self.active_judges!r}: expected a mapping with at "
                              f"least one judge set to true")
        for name in self.judge_weights or {}:
            if name not in self.judges:
                raise ConfigError(f"{where}: key 'judge_weights.{name}': expected the name of an active judge "
                                  f"({', '.join(self.judges)})")
        if not self.temperatures:
            raise ConfigError(f"{where}: key 'temperatures' = []: expected a non-empty list of temperatures >= 0")
        key_env = self.models.api_key_env
        if key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            # the value is not echoed: a key pasted here instead of its variable's name is a secret
            raise ConfigError(f"{where}: key 'models.api_key_env': expected the NAME of an environment variable "
                              f"(never the key itself)")


def resolve_reward_system_path(path: str | os.PathLike) -> Path:
    """Relative paths resolve against the repo root (the parent of `common/`)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def load_reward_system(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> RewardSystemConfig:
    """Read, check and build a reward-system file; `a.b=value` overrides (values parsed as YAML) apply first."""
    path = resolve_reward_system_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward system file not found: {path}")
    return load_config_file(RewardSystemConfig, path, overrides or [])


def reward_system_dict(config: RewardSystemConfig) -> dict:
    """The config as plain data (safe to save: it holds env-var names, never key values)."""
    return dataclasses.asdict(config)
