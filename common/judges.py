"""RIM: a reward from an ensemble of LLM judges, called through litellm.

This module makes the calls (event loop, retries, reply cache, metrics, failure stop); the reward-system file's
keys are in common/judge_schema.py, the pure parts (trajectory mapping, prompts, verdict parsing, escalation,
aggregation) in common/judge_verdicts.py.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common.judge_client import JudgeCallError, client_pool, complete
from common.judge_schema import RewardSystemConfig, load_reward_system, resolve_reward_system_path, reward_system_dict
from common.judge_verdicts import (COMPLETION_ROLES, InvalidReply, JudgeFailureError, JudgeResult, Trajectory,
                                   TrajectoryScore, Verdict, aggregate, arbiter_messages, combine_judges,
                                   escalation_reason, judge_applies, judge_messages, parse_verdict,
                                   trajectory_from_reward_input)
from common.rewards import RewardInput

logger = logging.getLogger(__name__)

OPENAI_COMPATIBLE_PREFIXES = ("openai/", "hosted_vllm/")


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
            self.config, self.source = reward_system, getattr(reward_system, "_source", "<RewardSystemConfig>")
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
