"""A small real OpenAI-compatible HTTP server on 127.0.0.1 for the openai backend's tests.

It answers /v1/chat/completions and /v1/completions deterministically (the answer is derived from the
prompt), injects faults (429 with Retry-After, 500, timeouts, malformed JSON) on a chosen share of each
prompt's first attempts, and COUNTS what it saw: requests and successful answers per prompt, faults by kind,
attempt times, the most requests in flight at once (`gather=N` holds each request until N are in flight,
bounded by a timeout). `hold_after=N` makes it stop answering after N
successful replies (requests wait until `release()`, then get 503) so a test can kill a client at a known
point. `max_prompt_chars` answers a longer prompt 400 (a context-length refusal); a request with `tools` gets a
tool call; `stream: true` gets the reply as SSE chunks (`cut_streams`: the connection drops after the first).
Stdlib only; runs in a daemon thread of the test process.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

FAULTS = ("429", "500", "timeout", "malformed")


def _unit(*parts) -> float:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


def answer_for(prompt: str) -> str:
    """The deterministic reply to a prompt (tests compare outputs against it)."""
    return "answer " + hashlib.sha256(prompt.encode()).hexdigest()[:8]


class FakeOpenAI:
    def __init__(self, api_key: Optional[str] = None, faults: Optional[dict] = None, fault_attempts: int = 2,
                 retry_after: Optional[str] = "0.05", delay_s: float = 0.0, timeout_sleep_s: float = 2.0,
                 always_fail: tuple = (), hold_after: Optional[int] = None, logprob_tokens: Optional[list] = None,
                 gather: int = 0, gather_timeout_s: float = 5.0, max_prompt_chars: Optional[int] = None,
                 cut_streams: bool = False):
        self.api_key = api_key
        self.faults = faults or {}  # kind -> probability per attempt (within the first fault_attempts)
        self.fault_attempts = fault_attempts
        self.retry_after = retry_after
        self.delay_s = delay_s
        self.timeout_sleep_s = timeout_sleep_s
        self.always_fail = always_fail  # prompts containing one of these always get HTTP 500
        self.hold_after = hold_after
        self.logprob_tokens = logprob_tokens  # token strings the server "generates" when logprobs are asked
        # Hold each request until `gather` are in flight at once (or gather_timeout_s passed): concurrency
        # is then observed without depending on how fast a loaded machine schedules the client.
        self.gather, self.gather_timeout_s = gather, gather_timeout_s
        self.max_prompt_chars, self.cut_streams = max_prompt_chars, cut_streams
        self.arrived = threading.Condition()
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.hits: Counter = Counter()  # every request, per prompt
        self.successes: Counter = Counter()  # 200 replies with a valid answer, per prompt
        self.fault_counts: Counter = Counter()
        self.attempt_times: dict[str, list[float]] = defaultdict(list)
        self.auth_seen: list[Optional[str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.held = 0
        self.bodies: list[dict] = []
        self._server: Optional[ThreadingHTTPServer] = None

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                fake.handle(self)

            def do_GET(self):
                fake.send_json(self, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self.release()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def release(self) -> None:
        """Stop holding: held requests get 503, later ones are served normally."""
        with self.lock:
            self.hold_after = None
        self.released.set()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- one request

    @staticmethod
    def send_json(handler, code: int, obj, headers: Optional[dict] = None, raw: Optional[bytes] = None) -> None:
        body = raw if raw is not None else json.dumps(obj).encode()
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) or was killed

    def handle(self, h) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        route = h.path.split("?", 1)[0]  # a query string (api-version=, a key) does not change the route
        chat = route.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        if not isinstance(prompt, str):  # content parts (text + images): the answer depends on all of them
            prompt = json.dumps(prompt, sort_keys=True)
        with self.lock:
            self.bodies.append(body)
            self.auth_seen.append(h.headers.get("Authorization"))
            attempt = self.hits[prompt]
            self.hits[prompt] += 1
            self.attempt_times[prompt].append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.gather:
            with self.arrived:
                self.arrived.notify_all()
                self.arrived.wait_for(lambda: self.in_flight >= self.gather, timeout=self.gather_timeout_s)
        try:
            self.respond(h, body, chat, prompt, attempt)
        finally:
            with self.lock:
                self.in_flight -= 1

    def respond(self, h, body: dict, chat: bool, prompt: str, attempt: int) -> None:
        if h.path.split("?", 1)[0] not in ("/v1/chat/completions", "/v1/completions"):
            return self.send_json(h, 404, {"error": {"message": f"no route {h.path}"}})
        if self.api_key is not None:
            given = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
            if given != self.api_key:
                # Like OpenAI, echo the key it got: the client must not print it back to the user.
                return self.send_json(h, 401, {"error": {"message": f"Incorrect API key provided: {given}"}})
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            return self.send_json(h, 400, {"error": {"message": "This model's maximum context length is exceeded",
                                                     "type": "BadRequestError"}})
        if any(s in prompt for s in self.always_fail):
            self.count_fault("500")
            return self.send_json(h, 500, {"error": {"message": "internal error"}})
        fault = self.pick_fault(prompt, attempt)
        if fault == "429":
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return self.send_json(h, 429, {"error": {"message": "rate limited"}}, headers=headers)
        if fault == "500":
            return self.send_json(h, 500, {"error": {"message": "internal error"}})
        if fault == "timeout":
            time.sleep(self.timeout_sleep_s)  # longer than the client's timeout: it gives up and retries
            return self.send_json(h, 500, {"error": {"message": "too late"}})
        if fault == "malformed":
            return self.send_json(h, 200, None, raw=b'{"choices": [{"message": {"content": "trunc')
        with self.lock:  # decide and count in one step, so no reply slips past the hold
            hold = self._must_hold()
            if hold:
                self.held += 1
            else:
                self.successes[prompt] += 1
        if hold:
            self.released.wait()
            return self.send_json(h, 503, {"error": {"message": "server going away"}})
        reply = self.reply(body, chat, prompt)
        if body.get("stream"):
            return self.send_stream(h, reply, chat)
        self.send_json(h, 200, reply)

    def send_stream(self, h, reply: dict, chat: bool) -> None:
        """The reply as an OpenAI stream: the text in two pieces, the finish, [DONE]; cut_streams: only the first
        event, then the connection closes short of the length it announced (a server dying mid-stream)."""
        c = reply["choices"][0]
        text = c["message"]["content"] if chat else c["text"]
        pieces = [text[: len(text) // 2], text[len(text) // 2:]]
        obj = "chat.completion.chunk" if chat else "text_completion"
        events = [{"index": 0, "delta": {"content": t}, "finish_reason": None} if chat else
                  {"index": 0, "text": t, "finish_reason": None} for t in pieces]
        events.append({"index": 0, "delta": {}, "finish_reason": "stop"} if chat else
                      {"index": 0, "text": "", "finish_reason": "stop"})
        data = b"".join(b"data: " + json.dumps({"id": reply["id"], "object": obj, "model": reply["model"],
                                                "choices": [e]}).encode() + b"\n\n" for e in events)
        data += b"data: [DONE]\n\n"
        try:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[:data.index(b"\n\n") + 2] if self.cut_streams else data)
            h.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _must_hold(self) -> bool:
        return self.hold_after is not None and sum(self.successes.values()) >= self.hold_after

    def pick_fault(self, prompt: str, attempt: int) -> Optional[str]:
        if attempt >= self.fault_attempts:
            return None
        u, edge = _unit(prompt, attempt), 0.0
        for kind in FAULTS:
            edge += self.faults.get(kind, 0.0)
            if u < edge:
                self.count_fault(kind)
                return kind
        return None

    def count_fault(self, kind: str) -> None:
        with self.lock:
            self.fault_counts[kind] += 1

    def reply(self, body: dict, chat: bool, prompt: str) -> dict:
        text = answer_for(prompt)
        usage = {"prompt_tokens": len(prompt.split()) + 3, "completion_tokens": 2}
        choice: dict = {"index": 0, "finish_reason": "stop"}
        if chat and body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            call = {"id": "call_1", "type": "function",
                    "function": {"name": name, "arguments": json.dumps({"q": text})}}
            choice.update(message={"role": "assistant", "content": None, "tool_calls": [call]},
                          finish_reason="tool_calls")
        elif chat:
            choice["message"] = {"role": "assistant", "content": text}
            if body.get("logprobs") and self.logprob_tokens:
                k = body.get("top_logprobs") or 1
                choice["logprobs"] = {"content": [
                    {"token": tok, "logprob": -0.1,
                     "top_logprobs": [{"token": t, "logprob": -0.1 - j} for j, t in
                                      enumerate(self.logprob_tokens[i:] + self.logprob_tokens[:i])][:k]}
                    for i, tok in enumerate(self.logprob_tokens)]}
        else:
            choice["text"] = text
        return {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
                "model": body.get("model"), "choices": [choice], "usage": usage}
