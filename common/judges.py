"""RIM: a reward from an ensemble of LLM judges, called through litellm.

Judges (prompts in `common/judge_prompts.py`): accuracy, helpfulness, process, diagnostic. Each
reads a `Trajectory` (question, student answer, ground truth, student plan, teacher guidance,
student trace; every field optional) and replies with JSON
`{principles, score 0-1, rationale, uncertainty 0-1, gaming}`.

Per trajectory and active judge:
  1. the small model is sampled once at each of `temperatures`;
  2. escalate to the large model (which sees the samples and gives the final verdict) when no
     sample is valid, when the spread (max - min) of sample scores exceeds `variance_threshold`,
     or when any sample's uncertainty exceeds `uncertainty_threshold`; the large model runs at
     the lowest of `temperatures`; if it fails too, the valid samples (if any) are aggregated;
  3. otherwise aggregate: `lowest_uncertainty` (the most certain sample) or `mean`.
The reward is the mean of the judges that produced a score (weighted by `judge_weights`), capped
at `anti_gaming.cap_score` when the teacher guidance states the ground-truth answer
(`common.rewards.answer_leaked`) or the verdict of a judge flags gaming. A trajectory that no
judge could score gets None (not 0). A judge whose inputs are absent is skipped, not failed:
accuracy needs a student answer, helpfulness and diagnostic need teacher guidance (diagnostic
also a student plan), process needs a trace, guidance or answer.

All calls of a batch run concurrently on one event loop (its own thread), at most
`parallel_execution.max_workers` in flight; with `client_processes` > 1 the litellm calls
themselves run in that many child processes (common/judge_client.py). Each call has a `timeout` and `max_retries` retries
with exponential backoff; a call that fails after the last retry leaves its sample missing.
Successful replies are cached in SQLite keyed by model, temperature and the full prompt; a step's
new replies are written in one transaction when the step ends (later calls of the step see them).

Teacher GRPO (`RewardInput.teaching` set, common/teaching.py): question, student_plan <- the student's
diagnostic approach, teacher_guidance <- the extracted teaching, student_answer <- the student's answer
with the teaching, baseline_answer <- its answer without, ground_truth. Otherwise,
GRPO mapping (`RewardInput` -> `Trajectory`), `completion_as` = "guidance" (teacher training):
  question        <- metadata["question"], else the last user message, else the prompt text
  teacher_guidance<- completion
  student_plan    <- metadata["student_approach"]
  student_trace   <- metadata["student_trace"]
  student_answer  <- metadata["student_answer"]
  ground_truth    <- ground_truth
`completion_as` = "answer" (plain GRPO on a solver): student_answer <- completion, student_trace
<- metadata["student_trace"] or the completion, no teacher guidance.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from common.judge_client import JudgeCallError, client_pool, complete
from common.judge_prompts import ARBITER_SUFFIX, JUDGE_TEMPLATES, fence, render
from common.rewards import RewardInput

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
JUDGE_NAMES = tuple(JUDGE_TEMPLATES)
AGGREGATIONS = ("lowest_uncertainty", "mean")
COMPLETION_ROLES = ("guidance", "answer")
OPENAI_COMPATIBLE_PREFIXES = ("openai/", "hosted_vllm/")


# =============================================================================================
# Reward-system file: schema and validation
# =============================================================================================
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
    client_processes: Union[int, str] = "auto"

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
    aggregation: str = "lowest_uncertainty"
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

    @property
    def judges(self) -> list[str]:
        return [name for name, on in self.active_judges.items() if on]


def _check_type(value, tp, where: str):
    """Return `value` checked against a simple annotation (str/int/float/bool/Optional/list/dict/dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:                              # Optional[X], Union[int, str]
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:   # Optional[X]: X's own error, which names the nested key
            return _check_type(value, options[0], where)
        for option in options:
            try:
                return _check_type(value, option, where)
            except TypeError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
        raise TypeError(f"{where}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return {_check_type(k, args[0], where): _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")


def _build_dataclass(cls, data, where: str):
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise KeyError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")
    missing = [n for n, f in known.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise KeyError(f"{where}: missing required key(s) {', '.join(missing)}")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def _check_values(raw: dict, source: str) -> None:
    """Range and name checks on the raw mapping (before any dataclass exists)."""
    def fail(key, expected, value):
        raise ValueError(f"{source}: {key} must be {expected}, got {value!r}")

    judges = raw.get("active_judges") or {}
    for name in judges:
        if name not in JUDGE_NAMES:
            fail(f"active_judges.{name}", f"one of {', '.join(JUDGE_NAMES)}", name)
    if not any(judges.values()):
        fail("active_judges", "a mapping with at least one judge set to true", judges)
    for name in raw.get("judge_weights") or {}:
        if not judges.get(name):
            fail(f"judge_weights.{name}", "the name of an active judge", name)
    if any(w < 0 for w in (raw.get("judge_weights") or {}).values()):
        fail("judge_weights", "non-negative", raw["judge_weights"])
    temps = raw.get("temperatures", [0.2])
    if not temps or any(t < 0 for t in temps):
        fail("temperatures", "a non-empty list of temperatures >= 0", temps)
    if raw.get("aggregation", AGGREGATIONS[0]) not in AGGREGATIONS:
        fail("aggregation", " or ".join(AGGREGATIONS), raw["aggregation"])
    for key in ("variance_threshold", "uncertainty_threshold"):
        if not 0 <= raw.get(key, 0) <= 1:
            fail(key, "in [0, 1]", raw[key])
    cap = (raw.get("anti_gaming") or {}).get("cap_score", 0.0)
    if not 0 <= cap <= 1:
        fail("anti_gaming.cap_score", "in [0, 1]", cap)
    parallel = raw.get("parallel_execution") or {}
    if parallel.get("max_workers", 1) < 1:
        fail("parallel_execution.max_workers", ">= 1", parallel["max_workers"])
    processes = parallel.get("client_processes", "auto")
    if processes != "auto" and not (isinstance(processes, int) and not isinstance(processes, bool) and processes >= 1):
        fail("parallel_execution.client_processes", '"auto" or an integer >= 1', processes)
    for key in ("timeout", "max_tokens"):
        if raw.get(key, 1) <= 0:
            fail(key, "> 0", raw[key])
    for key in ("max_retries", "retry_backoff"):
        if raw.get(key, 0) < 0:
            fail(key, ">= 0", raw[key])
    stop = raw.get("failure_stop") or {}
    if not 0 <= stop.get("max_failure_rate", 0) <= 1:
        fail("failure_stop.max_failure_rate", "in [0, 1]", stop["max_failure_rate"])
    if stop.get("consecutive_steps", 1) < 1:
        fail("failure_stop.consecutive_steps", ">= 1", stop["consecutive_steps"])
    key_env = (raw.get("models") or {}).get("api_key_env")
    if key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key_env)):
        fail("models.api_key_env", "the NAME of an environment variable (never the key itself)", "<hidden>")


def resolve_reward_system_path(path: str | os.PathLike) -> Path:
    """Relative paths resolve against the repo root (the parent of `common/`)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=value` overrides (value parsed as YAML) applied to a raw reward-system mapping."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return raw


def load_reward_system(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> RewardSystemConfig:
    """Read, check and build a reward-system file. Unknown keys and bad values name the file and key."""
    import yaml

    path = resolve_reward_system_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward system file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise TypeError(f"{path}: expected a mapping at the top level")
    apply_overrides(raw, overrides or [])
    try:
        config = _build_dataclass(RewardSystemConfig, raw, str(path))
    except (KeyError, TypeError) as err:
        raise ValueError(str(err).strip("'\"")) from None
    _check_values(raw, str(path))
    return config


def reward_system_dict(config: RewardSystemConfig) -> dict:
    """The config as plain data (safe to save: it holds env-var names, never key values)."""
    return dataclasses.asdict(config)


# =============================================================================================
# Trajectories, verdicts, results
# =============================================================================================
@dataclass
class Trajectory:
    question: Optional[str] = None
    student_answer: Optional[str] = None
    ground_truth: Optional[str] = None
    student_plan: Optional[str] = None
    teacher_guidance: Optional[str] = None
    student_trace: Optional[str] = None
    baseline_answer: Optional[str] = None    # teacher GRPO: the student's answer without the guidance


TRAJECTORY_FIELDS = tuple(f.name for f in dataclasses.fields(Trajectory))


def trajectory_from_reward_input(item: RewardInput, completion_as: str = "guidance") -> Trajectory:
    if item.teaching is not None:   # a teacher-GRPO episode: every field from the trajectory itself
        episode = item.teaching
        return Trajectory(question=episode.question, student_plan=episode.approach,
                          teacher_guidance=episode.teaching, student_answer=episode.answer,
                          baseline_answer=episode.baseline_answer, ground_truth=item.ground_truth)
    meta = item.metadata or {}
    question = meta.get("question")
    if question is None:
        user_turns = [m.get("content") for m in item.messages or [] if m.get("role") == "user"]
        question = user_turns[-1] if user_turns else item.prompt
    if completion_as == "guidance":
        return Trajectory(question=question, teacher_guidance=item.completion,
                          student_plan=meta.get("student_approach"), student_trace=meta.get("student_trace"),
                          student_answer=meta.get("student_answer"), ground_truth=item.ground_truth)
    if completion_as == "answer":
        return Trajectory(question=question, student_answer=item.completion,
                          student_trace=meta.get("student_trace") or item.completion,
                          student_plan=meta.get("student_approach"), ground_truth=item.ground_truth)
    raise ValueError(f"completion_as must be one of {COMPLETION_ROLES}, got {completion_as!r}")


def judge_applies(judge: str, traj: Trajectory) -> bool:
    """Whether the trajectory has what this judge evaluates."""
    if judge == "accuracy":
        return bool(traj.student_answer)
    if judge == "helpfulness":
        return bool(traj.teacher_guidance)
    if judge == "process":
        return bool(traj.student_trace or traj.teacher_guidance or traj.student_answer)
    if judge == "diagnostic":
        return bool(traj.teacher_guidance and traj.student_plan)
    raise ValueError(f"unknown judge {judge!r}")


def judge_messages(judge: str, traj: Trajectory) -> list[dict]:
    values = {name: fence(name, getattr(traj, name)) for name in TRAJECTORY_FIELDS}
    return [{"role": "user", "content": render(JUDGE_TEMPLATES[judge], values)}]


def arbiter_messages(judge: str, traj: Trajectory, samples: list["Verdict"]) -> list[dict]:
    values = {name: fence(name, getattr(traj, name)) for name in TRAJECTORY_FIELDS}
    listed = json.dumps([{"score": s.score, "uncertainty": s.uncertainty, "rationale": s.rationale,
                          "gaming": s.gaming, "temperature": s.temperature} for s in samples], indent=1)
    values["samples"] = fence("grader assessments", listed if samples else "[] (every grader call failed)")
    return [{"role": "user", "content": render(JUDGE_TEMPLATES[judge] + ARBITER_SUFFIX, values)}]


@dataclass
class Verdict:
    score: float
    uncertainty: float
    rationale: str = ""
    principles: list = field(default_factory=list)
    gaming: bool = False
    model: str = ""
    temperature: float = 0.0


class InvalidReply(ValueError):
    pass


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def _unit_number(obj: dict, key: str) -> float:
    value = obj.get(key)
    if isinstance(value, str):
        value = float(value) if re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1 or math.isnan(value):
        raise InvalidReply(f"judge reply: {key!r} must be a number in [0, 1], got {obj.get(key)!r}")
    return float(value)


def parse_verdict(reply: str) -> Verdict:
    """The last JSON object with a "score" in the judge's own reply (never the prompt)."""
    candidates = [obj for obj in _json_objects(reply or "") if "score" in obj]
    if not candidates:
        raise InvalidReply(f"judge reply has no JSON object with a score: {(reply or '')[:120]!r}")
    obj = candidates[-1]
    principles = obj.get("principles", [])
    return Verdict(score=_unit_number(obj, "score"), uncertainty=_unit_number(obj, "uncertainty"),
                   rationale=str(obj.get("rationale", "")),
                   principles=principles if isinstance(principles, list) else [principles],
                   gaming=obj.get("gaming") is True)


@dataclass
class JudgeResult:
    judge: str
    score: Optional[float]                     # None: no valid verdict
    samples: list[Verdict] = field(default_factory=list)
    final: Optional[Verdict] = None            # the large model's verdict when escalated
    escalated: bool = False
    escalation_reason: str = ""
    gaming: bool = False


@dataclass
class TrajectoryScore:
    reward: Optional[float]                    # None: no judge could score it
    judges: dict[str, JudgeResult] = field(default_factory=dict)
    answer_leaked: bool = False
    capped: bool = False


class JudgeFailureError(RuntimeError):
    """Too many judge calls failed for too many consecutive steps."""


# =============================================================================================
# Aggregation (pure)
# =============================================================================================
def escalation_reason(samples: list[Verdict], variance_threshold: float, uncertainty_threshold: float) -> str:
    if not samples:
        return "no_valid_sample"
    scores = [s.score for s in samples]
    if max(scores) - min(scores) > variance_threshold:
        return "spread"
    if any(s.uncertainty > uncertainty_threshold for s in samples):
        return "uncertainty"
    return ""


def aggregate(samples: list[Verdict], mode: str) -> tuple[float, bool]:
    """(score, gaming flag) of non-escalated samples."""
    if mode == "lowest_uncertainty":
        best = min(samples, key=lambda s: s.uncertainty)   # ties: the first (lowest temperature)
        return best.score, best.gaming
    if mode == "mean":
        return sum(s.score for s in samples) / len(samples), 2 * sum(s.gaming for s in samples) > len(samples)
    raise ValueError(f"unknown aggregation {mode!r}")


def combine_judges(scores: dict[str, Optional[float]], weights: Optional[dict[str, float]]) -> Optional[float]:
    """Weighted mean over the judges that produced a score; None when none did."""
    present = {name: s for name, s in scores.items() if s is not None}
    if not present:
        return None
    w = {name: (weights or {}).get(name, 1.0) for name in present}
    total = sum(w.values())
    if total == 0:
        return None
    return sum(w[n] * present[n] for n in present) / total


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


# =============================================================================================
# Cache
# =============================================================================================
class ReplyCache:
    """SQLite store of successful judge replies, keyed by model, temperature and full prompt."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")   # several ranks may share one file
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, "
                         "temperature REAL, reply TEXT, created REAL)")
        self._db.commit()
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, temperature: float, messages: list[dict]) -> str:
        blob = json.dumps([model, temperature, messages], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, temperature: float, reply: str) -> None:
        self.put_many([(key, model, temperature, reply)])

    def put_many(self, rows: list[tuple[str, str, float, str]]) -> None:
        """(key, model, temperature, reply) rows in one transaction: one commit (fsync) for all."""
        if not rows:
            return
        now = time.time()
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                                 [(*row, now) for row in rows])
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# =============================================================================================
# Metrics
# =============================================================================================
@dataclass
class _Window:
    calls: int = 0               # model calls sent to the provider (cache hits excluded)
    requests: int = 0            # HTTP attempts, retries included
    failures: int = 0            # calls that failed after the last retry
    cache_hits: int = 0
    evaluations: int = 0         # (trajectory, judge) pairs judged
    escalations: int = 0
    missing: int = 0             # evaluations without a score
    trajectories: int = 0
    unscored: int = 0            # trajectories whose reward is None
    capped: int = 0
    unpriced: int = 0            # replies litellm has no price for
    cost_usd: float = 0.0
    latencies: list = field(default_factory=list)
    judge_scores: dict = field(default_factory=dict)
    last_error: str = ""
    # key -> (key, model, temperature, reply) replies of this step not yet written to the cache
    new_replies: dict = field(default_factory=dict)

    def as_metrics(self, prefix: str = "judge/") -> dict[str, float]:
        out = {
            "calls": self.calls, "requests": self.requests, "retries": self.requests - self.calls,
            "failures": self.failures, "failure_rate": self.failures / self.calls if self.calls else 0.0,
            "cache_hits": self.cache_hits, "escalations": self.escalations,
            "escalation_rate": self.escalations / self.evaluations if self.evaluations else 0.0,
            "missing": self.missing, "unscored": self.unscored, "capped": self.capped,
            "unpriced_calls": self.unpriced, "cost_usd": self.cost_usd,
        }
        if self.latencies:
            out["latency_p50"] = _percentile(self.latencies, 0.50)
            out["latency_p95"] = _percentile(self.latencies, 0.95)
        for judge, scores in self.judge_scores.items():
            out[f"score/{judge}"] = sum(scores) / len(scores)
        return {prefix + k: float(v) for k, v in out.items()}


# =============================================================================================
# The reward
# =============================================================================================
class _LoopThread:
    """One event loop on a daemon thread: callable from sync code, and from code already inside a loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rim-judges", daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


_LOOP: Optional[_LoopThread] = None
_LOOP_LOCK = threading.Lock()


def _judge_loop() -> _LoopThread:
    """The process's judge event loop, shared by every RIMReward: litellm binds its clients and
    logging worker to one loop, so a loop per instance would strand them."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _LoopThread()
        return _LOOP


class RIMReward:
    """Batch reward from the judge ensemble: `reward(batch: list[RewardInput]) -> list[float | None]`."""

    def __init__(self, reward_system: str | os.PathLike | RewardSystemConfig, cache_path: Optional[str] = None,
                 completion_as: str = "guidance", output_dir: Optional[str] = None,
                 overrides: Optional[list[str]] = None, student_model: Optional[str] = None,
                 teacher_model: Optional[str] = None, tokenizer: Optional[str] = None):
        if isinstance(reward_system, RewardSystemConfig):
            self.config, self.source = reward_system, "<RewardSystemConfig>"
        else:
            self.config = load_reward_system(reward_system, overrides)
            self.source = str(resolve_reward_system_path(reward_system))
        if completion_as not in COMPLETION_ROLES:
            raise ValueError(f"teacher_reward.completion_as must be one of {COMPLETION_ROLES}, got {completion_as!r}")
        self.completion_as = completion_as
        # the models of the run whose samples are judged (make_rim_reward fills them in); kept with the saved config
        self.run_models = {"student_model": student_model, "teacher_model": teacher_model, "tokenizer": tokenizer}
        key_env = self.config.models.api_key_env
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"{self.source}: models.api_key_env names {key_env!r}, which is not set in the environment")
        self.cache = None
        self._cache_path = None
        if self.config.cache:
            if cache_path is None and output_dir is None:
                raise ValueError(f"{self.source}: cache is on but there is no cache path: "
                                 "give cache_path (teacher_reward.cache_path) or output_dir, or set cache: false")
            self._cache_path = cache_path or Path(output_dir) / "judge_cache.sqlite"
        # the cache and reward_system.yaml are written at the first score(): a run whose later start-up checks
        # fail leaves nothing in output_dir
        self._unsaved_output_dir = Path(output_dir) if output_dir is not None else None
        self._window = _Window()
        self._bad_steps = 0
        self._semaphore: Optional[asyncio.Semaphore] = None
        processes = self.config.parallel_execution.resolved_client_processes()
        self._pool = client_pool(processes) if processes > 1 else None   # children import litellm meanwhile

    # -- public API ------------------------------------------------------------------------------
    def __call__(self, batch: list[RewardInput]) -> list[Optional[float]]:
        trajectories = [trajectory_from_reward_input(item, self.completion_as) for item in batch]
        return [result.reward for result in self.score(trajectories)]

    def score(self, trajectories: list[Trajectory]) -> list[TrajectoryScore]:
        """Score one batch (one training step); raises JudgeFailureError per `failure_stop`."""
        # math-verify's timeout needs the main thread: check leaks here, before the event loop.
        leaks = [self._answer_leaked(t) for t in trajectories]
        if self._cache_path is not None and self.cache is None:
            self.cache = ReplyCache(self._cache_path)
        if self._unsaved_output_dir is not None:
            self._save_config(self._unsaved_output_dir)
            self._unsaved_output_dir = None
        step = _Window()
        try:
            results = _judge_loop().run(self._score_batch(trajectories, leaks, step))
        finally:
            # One commit per step, from this thread: a commit per reply (an fsync each) on the
            # event loop stalled every call in flight behind it.
            if self.cache is not None:
                self.cache.put_many(list(step.new_replies.values()))
        self._merge(step)
        self._check_failures(step)
        return results

    def pop_metrics(self) -> dict[str, float]:
        """Metrics since the last pop, keys prefixed `judge/`."""
        window, self._window = self._window, _Window()
        return window.as_metrics()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    # -- one batch --------------------------------------------------------------------------------
    async def _score_batch(self, trajectories, leaks, step: _Window) -> list[TrajectoryScore]:
        if self._semaphore is None:   # created on the loop that uses it
            self._semaphore = asyncio.Semaphore(self.config.parallel_execution.max_workers)
        tasks = [self._score_one(t, leaked, step) for t, leaked in zip(trajectories, leaks)]
        return list(await asyncio.gather(*tasks))

    async def _score_one(self, traj: Trajectory, leaked: bool, step: _Window) -> TrajectoryScore:
        judges = [j for j in self.config.judges if judge_applies(j, traj)]
        results = await asyncio.gather(*[self._judge(j, traj, step) for j in judges])
        by_name = {r.judge: r for r in results}
        reward = combine_judges({n: r.score for n, r in by_name.items()}, self.config.judge_weights)
        anti = self.config.anti_gaming
        gamed = leaked or (anti.use_judge_flag and any(r.gaming for r in results if r.score is not None))
        capped = reward is not None and gamed and reward > anti.cap_score
        if capped:
            reward = anti.cap_score
        step.trajectories += 1
        step.unscored += reward is None
        step.capped += capped
        return TrajectoryScore(reward=reward, judges=by_name, answer_leaked=leaked, capped=capped)

    async def _judge(self, judge: str, traj: Trajectory, step: _Window) -> JudgeResult:
        cfg, models = self.config, self.config.models
        messages = judge_messages(judge, traj)
        replies = await asyncio.gather(*[self._call(models.small_model, t, messages, step) for t in cfg.temperatures])
        samples = [v for v in replies if v is not None]
        result = JudgeResult(judge=judge, score=None, samples=samples)
        result.escalation_reason = escalation_reason(samples, cfg.variance_threshold, cfg.uncertainty_threshold)
        if result.escalation_reason:
            result.escalated = True
            step.escalations += 1
            result.final = await self._call(models.large_model, min(cfg.temperatures),
                                            arbiter_messages(judge, traj, samples), step)
        if result.final is not None:
            result.score, result.gaming = result.final.score, result.final.gaming
        elif samples:
            result.score, result.gaming = aggregate(samples, cfg.aggregation)
        step.evaluations += 1
        if result.score is None:
            step.missing += 1
        else:
            step.judge_scores.setdefault(judge, []).append(result.score)
        return result

    async def _call(self, model: str, temperature: float, messages: list[dict], step: _Window) -> Optional[Verdict]:
        """One judge sample: cache, then the provider with retries. None when every attempt failed."""
        key = ReplyCache.key(model, temperature, messages) if self.cache else None
        cached = None
        if self.cache:
            pending = step.new_replies.get(key)   # answered earlier in this step, not yet written
            cached = pending[3] if pending else self.cache.get(key)
        if cached is not None:
            try:
                verdict = parse_verdict(cached)
            except InvalidReply:   # stored under older parsing rules: ask again
                verdict = None
            if verdict is not None:
                step.cache_hits += 1
                return dataclasses.replace(verdict, model=model, temperature=temperature)
        import openai

        cfg = self.config
        step.calls += 1
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(cfg.retry_backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            async with self._semaphore:
                step.requests += 1
                start = time.perf_counter()
                request = dict(model=model, messages=messages, temperature=temperature, max_tokens=cfg.max_tokens,
                               **self._credentials(model))
                try:
                    reply, cost = await (self._pool.complete if self._pool else complete)(request, cfg.timeout)
                    verdict = parse_verdict(reply)
                except (InvalidReply, JudgeCallError, asyncio.TimeoutError, openai.OpenAIError) as err:
                    detail = str(err) if isinstance(err, JudgeCallError) else f"{type(err).__name__}: {err}"
                    step.last_error = self._redact(f"{model}: {detail}")
                    logger.debug("judge call failed (attempt %d/%d): %s", attempt + 1, cfg.max_retries + 1,
                                 step.last_error)
                    continue
            step.latencies.append(time.perf_counter() - start)
            if cost is None:
                step.unpriced += 1
            else:
                step.cost_usd += cost
            if self.cache:
                step.new_replies[key] = (key, model, temperature, reply)
            return dataclasses.replace(verdict, model=model, temperature=temperature)
        step.failures += 1
        return None

    # -- helpers ----------------------------------------------------------------------------------
    def _credentials(self, model: str) -> dict:
        models = self.config.models
        out = {}
        if models.api_base:
            out["api_base"] = models.api_base
            if model.startswith(OPENAI_COMPATIBLE_PREFIXES):
                out["api_key"] = "EMPTY"   # local servers want some key; never send OPENAI_API_KEY there
        if models.api_key_env:
            out["api_key"] = os.environ[models.api_key_env]
        return out

    def _redact(self, text: str) -> str:
        secrets = [v for k, v in os.environ.items()
                   if len(v) >= 8 and re.search(r"API_KEY|TOKEN|SECRET", k, re.IGNORECASE)]
        if self.config.models.api_key_env:
            secrets.append(os.environ.get(self.config.models.api_key_env, ""))
        for secret in sorted(filter(None, set(secrets)), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def _answer_leaked(self, traj: Trajectory) -> bool:
        if not (self.config.anti_gaming.check_answer_leak and traj.teacher_guidance and traj.ground_truth):
            return False
        from common.rewards import answer_leaked

        return answer_leaked(traj.teacher_guidance, traj.ground_truth)

    def _merge(self, step: _Window) -> None:
        w = self._window
        for f in dataclasses.fields(_Window):
            name = f.name
            if name == "latencies":
                w.latencies.extend(step.latencies)
            elif name == "judge_scores":
                for judge, scores in step.judge_scores.items():
                    w.judge_scores.setdefault(judge, []).extend(scores)
            elif name == "last_error":
                w.last_error = step.last_error or w.last_error
            elif name == "new_replies":
                continue   # written to the cache by score(); not a metric
            else:
                setattr(w, name, getattr(w, name) + getattr(step, name))

    def _check_failures(self, step: _Window) -> None:
        stop = self.config.failure_stop
        bad = step.calls > 0 and step.failures / step.calls > stop.max_failure_rate
        self._bad_steps = self._bad_steps + 1 if bad else 0
        if bad:
            logger.warning("judge: %d/%d calls failed this step; last error: %s",
                           step.failures, step.calls, step.last_error)
        if self._bad_steps >= stop.consecutive_steps:
            raise JudgeFailureError(
                f"judge calls failed in {self._bad_steps} consecutive steps (over "
                f"{stop.max_failure_rate:.0%} of calls each; last step {step.failures}/{step.calls}); "
                f"last provider error: {step.last_error} [reward system: {self.source}]")

    def _save_config(self, output_dir: Path) -> None:
        import yaml

        from common.config import redact
        output_dir.mkdir(parents=True, exist_ok=True)
        target = output_dir / "reward_system.yaml"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        run = ", ".join(f"{k}: {v}" for k, v in self.run_models.items() if v is not None)
        header = f"# resolved from {self.source}\n" + (f"# judging a run with {run}\n" if run else "")
        tmp.write_text(header + yaml.safe_dump(redact(reward_system_dict(self.config)), sort_keys=False))
        tmp.replace(target)


def make_rim_reward(cfg) -> RIMReward:
    """Registry factory ("rim"): reads `cfg.teacher_reward` ({_target_, reward_system, ...}) and `cfg.output_dir`."""
    from common.config import instantiate

    spec = getattr(cfg, "teacher_reward", None)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError("reward 'rim' needs `teacher_reward: {_target_: common.judges.RIMReward, reward_system: "
                         "<file>}` in the config (e.g. `defaults: [- reward: interpretation_teaching]`); "
                         f"got teacher_reward={spec!r}")
    extra = {} if "output_dir" in spec else {"output_dir": getattr(cfg, "output_dir", None)}
    spec = dict(spec)
    # student_model / teacher_model / tokenizer: null -> the run's own (teacher_model: the policy; student_model:
    # the run's student_model, null meaning the reference = the initial policy weights; tokenizer: the policy's)
    teacher = getattr(cfg, "model_name_or_path", None)
    student = getattr(cfg, "student_model", None) or getattr(cfg, "ref_model_name_or_path", None) or teacher
    run = {"teacher_model": teacher, "student_model": student,
           "tokenizer": getattr(cfg, "tokenizer_name_or_path", None) or teacher}
    for key, value in run.items():
        given = spec.get(key)
        if given is not None and value is not None and given != value:
            raise ValueError(f"key 'teacher_reward.{key}' = {given!r}, but the run's {key} is {value!r}: leave it "
                             f"null (filled in from the run) or set the run's own key")
        spec[key] = given if given is not None else value
    return instantiate(spec, key="teacher_reward", **extra)
