"""A real local HTTP server that answers the OpenAI chat-completions API with scripted replies.

Used by tests and bench/ to drive litellm end to end on 127.0.0.1 without any network:

    with OpenAIStubServer(reply=lambda request: StubReply(content='{"score": 0.5}'), latency_s=0.2) as server:
        litellm.completion(model="openai/judge", api_base=server.base_url, api_key="x", messages=[...])
        server.max_in_flight   # most requests that were being served at the same moment

GET /stats returns {"requests", "max_in_flight"}. Run as a script it serves one fixed reply from
its own process (so a benchmark's client does not share a GIL with the server) and prints its port:

    python tests/openai_stub_server.py --latency 0.2 --content '{"score": 0.5, "uncertainty": 0.1}'

`reply` is called once per request with a `StubRequest` (the JSON body, the headers and a
running index) and returns a `StubReply`: HTTP status, message content, token usage and an
extra delay (to provoke client timeouts). Replies with status >= 400 send an OpenAI-style error.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


@dataclass
class StubRequest:
    index: int              # 0-based arrival order
    body: dict              # the decoded JSON request
    headers: dict           # names lower-cased

    @property
    def model(self) -> str:
        return self.body.get("model", "")

    @property
    def temperature(self) -> Optional[float]:
        return self.body.get("temperature")

    @property
    def text(self) -> str:
        """All message contents joined: what the model would read."""
        return "\n".join(str(m.get("content", "")) for m in self.body.get("messages", []))


@dataclass
class StubReply:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0            # added to the server's latency for this one request
    prompt_tokens: int = 100
    completion_tokens: int = 20
    error_message: str = "scripted failure"


ReplyFn = Callable[[StubRequest], StubReply]


class _Server(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a burst of new connections overflows it, and the
    # kernel's dropped SYNs are retried after 1 s, which a real provider would never add.
    request_queue_size = 256


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list = field(default_factory=list)


class OpenAIStubServer:
    def __init__(self, reply: ReplyFn, latency_s: float = 0.0, host: str = "127.0.0.1"):
        self.reply = reply
        self.latency_s = latency_s
        self.stats = _Stats()
        self._httpd = _Server((host, 0), self._handler_class())  # port 0: a free port
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False      # a request held past a client timeout must not block close
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "OpenAIStubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "OpenAIStubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observations --------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[StubRequest]:
        with self.stats.lock:
            return list(self.stats.requests)

    @property
    def max_in_flight(self) -> int:
        return self.stats.max_in_flight

    def reset(self) -> None:
        with self.stats.lock:
            self.stats.requests.clear()
            self.stats.max_in_flight = 0

    # -- HTTP ----------------------------------------------------------------------------------
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as real providers do
            # Headers and body go out in two writes; with Nagle on, the body waits for the
            # client's delayed ACK of the headers (~40 ms on Linux), adding that to every reply.
            disable_nagle_algorithm = True

            def log_message(self, *args):   # keep test output quiet
                pass

            def do_GET(self):   # counters, for a client in another process
                if self.path.rstrip("/") != "/stats":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                with server.stats.lock:
                    self._send(200, {"requests": len(server.stats.requests), "max_in_flight": server.stats.max_in_flight})

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                stats = server.stats
                with stats.lock:
                    request = StubRequest(len(stats.requests), body, {k.lower(): v for k, v in self.headers.items()})
                    stats.requests.append(request)
                    stats.in_flight += 1
                    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
                try:
                    reply = server.reply(request)
                    time.sleep(server.latency_s + reply.delay_s)
                finally:
                    with stats.lock:
                        stats.in_flight -= 1
                if reply.status >= 400:
                    self._send(reply.status, {"error": {"message": reply.error_message, "type": "server_error", "code": reply.status}})
                    return
                self._send(200, {
                    "id": f"chatcmpl-stub-{request.index}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "stub"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                              "total_tokens": reply.prompt_tokens + reply.completion_tokens},
                })

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass    # the client gave up (timeout); nothing to answer

        return Handler


def verdict(score: float, uncertainty: float = 0.1, rationale: str = "scripted", gaming: bool = False) -> str:
    """A well-formed judge reply."""
    return json.dumps({"principles": ["scripted principle"], "score": score, "rationale": rationale,
                       "uncertainty": uncertainty, "gaming": gaming})


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="serve scripted OpenAI chat completions on 127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--content", default=verdict(0.5), help="the assistant message of every reply")
    args = parser.parse_args()
    server = OpenAIStubServer(reply=lambda request: StubReply(content=args.content), latency_s=args.latency)
    print(server.base_url, flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
