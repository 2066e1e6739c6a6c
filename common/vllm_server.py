"""The `server` rollout backend: a thin client for vLLM's own OpenAI-compatible server and its RL endpoints.

We do not write an inference server. vLLM's server (`python -m vllm.entrypoints.openai.api_server`, started as
the README's "vLLM server" section says) generates; this client
- sends token ids to `/inference/v1/generate` (tokens in, tokens and sampling logprobs out, the weight version
  that sampled every token), prompts split over one or more servers, with timeouts and retries; a server that is
  down or dies mid-run is a `ServerError` naming its host and port;
- pushes the policy's weights after every optimizer step: `/pause` -> `/start_weight_update` -> buckets
  (`/update_weights` while the transport broadcasts) -> `/finish_weight_update` (the weight version) ->
  `/reset_prefix_cache` -> `/resume`, then reads each server's `/weight_info`: a server holding another version is
  an error, never a silent off-policy sample.

Transports (`vllm_server_transport`): `gloo` (common/vllm_weight_transfer.py, the server side in
common/vllm_server_worker.py; what the CPU tests run) and `nccl` (vLLM's own NCCL engine with its packed buffers,
for GPUs; written against vLLM's documented trainer API, not testable on CPU). The weights come from part 1's
packer (`hf_weights`: ZeRO-3 gathers in capped groups, PEFT merged, tied heads named).

With several training processes every process generates its own prompts; every process walks the weights
(ZeRO-3 gathers are collective) and process 0 alone sends them.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from common.rollout import Rollout, SamplingParams

logger = logging.getLogger(__name__)
TRANSPORTS = ("gloo", "nccl")


class ServerError(RuntimeError):
    """A vLLM server that is down, died, timed out or answered with an error (after the retries)."""


def parse_servers(host: Optional[str], port: Optional[int], extra: Sequence[str] = ()) -> list[tuple[str, int]]:
    """`vllm_host`/`vllm_port` plus `vllm_servers` entries "host:port" -> [(host, port), ...]."""
    servers = [(host, int(port))] if host and port else []
    for entry in extra:
        name, _, number = str(entry).rpartition(":")
        if not name or not number.isdigit() or not 0 < int(number) < 65536:
            raise ValueError(f"vllm_servers entry {entry!r}: expected host:port")
        servers.append((name, int(number)))
    return servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Server:
    """One vLLM server: JSON over HTTP with timeouts and retries."""

    def __init__(self, host: str, port: int, timeout_s: float = 600.0, retries: int = 3,
                 retry_wait_s: float = 1.0) -> None:
        self.host, self.port = host, port
        self.timeout_s, self.retries, self.retry_wait_s = timeout_s, retries, retry_wait_s
        self.failures = 0   # retried failures, logged and counted

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def request(self, path: str, body: Optional[dict] = None, method: str = "POST", retry: bool = True,
                timeout_s: Optional[float] = None) -> Optional[dict]:
        url = f"http://{self.host}:{self.port}{path}"
        data = None if body is None else json.dumps(body).encode()
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                    text = response.read().decode()
                return json.loads(text) if text.strip() else None
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                if err.code < 500:   # our request is wrong: retrying cannot help
                    raise ServerError(f"vLLM server at {self.name}: {method} {path} answered {err.code}: {detail}") \
                        from None
                reason = f"answered {err.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as err:
                reason = str(getattr(err, "reason", err))
            self.failures += 1
            if attempt + 1 < attempts:
                logger.warning("vLLM server at %s: %s %s failed (%s); retry %d of %d", self.name, method, path,
                               reason, attempt + 1, self.retries)
                time.sleep(self.retry_wait_s * 2 ** attempt)
        raise ServerError(f"vLLM server at {self.name} is down or failing: {method} {path}: {reason} "
                          f"({attempts} attempts; is it running? see the README's \"vLLM server\" section)")

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while True:
            try:
                self.request("/health", method="GET", retry=False, timeout_s=10)
                return
            except ServerError:
                if time.time() > deadline:
                    raise ServerError(f"vLLM server at {self.name}: not healthy after {timeout_s:.0f} s") from None
                time.sleep(1.0)

    def weight_version(self) -> Optional[str]:
        return (self.request("/weight_info", method="GET") or {}).get("weight_version")


class VLLMServerEngine:
    """Rollouts from vLLM servers; the policy's engine is weight-synced, a frozen sampler's (`sync=False`) never.

    `servers`: [(host, port)]; prompts are split over them round-robin. `bucket_bytes` caps one broadcast bucket,
    `sync_group_bytes` one ZeRO-3 gather. `transfer_host` is this machine's address as the servers reach it (the
    gloo/NCCL group's store runs here, on `transfer_port`, 0 = a free port). `stop_token_ids` defaults to the
    tokenizer's EOS and is the only stop condition, as in the other backends.
    """

    def __init__(self, servers: Sequence[tuple[str, int]], tokenizer, accelerator=None, *, sync: bool = True,
                 transport: str = "gloo", bucket_bytes: int = 256 * 2 ** 20, sync_group_bytes: int = 256 * 2 ** 20,
                 transfer_host: str = "127.0.0.1", transfer_port: int = 0, timeout_s: float = 600.0,
                 retries: int = 3, startup_timeout_s: float = 60.0, max_concurrency: int = 64,
                 stop_token_ids: Optional[Sequence[int]] = None, seed: int = 0, per_request: bool = False) -> None:
        if not servers:
            raise ValueError("VLLMServerEngine: no servers (set vllm_host and vllm_port)")
        if transport not in TRANSPORTS:
            raise ValueError(f"vllm_server_transport={transport!r}: expected one of {', '.join(TRANSPORTS)}")
        if stop_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("VLLMServerEngine: the tokenizer has no eos token; set tokenizer.eos_token or pass "
                                 "stop_token_ids")
            stop_token_ids = [tokenizer.eos_token_id]
        self.servers = [Server(h, p, timeout_s=timeout_s, retries=retries) for h, p in servers]
        self.tokenizer, self.accelerator = tokenizer, accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.sync, self.transport_name = sync, transport
        self.bucket_bytes, self.sync_group_bytes = bucket_bytes, sync_group_bytes
        self.transfer_host, self.transfer_port = transfer_host, transfer_port
        self.stop_token_ids = list(stop_token_ids)
        self.seed = seed
        self.per_request = per_request   # one /update_weights per bucket (bench/vllm_server_sync.py's baseline)
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency)
        self.weights_version = 0
        self.last_sync: dict = {}
        self.transport = None
        for server in self.servers:
            server.wait_healthy(startup_timeout_s)

    # ----- generation ---------------------------------------------------------------------------------------------
    def sampling_json(self, params: SamplingParams, seed: Optional[int]) -> dict:
        return {"n": params.num_generations, "temperature": params.temperature, "top_p": params.top_p,
                "top_k": params.top_k or 0, "min_p": params.min_p or 0.0,
                "repetition_penalty": params.repetition_penalty, "max_tokens": params.max_new_tokens,
                "seed": seed, "logprobs": 0, "detokenize": False,
                # our stop tokens are the only stop condition, not the model's generation config
                "stop_token_ids": self.stop_token_ids, "ignore_eos": True}

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("VLLMServerEngine.generate: empty prompt (no tokens) at index "
                             f"{next(i for i, p in enumerate(prompt_ids) if len(p) == 0)}")

        def one(index: int) -> dict:
            # with a seed, each (process, prompt) draws its own stream, reproducibly
            seed = None if params.seed is None else params.seed + 1_000_003 * self.rank + index
            server = self.servers[(index + self.rank) % len(self.servers)]
            return server.request("/inference/v1/generate", {"token_ids": list(prompt_ids[index]),
                                                             "sampling_params": self.sampling_json(params, seed)})

        responses = list(self.pool.map(one, range(len(prompt_ids))))
        rollouts: list[Rollout] = []
        for prompt_index, (prompt, response) in enumerate(zip(prompt_ids, responses)):
            server = self.servers[(prompt_index + self.rank) % len(self.servers)]
            for choice in sorted(response["choices"], key=lambda c: c["index"]):
                ids = list(choice["token_ids"])
                content = (choice.get("logprobs") or {}).get("content")
                logprobs = [entry["logprob"] for entry in content] if content is not None else None
                reason = "stop" if ids and ids[-1] in self.stop_token_ids and choice["finish_reason"] == "stop" \
                    else "length"
                rollouts.append(Rollout(
                    prompt_ids=list(prompt), completion_ids=ids, logprobs=logprobs, finish_reason=reason,
                    prompt_index=prompt_index, generation_index=choice["index"],
                    completion_text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    weights_version=self._version_of(choice, server)))
        return rollouts

    def _version_of(self, choice: dict, server: Server) -> int:
        """The version that sampled the choice's tokens, as the server reports it (the policy's engine only)."""
        if not self.sync:
            return self.weights_version
        spans = choice.get("weight_versions") or []
        versions = {span["version"] for span in spans}
        if len(versions) != 1 or not next(iter(versions)).lstrip("-").isdigit():
            raise ServerError(f"vLLM server at {server.name}: a completion sampled by weight versions "
                              f"{sorted(versions) or 'none reported'}, expected exactly one step number (a server "
                              f"this run has not synced?)")
        return int(versions.pop())

    # ----- weights ------------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module, version: Optional[int] = None) -> int:
        """Push `model`'s weights to every server under `version` (default: previous + 1); returns it."""
        from common.vllm_engine import _is_zero3, hf_weights

        version = self.weights_version + 1 if version is None else version
        if not self.sync:
            raise RuntimeError("VLLMServerEngine: a frozen sampler's engine is never weight-synced")
        started = time.time()
        stats = {"groups": 0, "tensors": 0, "bytes": 0}
        weights = hf_weights(model, self.accelerator, self.sync_group_bytes, stats)
        failure: Optional[ServerError] = None
        sent = {"buckets": 0}
        if self.rank == 0:
            # walked in full first (ZeRO-3 gathers are collective); ZeRO-3 frees each gathered group after it is
            # yielded, so keep host copies then (process 0 only)
            keep = _is_zero3(self.accelerator)
            tensors = [(name, tensor.detach().to("cpu", copy=True) if keep else tensor.detach())
                       for name, tensor in weights]
            try:
                sent = self._send(tensors, version)
            except ServerError as err:
                failure = err
        else:
            for _ in weights:   # join the collective gathers
                pass
        if self.world > 1:   # no process samples before the servers resumed; a failure stops every process
            flag = torch.tensor([float(failure is not None)], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="max").item() > 0 and failure is None:
                failure = ServerError("vLLM server: the weight sync failed on process 0")
        if failure is not None:
            raise failure
        seconds = time.time() - started
        self.weights_version = version
        self.last_sync = {**stats, **sent, "seconds": seconds,
                          "gb_per_s": stats["bytes"] / max(seconds, 1e-9) / 1e9}
        if self.rank == 0:
            logger.info("weight sync %d to %d server(s): %d buckets, %.1f MB, %.2f s, %.3f GB/s", version,
                        len(self.servers), sent["buckets"], stats["bytes"] / 1e6, seconds,
                        self.last_sync["gb_per_s"])
        return version

    def _send(self, tensors: list, version: int) -> dict:
        """Process 0: pause, transfer, finish under `version`, reset the prefix cache, resume, check versions."""
        if self.transport is None:
            self.transport = make_transport(self.transport_name, self.servers, self.transfer_host,
                                            self.transfer_port, self.bucket_bytes)
        for server in self.servers:
            server.request("/pause?mode=wait")
        sent = self.transport.send(self.servers, tensors, self.bucket_bytes, per_request=self.per_request)
        for server in self.servers:
            server.request("/finish_weight_update", {"weight_version": str(version)})
            server.request("/reset_prefix_cache")   # cached prompt keys/values came from the old weights
            server.request("/resume")
        for server in self.servers:
            held = server.weight_version()
            if held != str(version):
                raise ServerError(f"vLLM server at {server.name} holds weight version {held!r} after the sync to "
                                  f"{version} (a stale server)")
        return sent

    def sync_metrics(self) -> dict:
        """The last sync's figures, for the step's metrics row."""
        return {"sync/buckets": float(self.last_sync.get("buckets", 0)),
                "sync/megabytes": self.last_sync.get("bytes", 0) / 1e6,
                "sync/gb_per_s": self.last_sync.get("gb_per_s", 0.0)}

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        if self.transport is not None:
            self.transport.close(self.servers)
            self.transport = None


# ---------------------------------------------------------------------------------------------------------------------
# Transports: one small interface, connect (once) / send (per sync) / close
# ---------------------------------------------------------------------------------------------------------------------
def make_transport(name: str, servers: list[Server], host: str, port: int, bucket_bytes: int):
    return {"gloo": GlooTransport, "nccl": NCCLTransport}[name](servers, host, port or free_port(), bucket_bytes)


def _world_sizes(servers: list[Server]) -> list[int]:
    return [int(server.request("/get_world_size?include_dp=true", method="GET")["world_size"]) for server in servers]


class GlooTransport:
    """Byte buckets broadcast over a gloo group: this process is rank 0, each server's workers follow."""

    def __init__(self, servers: list[Server], host: str, port: int, bucket_bytes: int) -> None:
        from common.vllm_weight_transfer import GlooSender

        sizes = _world_sizes(servers)
        self.sender = GlooSender(host, port, 1 + sum(sizes))
        offsets = [1 + sum(sizes[:i]) for i in range(len(servers))]
        # each server's init blocks in the rendezvous: run them while this process joins as rank 0
        pool = ThreadPoolExecutor(max_workers=len(servers))
        futures = [pool.submit(server.request, "/init_weight_transfer_engine",
                               {"init_info": {"master_address": host, "master_port": port, "rank_offset": offset,
                                              "world_size": 1 + sum(sizes)}}, "POST", False)
                   for server, offset in zip(servers, offsets)]
        self.sender.connect()
        for future in futures:
            future.result()
        pool.shutdown()
        logger.info("gloo weight transfer to %d server(s) (%d workers) on %s:%d", len(servers), sum(sizes), host,
                    port)

    def send(self, servers: list[Server], tensors: list, bucket_bytes: int, per_request: bool = False) -> dict:
        """One `/update_weights` per server for the whole plan (or one per bucket: `per_request`, the slow way
        the benchmark compares with), each in flight while the buckets are broadcast."""
        from common.vllm_weight_transfer import plan_buckets

        plan = plan_buckets(tensors, bucket_bytes)
        for server in servers:
            server.request("/start_weight_update")
        rounds = [[b] for b in range(len(plan.buckets))] if per_request else [None]
        sent = 0
        for only in rounds:
            info = {**plan.to_json(), **({"only_buckets": only} if only is not None else {})}
            sent += _alongside(servers, {"update_info": info}, lambda: self.sender.send(tensors, plan, only))
        return {"buckets": len(plan.buckets), "sent_bytes": sent}

    def close(self, servers: list[Server]) -> None:
        self.sender.close()


class NCCLTransport:
    """vLLM's own NCCL engine with its packed buffers (GPUs; not testable on CPU). The servers are started with
    `--weight-transfer-config '{"backend": "nccl"}'`; this process is NCCL rank 0 and sends from its GPU."""

    def __init__(self, servers: list[Server], host: str, port: int, bucket_bytes: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
        from vllm.distributed.weight_transfer.nccl_common import trainer_init as open_trainer_endpoint
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        sizes = _world_sizes(servers)
        world = 1 + sum(sizes)
        # the packed buffer size is agreed at init: both sides cut the stream at the same boundaries
        self.init_info = NCCLTrainerInitInfo(master_address=host, master_port=port, world_size=world,
                                             packed_buffer_size_bytes=bucket_bytes)
        pool = ThreadPoolExecutor(max_workers=len(servers))
        futures = []
        for i, server in enumerate(servers):
            info = NCCLWeightTransferInitInfo(master_address=host, master_port=port, rank_offset=1 + sum(sizes[:i]),
                                              world_size=world, packed=True,
                                              packed_buffer_size_bytes=bucket_bytes,
                                              packed_num_buffers=self.init_info.packed_num_buffers)
            futures.append(pool.submit(server.request, "/init_weight_transfer_engine",
                                       {"init_info": worker_init_payload(info)}, "POST", False))
        self.group = open_trainer_endpoint(self.init_info)
        for future in futures:
            future.result()
        pool.shutdown()

    def send(self, servers: list[Server], tensors: list, bucket_bytes: int, per_request: bool = False) -> dict:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        info = {"names": [n for n, _ in tensors], "dtype_names": [str(t.dtype).removeprefix("torch.")
                                                                  for _, t in tensors],
                "shapes": [list(t.shape) for _, t in tensors]}
        for server in servers:
            server.request("/start_weight_update")
        device = torch.device("cuda", torch.cuda.current_device())

        def broadcast() -> int:
            packed_nccl_broadcast_producer(iterator=((n, t.to(device)) for n, t in tensors), group=self.group,
                                           src=0, post_iter_func=lambda item: item[1],
                                           buffer_size_bytes=self.init_info.packed_buffer_size_bytes,
                                           num_buffers=self.init_info.packed_num_buffers)
            torch.cuda.current_stream().synchronize()
            return sum(t.numel() * t.element_size() for _, t in tensors)

        sent = _alongside(servers, {"update_info": info}, broadcast)
        return {"buckets": -(-sent // bucket_bytes), "sent_bytes": sent}

    def close(self, servers: list[Server]) -> None:
        self.group = None


def _alongside(servers: list[Server], body: dict, broadcast) -> int:
    """POST /update_weights to every server (each blocks until it has received) while `broadcast()` runs here."""
    errors: list = []

    def post(server: Server) -> None:
        try:
            server.request("/update_weights", body, retry=False)   # a half-received update cannot be retried
        except ServerError as err:
            errors.append(err)

    threads = [threading.Thread(target=post, args=(server,), daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    result = broadcast()
    for thread, server in zip(threads, servers):
        thread.join(server.timeout_s)
        if thread.is_alive():
            errors.append(ServerError(f"vLLM server at {server.name}: /update_weights did not return"))
    if errors:
        raise errors[0]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
def transfer_address(cfg_value: Optional[str], servers: Sequence[tuple[str, int]]) -> str:
    """The address the servers reach this machine at: the key's value, loopback when every server is local, else
    this host's name."""
    if cfg_value:
        return cfg_value
    if all(host in ("127.0.0.1", "localhost", "::1") for host, _ in servers):
        return "127.0.0.1"
    return socket.getfqdn()


def server_transport(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def server_options(cfg, tokenizer, accelerator) -> dict:
    """The policy's VLLMServerEngine keywords from a script config."""
    servers = parse_servers(cfg.vllm_host, cfg.vllm_port, cfg.vllm_servers)
    return dict(servers=servers, tokenizer=tokenizer, accelerator=accelerator, sync=True,
                transport=server_transport(cfg.vllm_server_transport),
                bucket_bytes=int(cfg.vllm_sync_bucket_mb * 2 ** 20),
                sync_group_bytes=int(cfg.vllm_sync_group_mb * 2 ** 20),
                transfer_host=transfer_address(cfg.vllm_transfer_address, servers),
                timeout_s=cfg.vllm_server_timeout, retries=cfg.vllm_server_retries, seed=cfg.seed)


def check_server_config(cfg) -> None:
    """use_vllm_server=true, checked before any model loads (the servers' health is checked when the engine is
    built, after the data)."""
    from common.config import ConfigError
    if not cfg.vllm_host or not cfg.vllm_port:
        raise ConfigError("use_vllm_server=true needs vllm_host and vllm_port (the server started as the README's "
                          "\"vLLM server\" section says)")
    try:
        parse_servers(cfg.vllm_host, cfg.vllm_port, cfg.vllm_servers)
    except ValueError as err:
        raise ConfigError(f"key {err}") from None
    if server_transport(cfg.vllm_server_transport) == "nccl" and not torch.cuda.is_available():
        raise ConfigError("key 'vllm_server_transport' = nccl: NCCL needs a GPU (there is none here); use gloo")


def check_servers_up(servers: Sequence[tuple[str, int]], key: str) -> None:
    """Every server answers /health (before any model loads): a down one is one error line naming it."""
    from common.config import ConfigError
    for host, port in servers:
        try:
            Server(host, port, timeout_s=10, retries=2).request("/health", method="GET")
        except ServerError as err:
            raise ConfigError(f"key '{key}': {err}") from None
