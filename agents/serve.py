"""Serve a local `LMPolicy` over the OpenAI-compatible HTTP API: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models. Any OpenAI client (and the prompting agent's HTTP backend) can then use a local or trained model.

    etpo serve --model tiny --port 8000          # binds 127.0.0.1 unless --host says otherwise
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=none etpo bench --agents prompting ...

Built on the standard library's ThreadingHTTPServer rather than a web framework: the protocol surface is three
small JSON endpoints, and this keeps serving free of extra dependencies. Requests are answered concurrently but
generation is serialised (one model, one lock). Chat requests use the tokenizer's chat template when it has one;
otherwise the non-system messages' contents are joined (the env's observations are self-contained prompts).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY_BYTES = 4 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class BadRequest(ValueError):
    pass


def load_policy_for_serving(model: str, device: str = "auto", dtype: str = "auto") -> Any:
    """'tiny' (built if missing), a saved LMPolicy directory (with adapters), or any causal LM path/name, frozen, in
    `dtype` (auto = bfloat16 on CUDA, float32 on CPU)."""
    from agents.lm import LMPolicy, RuntimeSettings, load_options

    if model == "tiny":
        from agents.tiny import ensure_tiny_model

        model = str(ensure_tiny_model())
    options = {**load_options(RuntimeSettings(device=device, dtype=dtype)), "trainable": False}
    if (Path(model) / "policy.json").exists():
        return LMPolicy.load(model, **options)
    return LMPolicy.from_pretrained(model, **options)


class PolicyServer:
    """The request logic, independent of HTTP: dict in, dict out (unit-testable)."""

    def __init__(self, policy: Any, name: str = "local"):
        self.policy = policy
        self.name = name
        self._lock = threading.Lock()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "etpo"}]}

    def completions(self, body: dict) -> dict:
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("'prompt' must be a non-empty string or list of strings")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for prompt in prompts:
            for text, reason, n_prompt, n_completion in self._generate(prompt, body):
                choices.append({"index": len(choices), "text": text, "finish_reason": reason, "logprobs": None})
                usage["prompt_tokens"] += n_prompt
                usage["completion_tokens"] += n_completion
        return self._envelope("text_completion", choices, usage)

    def chat(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        prompt_ids = self._chat_prompt_ids(messages)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for text, reason, n_prompt, n_completion in self._generate(prompt_ids, body):
            choices.append({"index": len(choices), "message": {"role": "assistant", "content": text},
                            "finish_reason": reason})
            usage["prompt_tokens"] += n_prompt
            usage["completion_tokens"] += n_completion
        return self._envelope("chat.completion", choices, usage)

    def _chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        tok = self.policy.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = "\n\n".join(m["content"] for m in messages if m.get("role") != "system")
        return self.policy.encode(text)

    def _generate(self, prompt: str | list[int], body: dict) -> list[tuple[str, str, int, int]]:
        from agents.lm import GenerationSettings

        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        try:
            gen = GenerationSettings(
                max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 256),
                temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                top_k=int(body.get("top_k", 0) or 0), stop=tuple(str(s) for s in stop),
                seed=None if body.get("seed") is None else int(body["seed"]))
            n = int(body.get("n", 1))
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"bad sampling parameter: {exc}") from exc
        if not 1 <= n <= 16 or gen.max_new_tokens < 1:
            raise BadRequest("'n' must be in 1..16 and 'max_tokens' at least 1")
        if isinstance(prompt, str):
            ids = self.policy.encode(prompt, max_length=self.policy.max_prompt_tokens(gen))
        else:
            ids = prompt[-self.policy.max_prompt_tokens(gen):]
        if not ids:
            raise BadRequest("the prompt is empty")
        # A request's seed makes that request reproducible on its own (as in the OpenAI API).
        generator = None
        if gen.seed is not None:
            import torch

            generator = torch.Generator(device=self.policy.device).manual_seed(gen.seed)
        with self._lock:
            generations = self.policy.generate([ids] * n, gen, generator=generator)
        out = []
        for g in generations:
            text, reason = g.text, "length"
            if g.finish_reason in ("eos", "stop"):
                reason = "stop"
                text = _cut_at_stop(text, gen.stop)  # the API excludes the stop sequence
            out.append((text, reason, len(ids), len(g.action_ids)))
        return out

    def _envelope(self, kind: str, choices: list[dict], usage: dict) -> dict:
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": usage}


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def _handler_for(server_logic: PolicyServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet by default; errors still go out as JSON
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": None}})

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(HTTPStatus.OK, server_logic.models())
            elif self.path.rstrip("/") in ("/health", "/v1/health"):
                self._send(HTTPStatus.OK, {"status": "ok"})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found")

        def do_POST(self) -> None:  # noqa: N802
            routes = {"/v1/completions": server_logic.completions, "/v1/chat/completions": server_logic.chat}
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                if body.get("stream"):
                    raise BadRequest("streaming is not supported by this server")
                self._send(HTTPStatus.OK, route(body))
            except (BadRequest, json.JSONDecodeError) as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
            except Exception as exc:  # a server bug must not kill the serving thread; report it to the client
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}", "server_error")

    return Handler


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True


def make_server(policy: Any, host: str = "127.0.0.1", port: int = 0, name: str = "local") -> ThreadingHTTPServer:
    """An HTTP server for `policy` (not yet serving: call `serve_forever()`, e.g. in a thread). port 0 = free port."""
    import socket

    server_cls = _DualStackServer
    if ":" in host:
        server_cls = type("_V6Server", (_DualStackServer,), {"address_family": socket.AF_INET6})
    return server_cls((host, port), _handler_for(PolicyServer(policy, name)))


def serve_forever(model: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
                  device: str = "auto", dtype: str = "auto") -> None:
    import sys

    policy = load_policy_for_serving(model, device=device, dtype=dtype)
    server = make_server(policy, host, port, name or Path(str(model)).name or "local")
    if host not in LOOPBACK:
        print(f"warning: serving on {host}, reachable beyond this machine; the API has no authentication",
              file=sys.stderr)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {model} on http://{bound_host}:{bound_port}/v1  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
