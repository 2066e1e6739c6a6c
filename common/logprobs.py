"""Per-token logprobs of sampled completions through a whole causal LM: the forward plumbing of RL updates.

- `LogprobScorer`: one per model (policy, reference); owns its cache keyword, its lm_head path and the first-batch
  agreement check, so a training loop asks only for the logprobs of a batch.
- `RolloutBatch`, `rollout_batch`: rollouts -> [left-padded prompt | right-padded completion] tensors for one
  forward, plus what the update reads per row (advantages, old / reference / engine logprobs).
- `completion_logprobs`: logprobs of the completion tokens [B, C], logits made only where a completion token is
  predicted, log-softmax in chunks (common/ops.py). Two options, each the same numbers as the plain forward:
  - shared prompts (`cache_arg`): each distinct prompt of the batch runs once and its KV cache serves all of its
    completions (`shared_prompt_logprobs`);
  - `lm_head`: while the forward runs, the model's own lm_head returns the logprobs, computing logits a chunk at
    a time from its input hidden states (`lm_head_returns_logprobs`), so `[B, C, V]` logits never exist whole.
    `lm_head_logprobs_agree` checks a model returns its lm_head output unchanged.
- `lm_head_at`: logits only at chosen positions (GKD's completion tokens).
- KV-cache helpers shared with generation (common/rollout.py): `cache_argument`, `returned_cache`,
  `repeat_cache_rows`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from common.models import eval_mode
from common.ops import selective_log_softmax, selective_log_softmax_from_hidden

logger = logging.getLogger(__name__)


def cache_argument(model) -> Optional[str]:
    """The keyword under which `model`'s forward (and generate) takes a KV cache, or None when it takes none.

    transformers 5.2x names it `cache` (`past_key_values` is deprecated); earlier 5.x releases only know
    `past_key_values`. Read from the signature, because a forward with **kwargs would ignore a wrong name.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model   # PEFT
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def returned_cache(output):
    """The KV cache a forward with use_cache=True returned (`cache`, or `past_key_values` before 5.2x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def repeat_cache_rows(cache, index: torch.Tensor, key: str = "share_prompt_prefix"):
    """Select batch rows of a KV cache (`index` [B] of row numbers); returns the cache.

    Through the cache's own `reorder_cache` (what beam search uses), so every layer kind moves its state
    (attention keys/values, sliding windows, recurrent/conv states, indexer keys). It selects with
    index_select, so under autograd gradients from every row that reads a cached row add up.
    """
    if cache is None or not callable(getattr(cache, "reorder_cache", None)):
        raise RuntimeError(f"{key}: the model returned no reorderable KV cache ({type(cache).__name__}); "
                           f"set {key}=false")
    cache.reorder_cache(index)
    return cache


def plain_lm_head(model) -> Optional[torch.nn.Linear]:
    """The model's output projection when it is a bias-free `nn.Linear` (Llama, Qwen, Mistral...), else None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return head if type(head) is torch.nn.Linear and head.bias is None else None


@contextlib.contextmanager
def lm_head_returns_logprobs(lm_head: torch.nn.Linear, targets: torch.Tensor, temperature: float,
                             hidden_rows: Optional[torch.Tensor] = None):
    """Inside the block, `lm_head(hidden [B, K, H])` returns fp32 logprobs of `targets` [B, K] instead of the
    logits [B, K, V], which then only ever exist one chunk at a time (ops.selective_log_softmax_from_hidden).

    The model is still called as a whole (through DDP / DeepSpeed wrappers and their hooks: under ZeRO-3 the
    weight is gathered while lm_head runs). `hidden_rows` [B] first selects hidden rows (prompts shared by several
    completions). Only for models that return lm_head's output as their logits: check_lm_head_logprobs.
    """
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden_rows is not None:
            hidden = hidden[hidden_rows]
        return selective_log_softmax_from_hidden(hidden, lm_head.weight, targets, temperature=temperature)

    lm_head.forward = forward   # an instance attribute: nn.Module.__call__ and its hooks run as usual
    try:
        yield
    finally:
        del lm_head.forward


@contextlib.contextmanager
def lm_head_at(model, positions: torch.Tensor):
    """Inside the block, the model's output projection reads only the hidden states at `positions` [B, T] (bool),
    so a forward with `logits_to_keep=0` returns logits [N, V] for the N True positions, row-major; no other
    position is projected onto the vocabulary. The model is still called whole (DDP / DeepSpeed hooks run).

    Works on every transformers 5.x causal LM that applies its output embeddings to the hidden states (a [B, T]
    boolean `logits_to_keep` exists only in newer releases).
    """
    base = getattr(model, "module", model)   # DDP / DeepSpeed wrappers
    head = base.get_output_embeddings()
    original = head.forward
    head.forward = lambda hidden: original(hidden[positions])   # instance attribute: hooks still run
    try:
        yield
    finally:
        del head.forward


@dataclass
class RolloutBatch:
    """One micro-batch of rollouts as [left-padded prompt | right-padded completion] rows, and what the update
    reads per row. B rows, P + C columns (C = completion_width), U distinct prompts."""
    input_ids: torch.Tensor                          # [B, P+C]
    attention_mask: torch.Tensor                     # [B, P+C]
    position_ids: torch.Tensor                       # [B, P+C] positions ignore the left padding
    completion_mask: torch.Tensor                    # [B, C] float: tokens the loss reads
    completion_width: int
    prompt_first_row: Optional[torch.Tensor] = None  # [U] a row holding each distinct prompt (shared prompts)
    prompt_of_row: Optional[torch.Tensor] = None     # [B] which distinct prompt each row continues
    advantages: Optional[torch.Tensor] = None        # [B]
    engine_logps: Optional[torch.Tensor] = None      # [B, C] the sampling engine's logprobs (zeros past the end)
    engine_mask: Optional[torch.Tensor] = None       # [B, C]
    old_logps: Optional[torch.Tensor] = None         # [B, C] None: the rollout policy is the current one
    ref_logps: Optional[torch.Tensor] = None         # [B, C] None: no KL term

    def to(self, device) -> "RolloutBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if torch.is_tensor(getattr(self, f.name))})


def rollout_batch(rollouts: list, pad_token_id: int, mask_truncated: bool,
                  share_prompts: bool = False) -> RolloutBatch:
    """Rollouts -> [left-padded prompt | right-padded completion] tensors for one forward pass.

    With `share_prompts`, also `prompt_first_row` [U] (a row holding each distinct prompt) and `prompt_of_row`
    [B] (which of them each row continues), even when no prompt repeats, and at least 2 completion columns: every
    process then runs the same two forwards per micro-batch (ZeRO-3 and DDP pair their collectives by count).
    Without it both are None. With `rollouts[i].logprobs` on every row, also the engine's logprobs.
    """
    prompt_width = max(len(r.prompt_ids) for r in rollouts)
    completion_width = max(max(len(r.completion_ids) for r in rollouts), 2 if share_prompts else 1)
    num_rows = len(rollouts)
    input_ids = torch.full((num_rows, prompt_width + completion_width), pad_token_id, dtype=torch.long)  # [B, P+C]
    attention_mask = torch.zeros_like(input_ids)                                                         # [B, P+C]
    completion_mask = torch.zeros((num_rows, completion_width), dtype=torch.float32)                     # [B, C]
    for i, rollout in enumerate(rollouts):
        p, c = len(rollout.prompt_ids), len(rollout.completion_ids)
        input_ids[i, prompt_width - p: prompt_width] = torch.tensor(rollout.prompt_ids)
        input_ids[i, prompt_width: prompt_width + c] = torch.tensor(rollout.completion_ids, dtype=torch.long)
        attention_mask[i, prompt_width - p: prompt_width + c] = 1
        if not (mask_truncated and rollout.finish_reason == "length"):
            completion_mask[i, :c] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+C] positions ignore the left padding
    first_row, prompt_of_row = None, None
    if share_prompts:
        distinct: dict[tuple, int] = {}
        of_row = [distinct.setdefault(tuple(r.prompt_ids), len(distinct)) for r in rollouts]
        prompt_of_row = torch.tensor(of_row, dtype=torch.long)                                  # [B]
        first_row = torch.tensor([of_row.index(u) for u in range(len(distinct))], dtype=torch.long)  # [U]
    engine_logps, engine_mask = engine_logprobs(rollouts, completion_width)
    return RolloutBatch(input_ids, attention_mask, position_ids, completion_mask, completion_width, first_row,
                        prompt_of_row, engine_logps=engine_logps, engine_mask=engine_mask)


def engine_logprobs(rollouts: list, width: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The engine's sampling logprobs as [B, C] (zeros past each completion) and their mask, or (None, None)."""
    if any(r.logprobs is None for r in rollouts):
        return None, None
    values = torch.zeros((len(rollouts), width), dtype=torch.float32)   # [B, C]
    mask = torch.zeros((len(rollouts), width), dtype=torch.float32)     # [B, C]
    for i, r in enumerate(rollouts):
        values[i, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        mask[i, :len(r.logprobs)] = 1.0
    return values, mask


def completion_logprobs(model, batch: RolloutBatch, temperature: float, cache_arg: Optional[str] = None,
                        lm_head: Optional[torch.nn.Linear] = None) -> torch.Tensor:
    """Per-token logprobs of the completion tokens under `model`: [B, C]. Only the completion's logits are made.

    With `cache_arg` and `batch.prompt_of_row`, each distinct prompt runs once (shared_prompt_logprobs).
    With `lm_head` (the model's own, see logprobs_from_hidden), its forward returns logprobs: the [B, C, V]
    logits are never whole.
    """
    if cache_arg is not None and batch.prompt_of_row is not None:
        return shared_prompt_logprobs(model, batch, temperature, cache_arg, lm_head)
    width = batch.completion_width
    completion_ids = batch.input_ids[:, -width:]                                                         # [B, C]
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, logits_to_keep=width + 1, use_cache=False)
    if lm_head is not None:
        targets = torch.nn.functional.pad(completion_ids, (0, 1))   # the last position predicts past the end
        with lm_head_returns_logprobs(lm_head, targets, temperature):
            return model(**inputs).logits[:, :-1]                                                           # [B, C]
    logits = model(**inputs).logits                                                                        # [B, C+1, V]
    return selective_log_softmax(logits[:, :-1], completion_ids, temperature=temperature)                  # [B, C]


def shared_prompt_logprobs(model, batch: RolloutBatch, temperature: float, cache_arg: str,
                           lm_head: Optional[torch.nn.Linear] = None) -> torch.Tensor:
    """`completion_logprobs` with the prompt part run once per distinct prompt: [B, C].

    Pass 1 runs the U distinct prompts [U, P] and keeps their KV cache and last-position logits (which
    predict completion token 0). Their cache rows are repeated to the B rows (an index, so gradients from
    every completion add up in the shared prompt), and pass 2 runs the completions [B, C-1] on that cache
    (the last completion token predicts nothing the loss needs).
    """
    ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids   # [B, P+C]
    first_row, prompt_of_row = batch.prompt_first_row, batch.prompt_of_row                  # [U], [B]
    width = batch.completion_width
    prompt_width = ids.shape[1] - width
    completion_ids = ids[:, prompt_width:]                                                       # [B, C]
    head = contextlib.nullcontext() if lm_head is None else \
        lm_head_returns_logprobs(lm_head, completion_ids[:, :1], temperature, hidden_rows=prompt_of_row)
    with head:
        prompts = model(input_ids=ids[first_row, :prompt_width], attention_mask=mask[first_row, :prompt_width],
                        position_ids=positions[first_row, :prompt_width], use_cache=True, logits_to_keep=1)
    cache = repeat_cache_rows(returned_cache(prompts), prompt_of_row)                                   # [U, ...] -> [B, ...]
    if lm_head is not None:
        pieces = [prompts.logits]                                                                # [B, 1] logprobs
    else:   # log-softmax per piece: concatenating the logits would copy [B, C, V]
        pieces = [selective_log_softmax(prompts.logits[prompt_of_row], completion_ids[:, :1], temperature=temperature)]
    if width > 1:
        full_layers = [layer for layer in getattr(cache, "layers", [])
                       if not getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None]
        cached = [layer.keys.shape[-2] for layer in full_layers]
        head = contextlib.nullcontext() if lm_head is None else \
            lm_head_returns_logprobs(lm_head, completion_ids[:, 1:], temperature)
        with head:
            completions = model(input_ids=ids[:, prompt_width:-1], attention_mask=mask[:, :-1],
                                position_ids=positions[:, prompt_width:-1], use_cache=True,
                                logits_to_keep=width - 1, **{cache_arg: cache})
        if any(layer.keys.shape[-2] != before + width - 1 for layer, before in zip(full_layers, cached)):
            raise RuntimeError(f"share_prompt_prefix: {type(model).__name__} did not read the prompt cache passed "
                               f"as {cache_arg!r}; set share_prompt_prefix=false")
        pieces.append(completions.logits if lm_head is not None else                            # [B, C-1]
                      selective_log_softmax(completions.logits, completion_ids[:, 1:], temperature=temperature))
    return torch.cat(pieces, dim=1)                                                              # [B, C]


def lm_head_logprobs_agree(model, lm_head: torch.nn.Linear, batch: RolloutBatch, temperature: float,
                           cache_arg: Optional[str]) -> bool:
    """Whether `model` returns its lm_head output unchanged as logits (no softcapping or scaling after it),
    checked on a real batch: logprobs through lm_head_returns_logprobs == through the logits. Runs in eval
    mode (dropout, e.g. LoRA's, would make the two forwards differ); training modes are restored."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0)
           for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")):
        return False
    with eval_mode(model), torch.no_grad():
        expected = completion_logprobs(model, batch, temperature, cache_arg)
        found = completion_logprobs(model, batch, temperature, cache_arg, lm_head)
    if found.shape != expected.shape:
        return False
    error = (found - expected).abs()[batch.completion_mask.bool()]
    if error.numel() == 0:
        return True
    # bf16: two GEMM tilings may round a large logit a step apart; a transform after lm_head moves them all
    max_error, mean_error = (1e-3, 1e-4) if lm_head.weight.dtype == torch.float32 else (0.25, 2e-2)
    return bool(error.max() <= max_error and error.mean() <= mean_error)


class LogprobScorer:
    """Completion logprobs of one model at one temperature, through the fastest path that gives the same numbers.

    GRPO's `share_prompt_prefix`: in each micro-batch every distinct prompt runs through the model once and its KV
    cache serves all of its completions (the G rows of a group repeat the prompt); generation prefills each prompt
    once too. Same logprobs and gradients to float rounding, prompt compute / G. Off for the gradient pass under
    gradient checkpointing, which drops caches; models whose forward takes no cache run every row in full.
    GRPO's `logprobs_from_hidden`: while a logprob forward runs, the model's lm_head computes the logprobs of the
    completion tokens from its input hidden states in chunks instead of returning logits, so the [B, C, V] logits
    (and their gradient) never exist whole. Checked once on the first batch against the logits path; models that
    change logits after lm_head (softcapping, scaling) keep the logits path.

    - shared prompts (`share_prompts`): the model's KV-cache keyword, or None (every row runs in full: models whose
      forward takes no cache, or gradient checkpointing, whose layers drop caches);
    - `from_hidden`: the model's plain lm_head returns the logprobs (no [B, C, V] logits), kept only when the first
      batch's logprobs through it agree with those through the logits, on every process (`verify`);
    - `adapter_free_of`: a PEFT policy's reference is its own forward with the adapters disabled, on the policy's
      paths and verdict.
    """

    def __init__(self, accelerator, model, role: str, temperature: float, *, share_prompts: bool = False,
                 from_hidden: bool = False, keeps_cache: bool = True):
        self.accelerator, self.model, self.role, self.temperature = accelerator, model, role, temperature
        self.adapter_free_of: Optional[LogprobScorer] = None
        base = accelerator.unwrap_model(model)
        cache_arg = cache_argument(base) if share_prompts else None
        if share_prompts and cache_arg is None:
            logger.warning("share_prompt_prefix: the %s's forward takes no KV cache; every row runs in full", role)
        self.cache_arg = cache_arg if keeps_cache else None
        self.from_hidden = from_hidden
        self.head = plain_lm_head(base) if from_hidden else None
        self.verified = False

    @classmethod
    def adapter_free(cls, policy: "LogprobScorer") -> "LogprobScorer":
        scorer = cls.__new__(cls)
        scorer.__dict__.update(policy.__dict__, role="reference model", adapter_free_of=policy)
        return scorer

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, C] logprobs of the completion tokens (under autograd unless the caller disables it)."""
        if self.adapter_free_of is not None:
            with self.accelerator.unwrap_model(self.model).disable_adapter():   # PEFT: the base model
                return self.adapter_free_of(batch)
        return completion_logprobs(self.model, batch, self.temperature, self.cache_arg, self.head)

    def verify(self, batch: RolloutBatch) -> None:
        """Once, on the first batch: keep the lm_head path only if it gives the logits' numbers on every process
        (ZeRO-3 runs the forwards together, so all must take the same path)."""
        if self.adapter_free_of is not None:
            return self.adapter_free_of.verify(batch)
        if self.verified:
            return
        self.verified = True
        if self.head is None:
            if self.from_hidden:
                logger.warning("logprobs_from_hidden: the %s has no plain bias-free lm_head; using its logits",
                               self.role)
            return
        agree = lm_head_logprobs_agree(self.accelerator.unwrap_model(self.model), self.head, batch, self.temperature,
                                       self.cache_arg)
        disagree = self.accelerator.reduce(torch.tensor(float(not agree), device=self.accelerator.device), "max")
        if disagree.item():
            logger.warning("logprobs_from_hidden: the %s's logprobs through lm_head differ from those through its "
                           "logits (a transform after lm_head, such as softcapping or scaling?); using its logits",
                           self.role)
            self.head = None


class LogprobDiff:
    """|engine - trainer| logprob of the sampled tokens over a step: the mean and max of `rollout/logprob_diff_*`."""

    def __init__(self, device):
        self.stats = torch.zeros(3, device=device)   # sum, tokens, max

    def add(self, logps: torch.Tensor, batch: RolloutBatch) -> None:
        if batch.engine_logps is None:
            return
        diff = (logps.detach() - batch.engine_logps).abs() * batch.engine_mask           # [B, C]
        self.stats[:2] += torch.stack([diff.sum(), batch.engine_mask.sum()]).float()
        self.stats[2] = torch.maximum(self.stats[2], diff.max().float())

    def metrics(self, accelerator) -> dict[str, float]:
        """Every process calls it (two collectives); empty when no engine gave logprobs."""
        diff_sum, diff_tokens = accelerator.reduce(self.stats[:2], reduction="sum").tolist()
        diff_max = accelerator.reduce(self.stats[2:], reduction="max").item()
        if not diff_tokens:
            return {}
        return {"rollout/logprob_diff_mean": diff_sum / diff_tokens, "rollout/logprob_diff_max": diff_max}
