"""Tests for iflow_proxy.py: pure parts directly, the rest over real loopback sockets.

The fake upstream below *is* our iFlow: it checks the HMAC signature and headers, answers 406 to
``Accept: text/event-stream``, puts business errors inside HTTP 200 bodies, and allows one request
in flight per key, as the real service does.
"""

import ast
import base64
import contextlib
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest

import iflow_proxy as ip

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("sk-key-one-1111", "sk-key-two-2222", "sk-key-three-333")
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until true or the deadline passes (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + what)


# ==================================================================================================
# The fake iFlow upstream
# ==================================================================================================

class FakeServer(http.server.ThreadingHTTPServer):
    """A fake upstream on a free loopback port, served from a daemon thread.  It behaves as
    real servers do with kept-alive connections (see QuietHandler): it closes one idle for
    ``keep_alive`` seconds (uvicorn and llama.cpp's server after 5), answers every
    ``close_every``-th request with Connection: close, and resets a reused connection
    ``reset_reused`` times (a server that closed it just as the request arrived)."""

    daemon_threads = True
    keep_alive = 5.0
    close_every = 0
    reset_reused = 0
    answers = 0

    def handle_error(self, request, client_address):
        pass  # the proxy cutting a connection (a client that left) is expected here

    def serve_in_thread(self):
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.keep_alive  # an idle connection is closed after it
        super().setup()
        self.served = 0

    def handle_one_request(self):
        if self.served:  # wait for the next request (closing an idle connection as it goes)
            try:
                arrived = self.rfile.peek(1)
            except OSError:
                arrived = b""
            if not arrived:
                self.close_connection = True
                return
        if self.served and self.server.reset_reused > 0:
            self.server.reset_reused -= 1  # the request came, and the answer is a reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        super().handle_one_request()
        self.served += 1

    def end_headers(self):
        server = self.server
        server.answers += 1
        if server.close_every and server.answers % server.close_every == 0:
            self.send_header("Connection", "close")  # (and http.server closes after it)
        super().end_headers()

    def log_message(self, *args):
        pass

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def serving(server):
    """A fixture's body: the fake server for the test, stopped after it."""
    yield server
    server.stop()


class FakeIFlow(FakeServer):
    request_queue_size = 64

    def __init__(self, keys=KEYS, signing=True, tls=None):
        super().__init__(("127.0.0.1", 0), FakeIFlowHandler)
        self.scheme = "http"
        if tls is not None:  # an ssl.SSLContext: serve HTTPS like the real host
            self.socket = tls.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.keys = set(keys)
        self.signing = signing          # False: a plain OpenAI-compatible provider
        self.models = list(ip.BUILTIN_MODELS)
        self.unavailable_models = set()  # answered with business code 435
        self.models_endpoint = True
        self.models_hold = None         # threading.Event: GET /v1/models waits on it
        self.lock = threading.Lock()
        self.requests = []              # (path, headers dict, body dict or None, key)
        self.inflight = {}
        self.connections = 0
        self.script = {}                # key -> list of actions consumed one per request
        self.gate = None                # threading.Event: streams pause after the first chunk
        self.gate_timed_out = False
        self.omit_done = False
        self.aborted_streams = 0
        self.json_for_stream = False
        self.responder = None           # body -> dict(content, reasoning, tool_calls, usage)
        self.hold = None                # threading.Event: every chat request waits on it
        self.max_output = None          # DeepSeek-like: a larger max_tokens is a 400 naming it
        self.require_reasoning = False  # DeepSeek thinking mode: tool-call turns need theirs
        self.serve_in_thread()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.server_address[1])

    def chat_requests(self):
        return [r for r in self.requests if r[0].endswith("/chat/completions")]

    def push(self, key, *actions):
        with self.lock:
            self.script.setdefault(key, []).extend(actions)


class FakeIFlowHandler(QuietHandler):
    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def reply(self, status, obj, headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("eagleeye-traceid", "trace-" + str(len(self.server.requests)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def business(self, code, msg):
        self.reply(200, {"status": str(code), "msg": msg, "body": None})

    def key(self):
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def check_headers(self, key):
        """None when the request is acceptable, else an (HTTP status, body) to answer."""
        if "text/event-stream" in (self.headers.get("Accept") or ""):
            return 406, {"status": "406", "msg": "Not Acceptable"}
        if key is None:
            return 401, {"error": {"message": "missing Authorization", "type": "auth"}}
        if not self.server.signing:
            return None
        ua, sid = self.headers.get("user-agent"), self.headers.get("session-id") or ""
        ts, sig = self.headers.get("x-iflow-timestamp") or "", self.headers.get("x-iflow-signature")
        if ua != "iFlow-Cli" or not re.match("^session-%s$" % UUID_RE, sid):
            return 406, {"status": "406", "msg": "bad client headers"}
        if not re.match("^%s$" % UUID_RE, self.headers.get("conversation-id") or ""):
            return 406, {"status": "406", "msg": "bad conversation-id"}
        if not ts.isdigit() or abs(int(ts) - time.time() * 1000) > 300000:
            return 406, {"status": "406", "msg": "bad timestamp"}
        expected = hmac.new(key.encode(), ("%s:%s:%s" % (ua, sid, ts)).encode(),
                            hashlib.sha256).hexdigest()
        if not sig or not hmac.compare_digest(sig, expected):
            return 406, {"status": "406", "msg": "signature mismatch"}
        return None

    def do_GET(self):
        key = self.key()
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), None, key))
        if self.server.models_hold is not None:  # a list that takes its time
            self.server.models_hold.wait(30)
        if self.path != "/v1/models" or not self.server.models_endpoint:
            return self.reply(404, {"error": {"message": "not found"}})
        problem = self.check_headers(key)
        if problem:
            return self.reply(*problem)
        self.reply(200, {"object": "list", "data": [  # (an entry may be a whole dict)
            m if isinstance(m, dict) else {"id": m, "object": "model"}
            for m in self.server.models]})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw)
        key = self.key()
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, dict(self.headers), body, key))
            action = srv.script.get(key, []).pop(0) if srv.script.get(key) else None
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "not found"}})
        problem = self.check_headers(key)
        if problem:
            return self.reply(*problem)
        if key not in srv.keys:
            return self.business(434, "Invalid apiKey")
        problem = self.deepseek_problem(body)
        if problem:
            return self.reply(400, {"error": {"message": problem, "type":
                                              "invalid_request_error", "code": "invalid_request"}})
        with srv.lock:
            busy = srv.inflight.get(key, 0) > 0
            if not busy:
                srv.inflight[key] = 1
        if busy:
            return self.business(449, "please limit to single concurrent usage")
        try:
            if srv.hold is not None:
                srv.hold.wait(10)
            self.answer(body, action)
        finally:
            with srv.lock:
                srv.inflight[key] = 0

    def deepseek_problem(self, body):
        """DeepSeek's own 400s (api-docs.deepseek.com): max_tokens out of range, and the
        reasoning of a thinking-mode tool-call turn not passed back."""
        srv = self.server
        asked = body.get("max_tokens") or body.get("max_completion_tokens")
        if srv.max_output and isinstance(asked, int) and asked > srv.max_output:
            return ("Invalid max_tokens value, the valid range of max_tokens is [1, %d]"
                    % srv.max_output)
        if srv.require_reasoning and any(m.get("role") == "assistant" and m.get("tool_calls")
                                         and not m.get("reasoning_content")
                                         for m in body["messages"]):
            return ("The `reasoning_content` in the thinking mode must be passed back to the "
                    "API.")
        return None

    def answer(self, body, action):
        srv = self.server
        if action is not None:
            kind, value = action
            if kind == "business":
                return self.business(value, "scripted business error %s" % value)
            if kind == "http":
                return self.reply(value, {"error": {"message": "scripted HTTP %s" % value}},
                                  {"Retry-After": "7"} if value == 429 else None)
            if kind == "network_error":
                return self.stream(body, network_error=True)
            if kind == "reply":  # (HTTP status, JSON body) as given
                return self.reply(*value)
            if kind == "network_error_json":  # a non-stream answer cut by a network error
                completion = self.completion(body)
                completion["choices"][0].update(finish_reason="network_error", message={
                    "role": "assistant", "content": ""})
                return self.reply(200, completion)
            if kind == "stall":  # answer only once the test sets this event
                value.wait(30)
                action = None
                return self.answer(body, None)
            if kind == "poison":  # the answer, then bytes it did not count (a buggy server)
                body_bytes = json.dumps(self.completion(body)).encode()
                fields, extra, as_chunks = value(len(body_bytes))  # and bytes after it
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                for name, field_value in fields:
                    self.send_header(name, str(field_value))
                self.end_headers()
                if as_chunks:  # the bytes come after the last chunk
                    body_bytes = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body_bytes), body_bytes)
                self.wfile.write(body_bytes + extra)
                self.close_connection = True  # what it sent past the answer ends it here
                return None
            if kind == "close":  # (what it counted in flight ends with the connection)
                with srv.lock:
                    srv.inflight[self.key()] = 0
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
        if body.get("model") not in [m["id"] if isinstance(m, dict) else m for m in srv.models] \
                or body.get("model") in srv.unavailable_models:
            return self.business(435, "Model not support")
        if body.get("stream") and not srv.json_for_stream:
            return self.stream(body)
        self.reply(200, self.completion(body))

    def content(self, body):
        if self.server.responder:
            return self.server.responder(body)
        last = body["messages"][-1].get("content")
        return {"content": "echo: %s" % (last if isinstance(last, str) else json.dumps(last))}

    def completion(self, body):
        out = dict(self.content(body))
        if out.get("reasoning_chunks"):
            out["reasoning"] = "".join(out["reasoning_chunks"])
        calls = {}
        for call in out.get("tool_call_chunks") or []:  # the same call, assembled
            entry = calls.setdefault(call.get("index", 0), {"id": call.get("id"), "type":
                                     "function", "function": {"name": "", "arguments": ""}})
            entry["function"]["name"] += call.get("function", {}).get("name", "")
            entry["function"]["arguments"] += call.get("function", {}).get("arguments", "")
        if calls:
            out["tool_calls"] = [calls[i] for i in sorted(calls)]
        message = {"role": "assistant", "content": out.get("content", "")}
        if out.get("reasoning"):
            message["reasoning_content"] = out["reasoning"]
        if out.get("tool_calls"):
            message["tool_calls"] = out["tool_calls"]
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": body["model"], "choices": [{"index": 0, "message": message,
                "finish_reason": out.get("finish_reason") or
                ("tool_calls" if out.get("tool_calls") else "stop")}],
                "usage": out.get("usage") or {"prompt_tokens": 11, "completion_tokens": 5,
                                              "total_tokens": 16}}

    def stream(self, body, network_error=False):
        srv = self.server
        out = self.content(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj):
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) \
                + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": body["model"]}
        size = out.get("chunk", 4)
        pieces = [out["content"][i:i + size] for i in range(0, len(out.get("content", "")), size)]
        deltas = [{"reasoning_content": r} for r in out.get("reasoning_chunks") or []]
        deltas += [{"content": p} for p in pieces]
        for call in out.get("tool_call_chunks") or []:
            deltas.append({"tool_calls": [call]})
        try:
            for i, delta in enumerate(deltas):
                if i == 0:
                    delta = dict(delta, role="assistant")
                send(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]))
                if i == 0 and srv.gate is not None and not srv.gate.wait(10):
                    srv.gate_timed_out = True
        except OSError:  # the proxy hung up on us
            with srv.lock:
                srv.aborted_streams += 1
            self.close_connection = True
            return
        if out.get("cut"):  # the body just ends: no finish_reason, no usage, no [DONE]
            pass
        elif network_error:
            send(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "network_error"}]))
        else:
            finish = out.get("finish_reason") or ("tool_calls" if out.get("tool_call_chunks")
                                                  else "stop")
            send(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
            send(dict(base, choices=[], usage=out.get("usage") or
                      {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}))
            if not srv.omit_done:
                send(b"[DONE]")
        self.end_chunked()


# ==================================================================================================
# Fixtures and helpers
# ==================================================================================================

@pytest.fixture
def fake():
    yield from serving(FakeIFlow())


class FakeClock:
    """An injectable monotonic clock for cooldowns: tests move time instead of sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "home")


def make_config(home, fake=None, env=None, **overrides):
    environment = {"IFLOW_API_BASE": fake.url + "/v1"} if fake else {}
    environment.update(env or {})
    config = ip.load_config(home, {"port": 0}, environment)
    return config.replace(**overrides)


@contextlib.contextmanager
def running(config, **kwargs):
    server = ip.start_server(config, **kwargs)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def post_json(server, path, body, headers=None):
    status, headers, data = request(server, "POST", path, body,
                                    dict({"Content-Type": "application/json"}, **(headers or {})))
    return status, headers, json.loads(data)


def sse_payloads(data):
    events = [e for e in data.decode().split("\n\n") if e.strip()]
    return [e.split("data: ", 1)[1] for e in events if "data: " in e]


def open_anthropic_stream(server, text):
    """A streamed /v1/messages request whose response is read as the test goes."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("POST", "/v1/messages", json.dumps({
        "model": "claude-sonnet-4", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": text}]}), {"Content-Type": "application/json"})
    return conn.getresponse()


def add_key_account(home, key, nickname=None, **settings):
    registry = ip.AccountRegistry(home)
    entry, _ = registry.upsert("key:" + ip.fingerprint(key), "api-key", {"api_key": key},
                               nickname=nickname, settings=settings)
    return entry


CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]}


def run_cli(*argv, stdin="", env=None, home=None):
    out, err = io.StringIO(), io.StringIO()
    args = (["--home", home] if home else []) + list(argv)
    code = ip.main(args, stdin=io.StringIO(stdin), stdout=out, stderr=err, env=env or {})
    return code, out.getvalue(), err.getvalue()


# ==================================================================================================
# The file itself: stdlib only, Python 3.8 syntax, importable without side effects
# ==================================================================================================

STDLIB_FALLBACK = set("""argparse base64 binascii calendar dataclasses email fnmatch getpass hashlib
hmac http ipaddress json logging os re secrets select signal socket socketserver ssl sys tempfile
threading time urllib uuid fcntl msvcrt traceback collections itertools functools math random
shutil subprocess webbrowser platform errno io contextlib queue string struct zlib textwrap
ctypes html
""".split())


def test_only_stdlib_imports_and_python38_syntax():
    source = open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read()
    tree = ast.parse(source, feature_version=(3, 8))
    stdlib = getattr(sys, "stdlib_module_names", STDLIB_FALLBACK)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported and imported <= set(stdlib), imported - set(stdlib)
    for banned in ("removeprefix(", "removesuffix(", "match ", ":= "):
        assert banned not in source or banned == "match " and not re.search(
            r"^\s*match \w+:", source, re.M), banned


def test_readme_documents_every_config_key_and_both_commands():
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    first_screen = "\n".join(readme.splitlines()[:15])
    assert "python iflow_proxy.py serve" in first_screen
    assert "python -m pytest -q" in first_screen
    rows = {}
    config_section = readme.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    for line in config_section.splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|[^|]*\|([^|]*)\|(.*)\|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    assert set(rows) == set(ip.SETTINGS), set(rows) ^ set(ip.SETTINGS)
    for key, setting in ip.SETTINGS.items():  # the one declaration: env and default agree
        env_cell, meaning = rows[key]
        assert (setting.env or "") == (re.findall(r"`([A-Z_]+)`", env_cell) or [""])[0], key
        default = setting.default
        if isinstance(default, bool):
            assert "`%s`" % json.dumps(default) in meaning, key
        elif isinstance(default, (int, float)) or isinstance(default, str) and default and \
                key != "oauth_client_secret":  # public, but no need to print it in the README
            assert str(default) in meaning, key
    for command in ip.build_parser()._subparsers._group_actions[0].choices:
        assert "`%s" % command in readme, command
    ci = open(os.path.join(HERE, ".ci", "run"), encoding="utf-8").read()
    assert "\npython -m pytest -q\n" in ci


def file_sections():
    """(title, first line) of each banner section of iflow_proxy.py, in file order."""
    lines = open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read().splitlines()
    return [(lines[i][2:].split(":")[0], i + 1) for i in range(1, len(lines) - 1)
            if lines[i - 1].startswith("# ====") and lines[i + 1].startswith("# ====")]


def test_sections_follow_the_data_path_and_only_look_up():
    """Read top to bottom, the file shows a request's path: no name is used by a section above
    the one that defines it, and the exchange sits between translation and the HTTP server."""
    source = open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read()
    sections = file_sections()
    assert [title for title, _ in sections] == [
        "Constants", "Errors", "Config", "Wire", "Storage", "Auth", "Upstream", "Routing",
        "Translation", "Responses API", "Web search", "Exchange", "HTTP server", "CLI"]

    def section_of(lineno):
        return sum(1 for _title, start in sections if start <= lineno) - 1

    tree = ast.parse(source)
    home = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            name = getattr(target, "name", None) or getattr(target, "id", None)
            if name:
                home.setdefault(name, section_of(node.lineno))
    upward = []
    for node in tree.body:
        here = section_of(node.lineno)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and \
                    home.get(sub.id, -1) > here:
                upward.append("line %d (%s) uses %s from %s" % (
                    sub.lineno, sections[here][0], sub.id, sections[home[sub.id]][0]))
    assert not upward, "\n".join(upward)


def test_the_wire_is_one_section_and_the_handler_stays_small():
    """HTTP/1.1 lives in the Wire section (the server half in ServerConnection, with one
    dispatch() hook); ProxyHandler keeps checks, endpoints and relays, in at most 400 lines."""
    tree = ast.parse(open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read())
    sections = file_sections()
    starts = dict(sections)
    wire = (starts["Wire"], starts["Storage"])
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name in ("ServerConnection", "UpstreamConnection", "UpstreamResponse",
                 "ConnectionPool", "ChunkedBody", "Headers"):
        assert wire[0] <= classes[name].lineno < wire[1], name
    for name in ("message_framing", "read_headers", "read_status"):
        node = next(n for n in tree.body if getattr(n, "name", None) == name)
        assert wire[0] <= node.lineno < wire[1], name
    handler = classes["ProxyHandler"]
    assert [b.id for b in handler.bases] == ["ServerConnection"]
    assert handler.end_lineno - handler.lineno + 1 <= 400
    wire_methods = {"parse_request", "read_body", "send_bytes", "start_stream", "handle"}
    assert not wire_methods & {n.name for n in handler.body if isinstance(n, ast.FunctionDef)}
    assert not any(n.name in ("ChunkedBody", "message_framing") for n in tree.body
                   if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and
                   not wire[0] <= n.lineno < wire[1])


def test_functions_stay_short():
    """Small named steps: no function over 60 lines but the argparse builder."""
    tree = ast.parse(open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read())
    long = ["%s (%d lines)" % (node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and node.end_lineno - node.lineno + 1 > 60 and node.name != "build_parser"]
    assert not long, long


def test_readme_provider_table_matches_the_presets():
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    presets = readme.split("## Providers", 1)[1].split("\n## ", 1)[0]
    for name, preset in ip.PROVIDERS.items():
        row = next(line for line in presets.splitlines() if line.startswith("| `%s` |" % name))
        for url in (preset.openai, preset.anthropic):
            assert ("`%s`" % url if url else "–") in row, (name, url)
        assert re.search(r"\| 20\d\d-\d\d-\d\d, ", row) and preset.doc in row, name  # checked
        for model, spec in (preset.models or {}).items():
            assert "`%s` (%s)" % (model, ip._tokens(spec.window)) in row, (name, model)
    assert "last checked" in readme and "2026-12-03" in readme
    prices = readme.split("## Models, limits and prices", 1)[1].split("\n## ", 1)[0]
    for name, table in ip.PROVIDER_PRICES.items():  # the price table: every model, its rates
        row = next(line for line in prices.splitlines() if line.startswith("| `%s` |" % name))
        for model, price in table.items():
            assert any(m.lower() == model for m in re.findall(r"`([^`]+)`", row)), (name, model)
            for rate in ("input", "output", "cache_read"):
                assert rate not in price or "%g" % price[rate] in row, (name, model, rate)


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", "import iflow_proxy, logging;"
                          "print(len(logging.getLogger('iflow_proxy').handlers))"],
                         cwd=HERE, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0" and out.stderr == ""


# ==================================================================================================
# Pure parts: signing, shaping, classification, config, proxies, models
# ==================================================================================================

def test_signature_matches_independent_hmac_vector():
    # Vector computed with `openssl dgst -sha256 -hmac`, not with this code.
    sig = ip.sign_request("sk-test-key-123", "iFlow-Cli",
                          "session-1f0c2d3e-0000-4000-8000-000000000001", 1763812345678)
    assert sig == "2c207cb09cbd1ab70962ca58750548f558f42632b9bed75d711ff9a8fa64d0d4"


def test_upstream_headers_signed_and_plain():
    config = ip.Config(home="/nonexistent", extra_headers={"x-client-type": "iflow-cli"})
    account = ip.Account(id="a", nickname="a", kind="api-key", api_key="sk-abc12345")
    sid, cid = ip.conversation_ids("a", "conv-1")
    assert ip.conversation_ids("a", "conv-1") == (sid, cid)       # stable per conversation
    assert ip.conversation_ids("b", "conv-1")[0] != sid           # per account
    assert ip.conversation_ids("a", "conv-2")[0] != sid           # per conversation
    assert re.match("^session-%s$" % UUID_RE, sid) and re.match("^%s$" % UUID_RE, cid)
    h = ip.upstream_headers(account, config, sid, cid, clock=lambda: 1763812345.678)
    assert h["x-iflow-timestamp"] == "1763812345678"
    assert h["x-iflow-signature"] == ip.sign_request("sk-abc12345", "iFlow-Cli", sid,
                                                     "1763812345678")
    assert h["user-agent"] == "iFlow-Cli" and h["x-client-type"] == "iflow-cli"
    assert not any(k.lower() == "accept" for k in h)
    plain = ip.upstream_headers(account.replace(signing=False), config, sid, cid)
    assert "x-iflow-signature" not in plain and "session-id" not in plain
    assert plain["Authorization"] == "Bearer sk-abc12345"


def test_shape_chat_body_like_the_cli():
    body = {"model": "x", "messages": [], "stream": True, "tools": [], "tool_choice": "auto",
            "custom_field": 1}
    out = ip.shape_chat_body(body, "glm-4.6")
    assert out["stream_options"] == {"include_usage": True}
    assert "tools" not in out and "tool_choice" not in out and out["custom_field"] == 1
    assert out["max_new_tokens"] == 32000 and body["tools"] == []  # input untouched
    assert "max_new_tokens" not in ip.shape_chat_body(dict(body, max_tokens=5), "glm-4.6")
    assert "max_new_tokens" not in ip.shape_chat_body(body, "glm-4.6", signing=False)
    on = ip.shape_chat_body({"model": "x", "messages": [], "reasoning_effort": "high"}, "glm-5")
    assert on["chat_template_kwargs"] == {"enable_thinking": True} and on["enable_thinking"]
    assert on["thinking"] == {"type": "enabled"} and "stream_options" not in on
    off = ip.shape_chat_body({"model": "x", "messages": [], "reasoning_effort": "none"}, "glm-4.7")
    assert off["chat_template_kwargs"] == {"enable_thinking": False}
    kept = ip.shape_chat_body({"model": "x", "messages": [], "chat_template_kwargs":
                               {"enable_thinking": False, "other": 1}}, "glm-4.6", thinking=True)
    assert kept["chat_template_kwargs"] == {"enable_thinking": False, "other": 1}
    kimi = ip.shape_chat_body({"model": "x", "messages": [], "tool_choice": "required"},
                              "kimi-k2.5", thinking=True)
    assert kimi["thinking"] == {"type": "enabled"} and kimi["tool_choice"] == "auto"


@pytest.mark.parametrize("model,on,expected", [
    ("glm-4.6", True, {"chat_template_kwargs": {"enable_thinking": True}}),
    ("glm-4.6", False, {}),
    ("deepseek-v3.2", True, {"thinking_mode": True, "reasoning": True}),
    ("kimi-k2-thinking", True, {"thinking_mode": True}),
    ("kimi-k2.5", False, {"thinking": {"type": "disabled"}}),
    ("minimax-m2", True, {"reasoning_split": True}),
    ("qwen3-coder-plus", True, {}),
])
def test_thinking_table(model, on, expected):
    assert ip.thinking_params(model, on) == expected


@pytest.mark.parametrize("status,body,kind,client_status", [
    (200, {"status": "449", "msg": "please limit to single concurrent usage", "body": None},
     "concurrency", 429),
    (200, {"error_code": 511, "msg": "too long"}, "context_length", 400),
    (200, {"status": "8211", "msg": "rate"}, "rate_limit", 429),
    (200, {"status": "439", "msg": "expired"}, "key_expired", 503),
    (200, {"status": "438", "msg": "Access to the current AK has been blocked"}, "key_blocked",
     503),
    (200, {"msg": "invalid apiKey"}, "key_blocked", 503),
    (200, {"status": "435", "msg": "Model not support"}, "model_unsupported", 404),
    (200, {"status": "514", "msg": "model error"}, "model_error", 502),
    (200, {"success": False, "code": "500", "message": "busy"}, "transient", 502),
    (200, {"id": "x", "object": "chat.completion"}, None, None),
    (406, {"status": "406", "msg": "Not Acceptable"}, "rejected", 502),
    (429, {"error": {"message": "slow down"}}, "rate_limit", 429),
    (401, {"error": {"message": "bad key"}}, "auth", 503),
    (503, "<html>bad gateway</html>", "transient", 502),
    (400, {"error": {"message": "bad field"}}, "bad_request", 400),
    (429, {"type": "error", "error": {"type": "invalid_request_error", "message": "slow"}},
     "rate_limit", 429),
    (529, {"error": {"type": "invalid_request_error", "message": "busy"}}, "transient", 502),
    (429, {"error": {"code": 400, "message": "too many tokens per minute"}}, "rate_limit",
     429),
    (200, {"error": {"code": 400, "message": "too many tokens in prompt"}}, "context_length",
     400),
])
def test_classify_answer(status, body, kind, client_status):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    if kind is None:  # a 200 without choices is malformed
        with pytest.raises(ip.UpstreamError) as e:
            ip.UpstreamAnswer(CannedResponse(status, raw), stream=False).open()
        assert e.value.kind == "malformed"
        return
    with pytest.raises(ip.UpstreamError) as e:
        ip.classify_answer(status, raw, trace_id="t1", retry_after=3)
    assert (e.value.kind, e.value.status, e.value.trace_id) == (kind, client_status, "t1")


def test_an_answer_that_is_not_utf8_is_malformed_an_error_still_read():
    """JSON is UTF-8: a 200 whose bytes are not was relayed as it came (a client's JSON parser
    fails on it); an error's text is still read, bad bytes replaced."""
    answer = json.dumps({"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi\u00e9"}}]}).encode()
    with pytest.raises(ip.UpstreamError, match="not UTF-8") as e:
        ip.UpstreamAnswer(CannedResponse(200, answer.replace(b"hi", b"h\xe9")),
                          stream=False).open()
    assert e.value.kind == "malformed"
    assert ip.UpstreamAnswer(CannedResponse(200, answer), stream=False).open().payload[
        "choices"][0]["message"]["content"] == "hi\u00e9"
    with pytest.raises(ip.UpstreamError) as e:
        ip.classify_answer(429, b'{"error": {"message": "slow \xff down"}}')
    assert e.value.kind == "rate_limit" and "slow \ufffd down" in e.value.message


def test_error_bodies_in_both_formats():
    err = ip.RateLimited("slow down", retry_after=5)
    assert ip.error_body(err) == {"error": {"message": "slow down", "type": "rate_limit_error",
                                            "param": None, "code": "rate_limited"}}
    assert ip.error_body(err, "anthropic") == {"type": "error", "error": {
        "type": "rate_limit_error", "message": "slow down"}}
    assert ip.error_body(ip.ProxyError("x", status=529), "anthropic")["error"]["type"] == \
        "overloaded_error"


class CannedResponse:
    """An upstream response from bytes, for the reader's socketless tests."""

    def __init__(self, status, raw, content_type="application/json", reads=None):
        self.status, self.trace_id, self.headers = status, "", {}
        self.content_type = content_type
        self._reads = list(reads if reads is not None else [raw])
        self.closed = False

    @property
    def is_event_stream(self):
        return "text/event-stream" in self.content_type

    def read1(self):
        return self._reads.pop(0) if self._reads else b""

    def read_all(self, limit=None):
        data = b"".join(self._reads)
        self._reads = []
        return data

    def close(self):
        self.closed = True


def stream_answer(*reads):
    """An opened UpstreamAnswer over an SSE body arriving in ``reads``."""
    return ip.UpstreamAnswer(CannedResponse(200, b"", "text/event-stream", reads)).open()


def test_mask_secret_never_shows_the_whole_key():
    assert ip.mask_secret("sk-abcdefghijklmnopqrstuvwxyz") == "sk-ab…yz"
    assert ip.mask_secret("short") == "s…" and ip.mask_secret("") == "(none)"


def test_event_splitter_and_completion_to_chunks():
    s = ip.EventSplitter()
    assert s.feed(b"data: {\"a\":1}\r\n\r\ndata: [DO") == [b"data: {\"a\":1}"]
    assert s.feed(b"NE]\n\n: comment\n\n") == [b"data: [DONE]", b": comment"]
    # a blank line split across reads, "\r\n" split across reads, and the rest at the end
    assert s.feed(b"data: 1\n") == [] and s.feed(b"\ndata: 2\r") == [b"data: 1"]
    assert s.feed(b"\n\r\ndata: 3") == [b"data: 2"] and s.rest() == b"data: 3"
    assert ip.event_data(b"event: x\ndata: a\ndata: b\n\n") == b"a\nb"
    assert ip.event_data(b'event: ping\ndata: {"type": "ping"}') == b'{"type": "ping"}'
    assert ip.event_data(b"event: x") is None and ip.event_data(b"event: x\nid: 1") is None
    assert ip.event_data(b"event: x\nid: 1\ndata: a") == b"a"
    assert ip.event_data(b": ping\n\n") is None
    chunks = ip.completion_to_chunks({"id": "c", "model": "m", "choices": [{"index": 0,
        "message": {"role": "assistant", "content": "hi", "tool_calls": [{"id": "t", "type":
        "function", "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason":
        "tool_calls"}], "usage": {"prompt_tokens": 1}})
    assert chunks[0]["choices"][0]["delta"]["content"] == "hi"
    assert chunks[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[2]["usage"] == {"prompt_tokens": 1} and chunks[2]["choices"] == []


def test_resolve_model_aliases():
    config = ip.Config(home="/x")
    assert ip.resolve_model("glm-4.7", config) == ("glm-4.7", "glm-4.6", None)
    assert ip.resolve_model("GLM-4.7(high)[1m]", config) == ("GLM-4.7", "glm-4.6", "high")
    assert ip.resolve_model("glm-4.6", config) == ("glm-4.6", None, None)
    always = config.replace(legacy_aliases={"iflow-default": "always"})
    assert ip.resolve_model("iflow-default", always) == ("qwen3-coder-plus", None, None)
    assert ip.resolve_model("glm-4.7", always) == ("glm-4.7", "glm-4.6", None)
    off = config.replace(legacy_aliases="off")
    assert ip.resolve_model("glm-4.7", off) == ("glm-4.7", None, None)
    user = config.replace(model_aliases={"fast": "qwen3-coder-plus",
                                                      "glm-4.7": "glm-5"})
    assert ip.resolve_model("fast", user) == ("qwen3-coder-plus", None, None)
    assert ip.resolve_model("glm-4.7", user) == ("glm-5", None, None)


def test_select_proxy_honours_env_and_no_proxy():
    env = {"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "internal.example,.corp,10.0.0.0/8"}
    assert ip.select_proxy("https://apis.iflow.cn/v1", "", env) == "http://proxy:3128"
    assert ip.select_proxy("https://api.internal.example/v1", "", env) is None
    assert ip.select_proxy("https://x.corp/v1", "", env) is None
    assert ip.select_proxy("https://10.1.2.3/v1", "", env) is None
    assert ip.select_proxy("http://apis.iflow.cn/v1", "", env) is None  # no HTTP_PROXY set
    assert ip.select_proxy("https://apis.iflow.cn/v1", "direct", env) is None
    assert ip.select_proxy("https://apis.iflow.cn/v1", "http://other:8080", {}) == \
        "http://other:8080"
    assert ip.select_proxy("http://127.0.0.1:9/v1", "", {"HTTP_PROXY": "http://p:1"}) is None
    assert ip.select_proxy("http://127.0.0.1:9/v1", "http://other:8080", {}) == \
        "http://other:8080"
    assert ip.select_proxy("https://a.b/v1", "", {"https_proxy": "p:1", "NO_PROXY": "*"}) is None


# --- config --------------------------------------------------------------------------------------

def write_config(home, data):
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "config.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def test_config_precedence_flags_env_file_defaults(home):
    assert ip.load_config(home, env={}).port == ip.DEFAULT_PORT
    write_config(home, {"port": 2000, "api_base": "http://file/v1", "api_keys": "a1234567,b1234567",
                        "_comment": "ignored"})
    c = ip.load_config(home, env={})
    assert (c.port, c.api_base, c.api_keys) == (2000, "http://file/v1", ("a1234567", "b1234567"))
    c = ip.load_config(home, env={"IFLOW_PROXY_PORT": "3000", "IFLOW_API_BASE": "http://env/v1/"})
    assert (c.port, c.api_base) == (3000, "http://env/v1")
    c = ip.load_config(home, {"port": 4000}, {"IFLOW_PROXY_PORT": "3000"})
    assert c.port == 4000
    c = ip.load_config(home, {"client_keys": ["flag-key"]}, {"IFLOW_PROXY_CLIENT_KEYS": "e1,e2"})
    assert [k.key for k in c.client_keys] == ["e1", "e2", "flag-key"]


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({"port": "eleven"}, "key 'port' must be an integer"),
    ({"port": True}, "key 'port' must be an integer"),
    ({"api_keys": [1]}, "key 'api_keys' must be a list of non-empty strings"),
    ({"api_base": "ftp://x"}, "http:// or https:// URL"),
    ({"legacy_aliases": "sometimes"}, "legacy_aliases"),
    ({"porrt": 1}, "unknown key 'porrt'"),
    ({"proxy": "socks5://x:1"}, "http:// proxy URL"),
    ('{"connect_timeout": Infinity}', "invalid JSON"),  # (Python's json would take them)
    ('{"connect_timeout": NaN}', "invalid JSON"),
    ('{"connect_timeout": 1e999}', "invalid JSON"),
    ({"proxy": "http://[x"}, "http:// proxy URL"),  # (urlsplit raises on these)
    ({"web_search": {"url": "http://[x"}}, "url must be"),
    ({"api_base": "http://host:99999/v1"}, "http:// or https:// URL"),
])
def test_bad_config_names_file_key_and_expectation(home, content, fragment):
    write_config(home, content)
    with pytest.raises(ip.ConfigError) as e:
        ip.load_config(home, env={})
    assert fragment in e.value.message and "config.json" in e.value.message


def test_bad_environment_variable(home):
    with pytest.raises(ip.ConfigError) as e:
        ip.load_config(home, env={"IFLOW_PROXY_PORT": "many"})
    assert "IFLOW_PROXY_PORT" in e.value.message


def test_cli_bad_config_is_one_line_exit_2(home):
    write_config(home, "{oops")
    code, out, err = run_cli("accounts", home=home)
    assert code == 2 and err.count("\n") == 1 and "config.json" in err and "Traceback" not in err


def test_records_are_frozen_values_whose_replace_converts_again():
    config = ip.Config(home="/x", client_keys=["ck-secret-0001"], management_key="mk-secret-42")
    assert config.client_keys[0].key == "ck-secret-0001"  # converted to ClientKey at creation
    again = config.replace(client_keys=["ck-secret-0002"], port=9)
    assert again.client_keys[0].key == "ck-secret-0002" and again.port == 9
    assert config.port == ip.SETTINGS["port"].default and again.home == "/x"
    assert config == ip.Config(home="/x", client_keys=["ck-secret-0001"],
                               management_key="mk-secret-42") and config != again
    with pytest.raises(AttributeError):
        config.port = 1
    with pytest.raises(AttributeError):
        del config.port
    # a dict default is each record's own; lists become tuples
    first, second = ip.Config(home="/a"), ip.Config(home="/b")
    assert first.model_aliases == second.model_aliases
    assert first.model_aliases is not second.model_aliases
    assert all(not isinstance(v, list) for v in vars(first).values())
    # secrets stay out of repr, the rest is there
    for record, secret in ((config, "ck-secret-0001"), (config, "mk-secret-42"),
                           (ip.Account(id="a", nickname="n", kind="api-key",
                                       api_key="sk-secret-777"), "sk-secret-777")):
        text = repr(record)
        assert secret not in text and ("id='a'" in text or "home='/x'" in text), text
    account = ip.Account(id="a", nickname="n", kind="api-key", api_key="k")
    assert hash(account) == hash(account.replace()) and account.replace(priority=3).priority == 3
    assert account.replace(priority=3) != account and account != ("a", "n")
    with pytest.raises(TypeError, match="no field colour"):
        ip.Account(id="a", nickname="n", kind="api-key", api_key="k", colour="red")
    with pytest.raises(TypeError, match="api_key"):
        ip.Account(id="a", nickname="n", kind="api-key")
    with pytest.raises(TypeError, match="no field"):
        account.replace(colour="red")


def test_fingerprint_is_sha256():
    expected = hashlib.sha256("sk-some-key".encode("utf-8")).hexdigest()[:12]
    assert ip.fingerprint("sk-some-key") == expected


def test_each_lazily_imported_module_has_one_import_site():
    tree = ast.parse(open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read())
    top = {id(node) for node in tree.body}
    sites = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module]
            for name in names:
                sites.setdefault(name, []).append(node.lineno)
    assert all(len(lines) == 1 for lines in sites.values()), sites


def test_only_public_apis_of_the_standard_library():
    """No private module or attribute of the standard library (their names start with an
    underscore): they change without notice between CPython versions."""
    tree = ast.parse(open(os.path.join(HERE, "iflow_proxy.py"), encoding="utf-8").read())
    modules = {"sys", "os", "logging", "threading", "socket", "io", "json", "re", "select",
               "http", "urllib", "hashlib", "hmac", "ssl", "time", "struct", "collections"}
    private = sorted({"%s.%s" % (node.value.id, node.attr) for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in modules and node.attr.startswith("_")
                      and node.attr not in ("_exit", "__stdout__", "__stderr__")})
    imported = sorted(a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                      for a in node.names if a.name.startswith("_"))
    strings = sorted(node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                     and node.value in ("_sha2", "_sha256", "_srcfile", "_register_atexit"))
    assert not private and not imported and not strings, (private, imported, strings)


# ==================================================================================================
# Storage: registry, permissions, atomic writes
# ==================================================================================================

def test_private_temporary_files_never_reuse_a_name_or_follow_a_link(tmp_path, monkeypatch):
    names = iter([b"\x01" * 6, b"\x01" * 6, b"\x02" * 6])
    monkeypatch.setattr(ip.os, "urandom", lambda n: next(names))
    taken = tmp_path / (".x.%s.tmp" % ("01" * 6))
    taken.symlink_to(tmp_path / "elsewhere")  # a name already there (here a link) is passed by
    fd, path = ip.create_private_file(str(tmp_path), ".x.%s.tmp")
    os.write(fd, b"data")
    os.close(fd)
    assert path == str(tmp_path / (".x.%s.tmp" % ("02" * 6)))
    assert not (tmp_path / "elsewhere").exists()
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_registry_files_are_private_and_identity_deduplicates(home):
    e1 = add_key_account(home, "sk-aaaaaaaaaaaa")
    e2 = add_key_account(home, "sk-bbbbbbbbbbbb")
    again = add_key_account(home, "sk-aaaaaaaaaaaa")
    registry = ip.AccountRegistry(home)
    data = registry.read()
    assert [e["nickname"] for e in data["accounts"]] == ["api-key", "api-key-2"]
    assert again["id"] == e1["id"] and data["default"] == e1["id"] and e2["id"] != e1["id"]
    if os.name == "posix":
        for path in (registry.path, registry.credential_path(e1), registry.credential_path(e2)):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        for d in (home, registry.auth_dir):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    creds = registry.read_credentials(e1)
    assert creds["type"] == "iflow" and creds["api_key"] == "sk-aaaaaaaaaaaa"
    assert not [f for f in os.listdir(registry.auth_dir) if f.endswith(".tmp")]


def test_failed_write_leaves_old_file(home, monkeypatch):
    path = os.path.join(home, "x.json")
    ip.atomic_write_json(path, {"v": 1})

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ip.os, "fsync", boom)
    with pytest.raises(OSError):
        ip.atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(home) == ["x.json"]


def test_registry_snapshot_rereads_only_after_change(home):
    now = [0.0]
    registry = ip.AccountRegistry(home, clock=lambda: now[0])
    assert registry.accounts() == ()
    add_key_account(home, "sk-cccccccccccc")
    assert registry.accounts() == ()      # cached for a second
    now[0] += 1.5
    assert [a.nickname for a in registry.accounts()] == ["api-key"]


@pytest.mark.parametrize("entry, fragment", [
    ({"kind": "weird"}, "kind"),
    ({"base_url": "http://[::1"}, "base_url"),  # (urlsplit raises on it: once a traceback)
    ({"base_url": "http://host:99999/v1"}, "base_url"),
    ({"models": [1, None]}, "models"),
    ({"excluded_models": [{}]}, "excluded_models"),
    ({"top": {"revision": "7"}}, "revision"),  # (a ValueError from use, rename and logout)
    ({"top": {"revision": [1]}}, "revision"),
    ({"top": {"default": {"n": 1}}}, "default"),
])
def test_corrupt_registry_is_a_clear_error(home, entry, fragment):
    os.makedirs(home)
    top, entry = entry.get("top", {}), {k: v for k, v in entry.items() if k != "top"}
    with open(os.path.join(home, "accounts.json"), "w") as f:
        json.dump(dict({"accounts": [dict({"id": "x", "nickname": "n", "kind": "api-key"},
                                          **entry)]}, **top), f)
    for command in ("accounts", "models", "use", "logout"):
        code, out, err = run_cli(*[command] + (["n", "--yes"] if command == "logout" else
                                               ["n"] if command == "use" else []), home=home)
        assert code == 2 and "accounts.json" in err and fragment in err, (command, err)
        assert "Traceback" not in err and err.count("\n") == 1


# ==================================================================================================
# The server over real sockets
# ==================================================================================================

def test_healthz_needs_no_key_and_reveals_nothing(home, fake):
    with running(make_config(home, fake, client_keys=("ck-secret-1",))) as server:
        status, _, data = request(server, "GET", "/healthz")
        assert status == 200 and json.loads(data) == {"status": "ok"}
        status, _, data = request(server, "GET", "/v1/models")
        assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"


def test_client_keys_bearer_and_x_api_key(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake, client_keys=("ck-secret-1", "ck-secret-2"))) as server:
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 401
        assert post_json(server, "/v1/chat/completions", CHAT,
                         {"Authorization": "Bearer wrong"})[0] == 401
        assert post_json(server, "/v1/chat/completions", CHAT,
                         {"Authorization": "Bearer ck-secret-2"})[0] == 200
        assert post_json(server, "/v1/chat/completions", CHAT, {"x-api-key": "ck-secret-1"})[0] \
            == 200


def test_refuses_public_bind_without_client_keys(home):
    with pytest.raises(ip.ConfigError) as e:
        ip.ProxyServer(make_config(home, host="0.0.0.0"))
    assert "client key" in e.value.message
    code, _, err = run_cli("serve", "--host", "0.0.0.0", "--port", "0", home=home)
    assert code == 2 and "refusing" in err


def test_non_stream_signed_and_session_stable(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        for _ in range(2):
            status, headers, body = post_json(server, "/v1/chat/completions",
                                              dict(CHAT, extra_field={"kept": True}))
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == "echo: hi"
            assert headers["x-request-id"].startswith("req_")
    reqs = fake.chat_requests()
    assert len(reqs) == 2
    for _path, headers, sent, _key in reqs:
        assert "Accept" not in headers or "event-stream" not in headers["Accept"]
        assert sent["extra_field"] == {"kept": True} and sent["max_new_tokens"] == 32000
    assert reqs[0][1]["session-id"] == reqs[1][1]["session-id"]    # same conversation
    assert reqs[0][1]["x-iflow-timestamp"] != "" and reqs[0][1]["x-iflow-signature"]


def conversation(i):
    return dict(CHAT, messages=[{"role": "user", "content": "conversation %d" % i}])


def test_pool_of_three_keys_round_robin(home, fake):
    config = make_config(home, fake, env={"IFLOW_API_KEYS": ",".join(KEYS)})
    with running(config) as server:
        for i in range(6):
            assert post_json(server, "/v1/chat/completions", conversation(i))[0] == 200
    assert [r[3] for r in fake.chat_requests()] == list(KEYS) * 2


def test_keepalive_pool_reuses_upstream_connection(home, fake, clock):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake), router_clock=clock) as server:
        for _ in range(5):
            assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        assert fake.connections == 1
        # The upstream closes the kept-alive socket: the next request reconnects transparently.
        # Closed without answering on a reused connection: sent once more on a fresh one (the
        # server never saw it), no failure, no cooldown.
        fake.push(KEYS[0], ("close", None))
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        assert fake.connections == 2 and not server.chat.router.recent_errors
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        fake.connections = 0
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        assert fake.connections == 0


def test_stream_chunks_arrive_before_upstream_finishes(home, fake):
    add_key_account(home, KEYS[0])
    fake.gate = threading.Event()
    fake.responder = lambda body: {"content": "streamed answer here"}
    with running(make_config(home, fake)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(dict(CHAT, stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        first = resp.read1(65536)  # arrives while upstream is still waiting on the gate
        assert b'"content": "stre"' in first or b'"content":"stre"' in first
        fake.gate.set()
        rest = resp.read()
        conn.close()
    assert not fake.gate_timed_out
    payloads = sse_payloads(first + rest)
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content", "")
                   for p in payloads[:-1] if json.loads(p)["choices"])
    assert text == "streamed answer here"
    sent = fake.chat_requests()[0][2]
    assert sent["stream_options"] == {"include_usage": True}


def test_stream_done_appended_and_json_answer_becomes_sse(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        fake.omit_done = True
        status, _, data = request(server, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        assert status == 200 and sse_payloads(data)[-1] == "[DONE]"
        assert sse_payloads(data).count("[DONE]") == 1
        fake.omit_done, fake.json_for_stream = False, True
        status, headers, data = request(server, "POST", "/v1/chat/completions",
                                        dict(CHAT, stream=True))
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        payloads = sse_payloads(data)
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[0])["choices"][0]["delta"]["content"] == "echo: hi"


def test_stream_network_error_becomes_error_event(home, fake):
    add_key_account(home, KEYS[0])
    fake.push(KEYS[0], ("network_error", None))
    with running(make_config(home, fake)) as server:
        status, _, data = request(server, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        assert status == 200
        payloads = sse_payloads(data)
        errors = [json.loads(p) for p in payloads if p != "[DONE]" and "error" in json.loads(p)]
        assert errors and "network_error" in errors[0]["error"]["message"]
        assert payloads[-1] == "[DONE]"
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200


def test_stream_request_business_error_fails_over_before_first_byte(home, fake):
    add_key_account(home, KEYS[0], nickname="one")
    add_key_account(home, KEYS[1], nickname="two")
    fake.push(KEYS[0], ("business", 449))
    with running(make_config(home, fake)) as server:
        status, _, data = request(server, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        assert status == 200 and sse_payloads(data)[-1] == "[DONE]"
        assert [r[3] for r in fake.chat_requests()] == [KEYS[0], KEYS[1]]
    # Both accounts busy upstream, and waiting for a cooldown off (cooldown_wait 0) -> a real
    # 429 with Retry-After, never a 449 passed through.
    fake.push(KEYS[0], ("business", 449))
    fake.push(KEYS[1], ("business", 449))
    with running(make_config(home, fake, cooldown_wait=0)) as server:
        status, headers, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert "glm-4.6" in body["error"]["message"] and "449" not in str(status)


def test_a_short_cooldown_is_waited_out_not_a_429(home, fake):
    """Issue 27 item 10: an upstream still counting an abandoned request answers 449 and the
    account cools 3 s; the next client used to get 429 at once although queue_timeout is
    120 s.  A request whose accounts all cool for less than cooldown_wait (5 s) waits for the
    first to free up, then goes upstream."""
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        fake.push(KEYS[0], ("business", 449))
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 429  # the one it hit
        account = server.chat.router.all_accounts()[0]
        assert server.chat.router.cooling_until(account, "glm-4.6")
        status, _h, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 200, body  # waited out the 3 s, then answered
        assert len(fake.chat_requests()) == 2


def test_business_and_http_errors_map_to_statuses(home, fake, clock):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake), router_clock=clock) as server:
        fake.push(KEYS[0], ("business", 511))
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        fake.push(KEYS[0], ("http", 429))
        status, headers, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 429 and headers["Retry-After"] == "7"
        clock.advance(8)
        fake.push(KEYS[0], ("business", 514))
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 502
        clock.advance(61)
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, model="nope-1"))
        assert status == 404 and body["error"]["code"] == "model_not_found"
        anth = post_json(server, "/v1/chat/completions", dict(CHAT, model="nope-1"),
                         {"anthropic-version": "2023-06-01"})
        assert anth[0] == 404 and anth[2]["type"] == "error"
        # None was retried, and the second nope-1 was answered from the 435 already seen.
        assert len(fake.chat_requests()) == 4


def test_dead_keys_leave_rotation(home, fake):
    add_key_account(home, KEYS[0], nickname="expired")
    add_key_account(home, "sk-not-a-valid-key", nickname="bogus")
    add_key_account(home, KEYS[2], nickname="good")
    fake.push(KEYS[0], ("business", 439))
    with running(make_config(home, fake)) as server:
        for _ in range(3):
            assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        status = {a.nickname: a.status for a in ip.AccountRegistry(home).load_accounts()}
        assert status == {"expired": "needs-login", "bogus": "disabled", "good": "ok"}
        server.chat.registry.invalidate()
        before = len(fake.chat_requests())
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        assert [r[3] for r in fake.chat_requests()[before:]] == [KEYS[2]]
    code, out, _ = run_cli("accounts", "--json", home=home)
    listed = {a["nickname"]: a for a in json.loads(out)}
    assert listed["bogus"]["status"] == "disabled" and "434" in listed["bogus"]["status_reason"]
    assert KEYS[0] not in out and "sk-not-a-valid-key" not in out


def test_legacy_alias_falls_back_once_and_flags_it(home, fake, clock):
    add_key_account(home, KEYS[0])
    fake.unavailable_models.add("glm-4.7")
    with running(make_config(home, fake), router_clock=clock) as server:
        status, headers, body = post_json(server, "/v1/chat/completions",
                                          dict(CHAT, model="glm-4.7"))
        assert status == 200 and headers["x-iflow-proxy-model"] == "glm-4.6"
        assert [r[2]["model"] for r in fake.chat_requests()] == ["glm-4.7", "glm-4.6"]
        # glm-4.7 now cools on this account: the next request goes straight to glm-4.6.
        status, headers, _ = post_json(server, "/v1/chat/completions", dict(CHAT, model="glm-4.7"))
        assert status == 200 and headers["x-iflow-proxy-model"] == "glm-4.6"
        assert fake.chat_requests()[-1][2]["model"] == "glm-4.6"
        fake.unavailable_models.clear()
        clock.advance(601)
        status, headers, _ = post_json(server, "/v1/chat/completions", dict(CHAT, model="glm-4.7"))
        assert status == 200 and "x-iflow-proxy-model" not in headers
    off = make_config(home, fake, legacy_aliases="off", model_aliases={"fast": "qwen3-coder-plus"})
    fake.unavailable_models.add("glm-4.7")
    with running(off) as server:
        assert post_json(server, "/v1/chat/completions", dict(CHAT, model="glm-4.7"))[0] == 404
        status, headers, body = post_json(server, "/v1/chat/completions", dict(CHAT, model="fast"))
        assert status == 200 and headers["x-iflow-proxy-model"] == "qwen3-coder-plus"


def test_nick_prefix_pins_account(home, fake):
    add_key_account(home, KEYS[0], nickname="home")
    add_key_account(home, KEYS[1], nickname="work")
    with running(make_config(home, fake)) as server:
        for _ in range(3):
            status, _, body = post_json(server, "/v1/chat/completions",
                                        dict(CHAT, model="work/glm-4.6"))
            assert status == 200
    assert [r[3] for r in fake.chat_requests()] == [KEYS[1]] * 3
    assert {r[2]["model"] for r in fake.chat_requests()} == {"glm-4.6"}


def test_unsigned_openai_compatible_account(home):
    plain = FakeIFlow(signing=False)
    try:
        add_key_account(home, KEYS[0], base_url=plain.url + "/v1", signing=False)
        with running(make_config(home)) as server:  # default api_base is never contacted
            assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        headers = plain.chat_requests()[0][1]
        assert "x-iflow-signature" not in headers and "session-id" not in headers
        assert "max_new_tokens" not in plain.chat_requests()[0][2]
    finally:
        plain.stop()


class FakeForwardProxy(socketserver.ThreadingTCPServer):
    """A minimal HTTP proxy: CONNECT tunnels and absolute-form requests, recording what it saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeForwardProxyHandler)
        self.seen = []  # (request line, Proxy-Authorization)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self):
        return "http://user:p%%40ss@127.0.0.1:%d" % self.server_address[1]


class FakeForwardProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().decode()
        headers = []
        while True:
            h = self.rfile.readline()
            if h in (b"\r\n", b""):
                break
            headers.append(h)
        auth = next((h.split(b":", 1)[1].strip().decode() for h in headers
                     if h.lower().startswith(b"proxy-authorization")), None)
        self.server.seen.append((line.strip(), auth))
        method, target, _ = line.split()
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = b""
        else:
            parts = urllib.parse.urlsplit(target)
            upstream = socket.create_connection((parts.hostname, parts.port))
            kept = [h for h in headers if not h.lower().startswith(b"proxy-")]
            first = ("%s %s HTTP/1.1\r\n" % (method, parts.path)).encode() + b"".join(kept) \
                + b"\r\n"
        self._pipe(upstream, first)

    def _pipe(self, upstream, first):
        upstream.sendall(first)

        def down():
            try:
                while True:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    self.connection.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=down, daemon=True)
        t.start()
        try:
            while True:
                data = self.rfile.read1(65536)  # buffered bytes first, then the socket
                if not data:
                    break
                upstream.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)
        t.join(10)
        upstream.close()


def test_outbound_proxy_absolute_form_for_http(home, fake):
    proxy = FakeForwardProxy()
    try:
        add_key_account(home, KEYS[0])
        with running(make_config(home, fake, proxy=proxy.url)) as server:
            assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        line, auth = proxy.seen[0]
        assert line == "POST %s/v1/chat/completions HTTP/1.1" % fake.url
        assert auth == "Basic " + base64.b64encode(b"user:p@ss").decode()
        assert len(fake.chat_requests()) == 1  # signature survived the hop
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_outbound_proxy_connect_tunnel_to_tls_upstream(home, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=120)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    secure, proxy = FakeIFlow(tls=tls), FakeForwardProxy()
    try:
        add_key_account(home, KEYS[0])
        config = make_config(home, secure, proxy=proxy.url, ca_file=cert)
        with running(config) as server:
            for _ in range(3):
                assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
        assert len(proxy.seen) == 1  # one tunnel, kept alive and reused
        assert proxy.seen[0][0].startswith("CONNECT 127.0.0.1:%d " % secure.server_address[1])
        assert proxy.seen[0][1].startswith("Basic ")
        # Without the CA the TLS failure is a clean, explained 502.
        with running(make_config(home, secure, proxy="direct")) as server:
            status, _, body = post_json(server, "/v1/chat/completions", CHAT)
            assert status == 502 and "ca_file" in body["error"]["message"]
    finally:
        proxy.shutdown()
        proxy.server_close()
        secure.stop()


def test_models_upstream_cached_with_aliases_and_builtin_fallback(home, fake):
    add_key_account(home, KEYS[0])
    fake.models = ["glm-4.6", "special-model"]
    config = make_config(home, fake, model_aliases={"fast": "glm-4.6"})
    with running(config) as server:
        for _ in range(2):
            status, _, data = request(server, "GET", "/v1/models")
            ids = [m["id"] for m in json.loads(data)["data"]]
            assert status == 200 and ids == ["glm-4.6", "special-model", "fast"]
        assert len([r for r in fake.requests if r[0] == "/v1/models"]) == 1
        status, _, data = request(server, "GET", "/v1/models",
                                  headers={"anthropic-version": "2023-06-01"})
        body = json.loads(data)
        assert body["data"][0]["type"] == "model" and body["has_more"] is False
    fake.models_endpoint = False
    with running(config) as server:
        ids = [m["id"] for m in json.loads(request(server, "GET", "/models")[2])["data"]]
        assert "qwen3-coder-plus" in ids and "fast" in ids


def test_no_account_gives_503_with_instructions(home, fake):
    with running(make_config(home, fake)) as server:
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 503 and "login" in body["error"]["message"]
        status, _, data = request(server, "GET", "/v1/models")
        assert status == 200 and json.loads(data)["data"]


def test_unreachable_upstream_is_a_clean_502(home):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    add_key_account(home, KEYS[0])
    with running(make_config(home, env={"IFLOW_API_BASE": "http://127.0.0.1:%d/v1" % port})) \
            as server:
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 502 and body["error"]["code"] == "upstream_unreachable"


def test_server_sees_accounts_added_by_cli_without_restart(home, fake):
    with running(make_config(home, fake)) as server:
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 503
        code, out, err = run_cli("login", "--api-key", "--nickname", "late", stdin=KEYS[0] + "\n",
                                 env={"IFLOW_API_BASE": fake.url + "/v1"}, home=home)
        assert code == 0, err
        wait_for(lambda: post_json(server, "/v1/chat/completions", CHAT)[0] == 200,
                 what="server to pick up the new account")
        run_cli("logout", "late", home=home)
        wait_for(lambda: post_json(server, "/v1/chat/completions", CHAT)[0] == 503,
                 what="server to drop the removed account")


BAD_REQUESTS = [
    ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1,2]", 400, "JSON object"),
    ("POST", "/v1/chat/completions", b"", 400, "empty"),
    ("POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"x"}]}', 400,
     "'model'"),
    ("POST", "/v1/chat/completions", b'{"model":"glm-4.6"}', 400, "'messages'"),
    ("POST", "/v1/chat/completions", b'{"model":"glm-4.6","messages":[]}', 400, "empty"),
    ("POST", "/v1/chat/completions", b'{"model":5,"messages":[{"role":"user"}]}', 400, "model"),
    ("POST", "/v1/chat/completions", b'{"model":"m","messages":["x"]}', 400, "messages[0]"),
    ("POST", "/v1/chat/completions", b'{"model":"m","messages":[{"role":"user"}],"stream":"yes"}',
     400, "'stream'"),
    ("POST", "/v1/chat/completions", b'{"model":"m","messages":[{"role":"user"}],"x":NaN}', 400,
     "NaN"),
    ("POST", "/v1/chat/completions", b"\xff\xfe{}", 400, "UTF-8"),
    ("POST", "/v1/chat/completions", b"[" * 100000, 400, "JSON"),
    ("GET", "/v1/chat/completions", None, 405, "POST"),
    ("DELETE", "/v1/models", None, 405, "GET"),
    ("GET", "/v2/nothing", None, 404, "/v2/nothing"),
]


@pytest.mark.parametrize("method,path,raw,status,fragment", BAD_REQUESTS)
def test_bad_requests_get_clear_4xx_and_server_keeps_serving(home, fake, method, path, raw,
                                                             status, fragment):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        got, headers, data = request(server, method, path, raw=raw,
                                     headers={"Content-Type": "application/json"})
        body = json.loads(data)
        assert got == status and fragment in body["error"]["message"], body
        assert body["error"]["type"]
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200
    assert len(fake.chat_requests()) == 1


def test_oversized_and_chunked_bodies(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake, max_body_bytes=1000)) as server:
        big = dict(CHAT, messages=[{"role": "user", "content": "x" * 2000}])
        status, _, body = post_json(server, "/v1/chat/completions", big)
        assert status == 413 and "max_body_bytes" in body["error"]["message"]
        # A chunked request body is accepted.
        with socket.create_connection(server.server_address) as s:
            payload = json.dumps(CHAT).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                      + b"%x\r\n%s\r\n" % (10, payload[:10])
                      + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload) - 10, payload[10:]))
            reply = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                reply += data
        assert reply.startswith(b"HTTP/1.1 200") and b"echo: hi" in reply
        # A malformed request line gets JSON, not HTML.
        with socket.create_connection(server.server_address) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 400") and b'"error"' in reply
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200


# ==================================================================================================
# CLI
# ==================================================================================================

def test_cli_login_api_key_verify_and_account_commands(home, fake):
    env = {"IFLOW_API_BASE": fake.url + "/v1"}
    code, out, err = run_cli("login", "--api-key", stdin=KEYS[0] + "\n", env=env, home=home)
    assert code == 0 and "added account api-key" in out and "verified" in out, err
    assert KEYS[0] not in out + err
    code, out, err = run_cli("login", "--api-key", "--nickname", "work", "--default",
                             stdin=KEYS[1], env=env, home=home)
    assert code == 0 and "work" in out and "the default" in out
    code, out, _ = run_cli("login", "--api-key", "--nickname", "renamed", stdin=KEYS[1], env=env,
                           home=home)
    assert code == 0 and "updated account renamed" in out
    code, out, _ = run_cli("accounts", "--json", home=home)
    listed = json.loads(out)
    assert [(a["nickname"], a["default"], a["kind"], a["status"]) for a in listed] == \
        [("api-key", False, "api-key", "ok"), ("renamed", True, "api-key", "ok")]
    assert all(set(a) >= {"nickname", "email", "kind", "default", "status"} for a in listed)
    assert KEYS[0] not in out and KEYS[1] not in out
    assert run_cli("use", "api-key", home=home)[0] == 0
    assert run_cli("rename", "api-key", "main", home=home)[0] == 0
    code, out, _ = run_cli("accounts", home=home)
    assert re.search(r"^\*\s+main\s", out, re.M) and "sk-ke…" in out and KEYS[0] not in out
    code, _, err = run_cli("rename", "main", "renamed", home=home)
    assert code == 2 and "already taken" in err
    code, _, err = run_cli("rename", "main", "bad/name", home=home)
    assert code == 2 and "nickname" in err
    code, _, err = run_cli("use", "ghost", home=home)
    assert code == 2 and "no account named 'ghost'" in err
    assert run_cli("logout", "renamed", home=home)[0] == 0
    code, _, err = run_cli("logout", "--all", home=home)
    assert code == 2 and "--yes" in err
    code, out, _ = run_cli("logout", "--all", "--yes", home=home)
    assert code == 0 and "main" in out
    assert os.listdir(os.path.join(home, "auth")) == []


@pytest.mark.parametrize("stdin,fragment", [("", "no key"), ("sk has spaces\n", "spaces"),
                                            ("abc\n", "too short"), ("sk-ключ-12345\n", "ASCII")])
def test_cli_login_rejects_bad_keys_on_stdin(home, stdin, fragment):
    code, out, err = run_cli("login", "--api-key", "--no-verify", stdin=stdin, home=home)
    assert code == 2 and fragment in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(home, "accounts.json"))


def test_cli_login_refuses_key_upstream_rejects(home, fake):
    env = {"IFLOW_API_BASE": fake.url + "/v1"}
    code, out, err = run_cli("login", "--api-key", stdin="sk-unknown-key-99\n", env=env, home=home)
    assert code == 1 and "not saved" in err and "sk-unknown-key-99" not in err
    assert not os.path.exists(os.path.join(home, "accounts.json"))
    code, out, err = run_cli("login", "--api-key", "--no-verify", stdin="sk-unknown-key-99\n",
                             env=env, home=home)
    assert code == 0


def test_cli_check_reports_each_account(home, fake):
    add_key_account(home, KEYS[0], nickname="good")
    add_key_account(home, "sk-blocked-key-1", nickname="blocked")
    fake.push(KEYS[0], ("business", 449))
    env = {"IFLOW_API_BASE": fake.url + "/v1"}
    code, out, err = run_cli("check", "good", env=env, home=home)
    assert code == 0 and "reachable   yes" in out and "key         accepted" in out
    code, out, err = run_cli("check", env=env, home=home)
    assert code == 1
    assert "blocked or invalid" in out and "signature   accepted" in out
    assert "sk-blocked-key-1" not in out
    code, out, _ = run_cli("check", env={"IFLOW_API_BASE": "http://127.0.0.1:1/v1"}, home=home)
    assert code == 1 and "reachable   NO" in out


def test_cli_usage_errors_are_one_line(home):
    code, out, err = run_cli("frobnicate", home=home)
    assert code == 2 and err.count("\n") == 1 and err.startswith("iflow_proxy: error:")
    code, out, err = run_cli("logout", home=home)
    assert code == 2 and "NICKNAME or --all" in err
    code, _, err = run_cli("login", "--api-key", "--cookie", home=home)
    assert code == 2 and "choose one of" in err
    for port in ("-1", "65536"):  # (an OverflowError from bind(): a traceback)
        code, _, err = run_cli("login", "--no-browser", "--callback-port", port, home=home)
        assert code == 2 and err.count("\n") == 1 and "between 0 and 65535" in err, err


def test_cli_version_and_serve_subprocess(home, fake):
    out = subprocess.run([sys.executable, "iflow_proxy.py", "--version"], cwd=HERE,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and ip.__version__ in out.stdout
    add_key_account(home, KEYS[0])
    env = dict(os.environ, IFLOW_API_BASE=fake.url + "/v1", IFLOW_PROXY_HOME=home)
    proc = subprocess.Popen([sys.executable, "iflow_proxy.py", "serve", "--port", "0"],
                            cwd=HERE, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for(lambda: proc.stderr.readline(), what="banner")
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        run_file = os.path.join(home, "run.json")  # `status` finds it whatever its port
        assert json.load(open(run_file))["pid"] == proc.pid
        assert stat.S_IMODE(os.stat(run_file).st_mode) == 0o600
        code, out, _ = run_cli("status", home=home, env={"IFLOW_PROXY_PORT": "1"})
        assert code == 0 and "at http://127.0.0.1:%d" % port in out
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(run_file)
    finally:
        proc.kill()
        proc.wait()


# ==================================================================================================
# Real client SDKs
# ==================================================================================================

def sdk(name):
    """Import a client SDK; skip without it locally, but fail in CI, where .ci/run installs it."""
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CI"):
            raise AssertionError("CI must install the %s SDK (.ci/run does)" % name)
        pytest.skip("pip install %s to run the SDK check" % name)


def test_openai_sdk_stream_and_non_stream(home, fake):
    openai = sdk("openai")
    add_key_account(home, KEYS[0])
    fake.responder = lambda body: {"content": "Hello from the fake iFlow",
                                   "reasoning_chunks": ["thinking..."]}
    with running(make_config(home, fake, client_keys=("ck-sdk-key",))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="ck-sdk-key", max_retries=0)
        reply = client.chat.completions.create(model="glm-4.6",
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello from the fake iFlow"
        assert reply.usage.total_tokens == 16
        stream = client.chat.completions.create(model="glm-4.6", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(parts) == "Hello from the fake iFlow"
        models = [m.id for m in client.models.list()]
        assert "glm-4.6" in models
        fake.push(KEYS[0], ("business", 511))
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="glm-4.6",
                                           messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "context_length_exceeded"
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# ==================================================================================================
# Anthropic Messages API and Claude Code
# ==================================================================================================

FIXTURES = os.path.join(HERE, "..", "shared", "fixtures")


def fixture(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        if os.environ.get("CI"):
            raise AssertionError("CI runs with shared/ beside the clone; %s is missing" % path)
        pytest.skip("recorded Claude Code requests are in ../shared/fixtures")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_sse(data):
    """[(event name, data dict)] of an Anthropic stream."""
    out = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        name = re.search(r"^event: (.*)$", block, re.M)
        payload = re.search(r"^data: (.*)$", block, re.M)
        out.append((name.group(1) if name else None, json.loads(payload.group(1))))
    return out


def check_anthropic_grammar(events):
    """Assert Anthropic's stream grammar; returns the content blocks rebuilt from the deltas."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start", names
    for name, data in events:
        assert data["type"] == name
    if names[-1] == "error":
        body = [n for n in names[:-1]]
        assert "message_stop" not in body
        names = body
    else:
        assert names[-2:] == ["message_delta", "message_stop"], names
    blocks, open_index = [], None
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None, "blocks overlap"
            assert data["index"] == len(blocks), "indexes must be consecutive"
            open_index = data["index"]
            blocks.append(dict(data["content_block"], _json=""))
        elif name == "content_block_delta":
            assert data["index"] == open_index
            delta, block = data["delta"], blocks[open_index]
            kind = {"text_delta": "text", "thinking_delta": "thinking",
                    "input_json_delta": "tool_use"}[delta["type"]]
            assert block["type"] == kind or (kind, block["type"]) == ("tool_use",
                                                                      "server_tool_use")
            if kind == "tool_use":
                block["_json"] += delta["partial_json"]
            else:
                block[kind] += delta[kind]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        elif name == "message_delta":
            assert open_index is None
    for block in blocks:
        if block["type"] in ("tool_use", "server_tool_use"):
            block["input"] = json.loads(block["_json"])
        del block["_json"]
    return blocks


# --- pure translation ------------------------------------------------------------------------

def test_map_claude_model_names():
    assert ip.map_claude_model("claude-opus-5-5", {}) == "glm-4.6"
    assert ip.map_claude_model("claude-sonnet-4-5-20250929[1m]", {}) == "glm-4.6"
    assert ip.map_claude_model("claude-3-5-haiku-latest", {}) == "qwen3-coder-plus"
    assert ip.map_claude_model("claude-haiku-4-5", {"haiku": "kimi-k2"}) == "kimi-k2"
    assert ip.map_claude_model("kimi-k2", {"sonnet": "x"}) == "kimi-k2"
    assert ip.map_claude_model("work/glm-4.6", {}) == "work/glm-4.6"


def test_golden_request_translation_turn1():
    recorded = fixture("claude-code-turn1.json")
    body = ip.validate_anthropic_request(recorded["body"])
    out = ip.anthropic_to_openai(body, "glm-4.6")
    thinking, effort = ip.anthropic_thinking(body)
    shaped = ip.shape_chat_body(out, "glm-4.6", True, thinking, effort)
    assert {k: v for k, v in shaped.items() if k not in ("messages", "tools")} == {
        "model": "glm-4.6", "stream": True, "max_tokens": 32000,   # 128000 clamped
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": True}}         # adaptive thinking -> on
    assert [t["function"]["name"] for t in shaped["tools"]] == [t["name"] for t in body["tools"]]
    assert shaped["tools"][4]["function"]["parameters"] == body["tools"][4]["input_schema"]
    roles = [m["role"] for m in shaped["messages"]]
    assert roles == ["system", "user"]   # one system message: the mid-conversation one ...
    system = shaped["messages"][0]["content"]
    assert system.startswith("You are a Claude agent") and "billing-header" not in system
    assert "cache_control" not in json.dumps(shaped)
    user = shaped["messages"][1]["content"]
    mid = body["messages"][1]["content"][0]["text"]
    assert user.startswith("<system-reminder>") and user.endswith(  # ... a reminder where it was
        "Read hello.txt and tell me what it says\n\n<system-reminder>\n%s\n</system-reminder>"
        % mid)
    assert ip.anthropic_conversation_key(body, {}) == "user:2710491c-742a-4d2f-85a7-4105efc6bd47"
    assert "output_config" not in shaped and "context_management" not in shaped
    assert "metadata" not in shaped and "thinking" not in shaped


def test_golden_request_translation_turn2_tool_result():
    body = ip.validate_anthropic_request(fixture("claude-code-turn2-tool-result.json")["body"])
    out = ip.anthropic_to_openai(body, "glm-4.6")
    assert out["messages"][-2:] == [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "toolu_01", "type": "function", "function": {
                "name": "Read", "arguments": '{"file_path": "/home/dev/project/hello.txt"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "1\thello from the file\n2\t"}]
    first = fixture("claude-code-turn1.json")["body"]
    assert ip.anthropic_conversation_key(body, {}) == ip.anthropic_conversation_key(first, {})


def test_conversation_key_from_the_first_messages():
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    key = ip.openai_conversation_key({"messages": plain}, {})
    later = plain + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    assert key.startswith("msg:") and ip.openai_conversation_key({"messages": later}, {}) == key
    other = [plain[0], {"role": "user", "content": "hi!"}]
    assert ip.openai_conversation_key({"messages": other}, {}) != key
    swapped = [{"role": "user", "content": "be brief"}, {"role": "system", "content": "hi"}]
    assert ip.openai_conversation_key({"messages": swapped}, {}) != key
    assert ip.openai_conversation_key({"messages": plain}, {"x-session-id": "s1"}) == "sid:s1"
    # anything but plain role-and-text messages: canonical JSON, so key order does not matter
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "a"}]
    reordered = [{"name": "a", "content": [{"text": "hi", "type": "text"}], "role": "user"}]
    assert ip.first_messages_key(blocks, 1) == ip.first_messages_key(reordered, 1) != \
        ip.first_messages_key([{"role": "user", "content": "hi"}], 1)
    lone = ip.first_messages_key([{"role": "user", "content": "\ud800"}], 1)  # JSON allows it
    assert lone != ip.first_messages_key([{"role": "user", "content": "\ud801"}], 1)
    assert ip.first_messages_key(None, 2) == ip.first_messages_key([], 2)


def test_golden_non_stream_response_for_turn2():
    completion = {"id": "c1", "object": "chat.completion", "model": "glm-4.6", "choices": [{
        "index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "The file says: hello from the file",
            "reasoning_content": "The tool returned the text."}}],
        "usage": {"prompt_tokens": 12000, "completion_tokens": 9,
                  "prompt_tokens_details": {"cached_tokens": 11000}}}
    message = ip.openai_to_anthropic(completion, "claude-opus-5-5")
    assert message["id"].startswith("msg_")
    assert {k: v for k, v in message.items() if k != "id"} == {
        "type": "message", "role": "assistant", "model": "claude-opus-5-5",
        "content": [{"type": "thinking", "thinking": "The tool returned the text.",
                     "signature": ""},
                    {"type": "text", "text": "The file says: hello from the file"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 1000, "output_tokens": 9, "cache_read_input_tokens": 11000}}


def test_golden_stream_events_for_turn1_tool_call():
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Need "}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "the file."}}]},
        {"choices": [{"index": 0, "delta": {"content": "Reading it."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_Read_1",
                     "type": "function", "function": {"name": "Read", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
            "arguments": '{"file_path": "/home/dev/'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
            "arguments": 'project/hello.txt"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 11830, "completion_tokens": 30}}]
    stream = ip.AnthropicStream("claude-opus-5-5", input_estimate=12156)
    data = stream.start() + b"".join(stream.feed(c) for c in chunks) + stream.finish()
    events = parse_sse(data)
    simplified = [(n, d.get("index"), (d.get("delta") or d.get("content_block") or {}))
                  for n, d in events[1:]]
    assert simplified == [
        ("content_block_start", 0, {"type": "thinking", "thinking": "", "signature": ""}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "Need "}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "the file."}),
        ("content_block_stop", 0, {}),
        ("content_block_start", 1, {"type": "text", "text": ""}),
        ("content_block_delta", 1, {"type": "text_delta", "text": "Reading it."}),
        ("content_block_stop", 1, {}),
        ("content_block_start", 2, {"type": "tool_use", "id": "call_Read_1", "name": "Read",
                                    "input": {}}),
        # a tool call goes out whole, once its arguments are complete JSON (never half a call)
        ("content_block_delta", 2, {"type": "input_json_delta",
                                    "partial_json": '{"file_path": "/home/dev/project/hello.txt"}'}),
        ("content_block_stop", 2, {}),
        ("message_delta", None, {"stop_reason": "tool_use", "stop_sequence": None}),
        ("message_stop", None, {})]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 12156, "output_tokens": 0}
    assert events[-2][1]["usage"] == {"input_tokens": 11830, "output_tokens": 30}
    blocks = check_anthropic_grammar(events)
    assert blocks[2]["input"] == {"file_path": "/home/dev/project/hello.txt"}


def test_request_translation_details():
    body = ip.validate_anthropic_request({
        "model": "claude-sonnet-4", "max_tokens": 500, "stop_sequences": ["END"],
        "temperature": 0.2, "top_k": 5, "system": "Be brief.",
        "tool_choice": {"type": "tool", "name": "Get", "disable_parallel_tool_use": True},
        "tools": [{"name": "Get", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}},
                {"type": "document", "title": "notes", "source": {"type": "text",
                                                                  "data": "doc text"}},
                {"type": "text", "text": "what is this?", "cache_control": {"type": "x"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_AbC", "name": "Get", "input": {"q": 1}},
                {"type": "tool_use", "id": "toolu_2", "name": "Get", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_AbC", "is_error": True,
                 "content": [{"type": "text", "text": "boom"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
                    {"type": "text", "text": "chart"},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                {"type": "text", "text": "and now?"}]}]})
    out = ip.anthropic_to_openai(body, "glm-4.6")
    assert "stop" not in out and "top_k" not in out and out["temperature"] == 0.2
    assert out["max_tokens"] == 500 and out["parallel_tool_calls"] is False
    assert out["tool_choice"] == {"type": "function", "function": {"name": "Get"}}
    assert [t["function"]["name"] for t in out["tools"]] == ["Get"]
    m = out["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert m[1]["content"][0] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}
    assert m[1]["content"][1]["text"] == "Document: notes\n\ndoc text"
    assert m[2]["reasoning_content"] == "hmm" and m[2]["content"] == "Let me check."
    assert [c["id"] for c in m[2]["tool_calls"]] == ["toolu_AbC", "toolu_2"]
    assert m[3] == {"role": "tool", "tool_call_id": "toolu_AbC", "content": "Error: boom"}
    assert m[4] == {"role": "tool", "tool_call_id": "toolu_2", "content": "chart"}
    assert m[5]["content"][1] == {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert m[5]["content"][-1] == {"type": "text", "text": "and now?"}
    for choice, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
        assert ip.translate_tool_choice({"type": choice}) == expected
    assert ip.anthropic_thinking({"thinking": {"type": "enabled", "budget_tokens": 0}}) == \
        (False, None)
    assert ip.anthropic_thinking({"thinking": {"type": "disabled"}}) == (False, None)
    with pytest.raises(ip.BadRequest) as e:
        ip.anthropic_to_openai({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": "JVBER"}}]}]}, "glm-4.6")
    assert "extract its text" in e.value.message


def test_stream_stop_sequences_and_tool_json_repair():
    stream = ip.AnthropicStream("m", stop_sequences=["STOP!"])
    data = stream.start()
    for piece in ["Hello wor", "ld ST", "OP! ignored", " more"]:
        data += stream.feed({"choices": [{"index": 0, "delta": {"content": piece}}]})
    assert stream.done
    data += stream.finish()
    events = parse_sse(data)
    blocks = check_anthropic_grammar(events)
    assert blocks == [{"type": "text", "text": "Hello world "}]
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP!"}
    message = ip.openai_to_anthropic({"choices": [{"message": {"content": "abc STOP! def"},
                                                   "finish_reason": "stop"}]}, "m", ["STOP!"])
    assert message["content"] == [{"type": "text", "text": "abc "}]
    assert message["stop_reason"] == "stop_sequence"
    # Invalid tool arguments in an answer that was not cut are upstream's fault: an error,
    # never a crash and never a "repaired" call (see test_cut_tool_call_is_never_complete).
    stream = ip.AnthropicStream("m")
    stream.start()
    with pytest.raises(ip.UpstreamError):
        stream.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "t1", "function": {
            "name": "Edit", "arguments": '{"a": }}'}}]}}]})
        stream.finish()
    assert ip.tool_input("", "t") == {} and ip.tool_input("", "t", cut=True) is None
    with pytest.raises(ip.UpstreamError):
        ip.openai_to_anthropic({"choices": [{"message": {"tool_calls": [{"id": "x", "function":
            {"name": "F", "arguments": "{\"k\": 1"}}]}, "finish_reason": "tool_calls"}]}, "m")


def test_token_estimate_matches_claude_tokenizer():
    """±15 % of a real tokenizer (Claude's, as published in anthropic-sdk-python 0.34)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        Tokenizer = None
    wheels = [f for f in os.listdir(os.path.join(HERE, ".cache", "anthropic-0.34.2"))
              if f.endswith(".whl")] if os.path.isdir(os.path.join(HERE, ".cache",
                                                                   "anthropic-0.34.2")) else []
    if Tokenizer is None or not wheels:
        if os.environ.get("CI"):
            raise AssertionError(".ci/run installs tokenizers and the anthropic 0.34.2 wheel")
        pytest.skip("needs `pip install tokenizers` and the anthropic 0.34.2 wheel in .cache")
    import zipfile
    with zipfile.ZipFile(os.path.join(HERE, ".cache", "anthropic-0.34.2", wheels[0])) as z:
        tokenizer = Tokenizer.from_str(z.read("anthropic/tokenizer.json").decode())
    import argparse as _argparse
    import http.server as _server
    samples = {
        "english": _server.__doc__ + _argparse.__doc__ + open(os.path.join(HERE, "LICENSE")).read(),
        "code": open(os.path.join(HERE, "iflow_proxy.py")).read()[:30000],
        "chinese": CHINESE_SAMPLE,
    }
    cjk_dir = os.path.join(os.path.dirname(os.__file__), "test", "cjkencodings")
    for name in ("gb2312-utf8.txt", "gbk-utf8.txt", "gb18030-utf8.txt"):  # where installed
        if os.path.exists(os.path.join(cjk_dir, name)):
            samples[name] = open(os.path.join(cjk_dir, name), encoding="utf-8").read()
    for name, text in samples.items():
        real = len(tokenizer.encode(text).ids)
        estimate = ip.estimate_tokens(text)
        assert abs(estimate / real - 1) <= 0.15, (name, estimate, real)


CHINESE_SAMPLE = (
    "心流是一个面向开发者的人工智能助手平台，提供多种大语言模型的接口服务。用户可以通过命令行工具登录账号，"
    "获取访问密钥，然后在自己的编辑器或者终端里调用模型完成编程、写作和数据分析等任务。为了保证服务稳定，"
    "平台对每个账号同时进行的请求数量做了限制，如果超过限制，就会返回错误代码，提示用户降低并发。"
    "本项目把这些接口包装成一个本地代理，只需要复制一个文件到服务器上，就可以让支持开放接口格式的客户端直接使用。"
    "代理会自动签名请求、轮换密钥、在账号之间切换，并且在出现限流或者密钥过期的时候给出清楚的提示。"
    "我们希望它足够小、足够快、足够安全，在没有网络包管理器的机器上也能运行。测试全部在本机完成，"
    "使用一个模拟的上游服务来检查签名、请求头和错误处理，确保每一种异常输入都得到明确的回答。") * 3


# --- over sockets ----------------------------------------------------------------------------

def claude_code_responder(work_dir=None):
    def respond(body):
        messages = body["messages"]
        if messages[-1]["role"] == "tool":
            return {"content": "The file says: " + messages[-1]["content"],
                    "reasoning_chunks": ["The tool ", "answered."]}
        asked = json.dumps([m.get("content") for m in messages if m["role"] == "user"])
        if body.get("tools") and "hello.txt" in asked:
            path = os.path.join(work_dir or "/tmp", "hello.txt")
            return {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_Read_01", "type": "function",
                 "function": {"name": "Read", "arguments": ""}},
                {"index": 0, "function": {"arguments": json.dumps({"file_path": path})[:10]}},
                {"index": 0, "function": {"arguments": json.dumps({"file_path": path})[10:]}}]}
        if "image_url" in asked:  # the proxy asking a vision model to describe an image
            return {"content": "a red square with the word HELLO"}
        return {"content": "Hi! How can I help?"}
    return respond


def test_messages_stream_over_http_with_prefix_and_beta(home, fake):
    add_key_account(home, KEYS[0])
    fake.responder = claude_code_responder()
    recorded = fixture("claude-code-turn2-tool-result.json")
    with running(make_config(home, fake)) as server:
        for path in ("/v1/messages?beta=true", "/api/provider/iflow/v1/messages?beta=true"):
            headers = {k: v for k, v in recorded["headers"].items()
                       if k.lower() not in ("host", "content-length", "accept-encoding")}
            status, resp_headers, data = request(server, "POST", path, recorded["body"], headers)
            assert status == 200, data
            events = parse_sse(data)
            blocks = check_anthropic_grammar(events)
            assert [b["type"] for b in blocks] == ["thinking", "text"]
            assert blocks[1]["text"] == "The file says: 1\thello from the file\n2\t"
            assert resp_headers["x-iflow-proxy-model"] == "glm-4.6"
    sent = [r[2] for r in fake.chat_requests()]
    assert all(s["max_tokens"] == 32000 and s["chat_template_kwargs"] == {"enable_thinking": True}
               for s in sent)
    sessions = {r[1]["session-id"] for r in fake.chat_requests()}
    assert len(sessions) == 1   # one upstream session for Claude Code's session


def test_messages_errors_are_anthropic_shaped(home, fake, clock):
    add_key_account(home, KEYS[0])
    headers = {"anthropic-version": "2023-06-01"}
    with running(make_config(home, fake, client_keys=("ck-1",)), router_clock=clock) as server:
        status, _, body = post_json(server, "/v1/messages", {"model": "claude-x"}, headers)
        assert status == 401 and body == {"type": "error", "error": {
            "type": "authentication_error", "message": body["error"]["message"]}}
        headers["x-api-key"] = "ck-1"
        for bad, fragment in (({"model": "claude-x"}, "'messages'"),
                              ({"model": "c", "messages": [{"role": "bot", "content": "x"}]},
                               "role"),
                              ({"model": "c", "max_tokens": 0, "messages": [
                                  {"role": "user", "content": "x"}]}, "max_tokens"),
                              ({"model": "c", "messages": [{"role": "user", "content": [
                                  {"type": "text"}]}]}, "text"),
                              ({"model": "c", "messages": [{"role": "user", "content": "x"}],
                                "tool_choice": {"type": "sometimes"}}, "tool_choice")):
            status, _, body = post_json(server, "/v1/messages", bad, headers)
            assert status == 400 and body["type"] == "error", body
            assert body["error"]["type"] == "invalid_request_error"
            assert fragment in body["error"]["message"]
        good = {"model": "claude-sonnet-4", "max_tokens": 10,
                "messages": [{"role": "user", "content": "x"}], "unknown_field": {"a": 1},
                "context_management": {"edits": []}, "output_config": {"effort": "low"}}
        fake.push(KEYS[0], ("http", 429))
        status, resp_headers, body = post_json(server, "/v1/messages", good, headers)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        assert resp_headers["Retry-After"] == "7"
        clock.advance(8)
        status, _, body = post_json(server, "/v1/messages", good, headers)
        assert status == 200 and body["content"] == [{"type": "text", "text": "echo: x"}]


def test_messages_mid_stream_failure_is_error_event(home, fake):
    add_key_account(home, KEYS[0])
    fake.push(KEYS[0], ("network_error", None))
    with running(make_config(home, fake)) as server:
        status, _, data = request(server, "POST", "/v1/messages", {
            "model": "claude-sonnet-4", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]})
        assert status == 200
        events = parse_sse(data)
        check_anthropic_grammar(events)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
        assert "network_error" in events[-1][1]["error"]["message"]


def test_messages_pings_while_upstream_is_silent(home, fake):
    add_key_account(home, KEYS[0])
    fake.gate = threading.Event()
    with running(make_config(home, fake, ping_interval=0.05)) as server:
        resp = open_anthropic_stream(server, "hello")
        received = b""
        while b"event: ping" not in received:  # upstream is held at the gate meanwhile
            chunk = resp.read1(65536)
            assert chunk, "stream ended without a ping"
            received += chunk
        fake.gate.set()
        received += resp.read()
        resp.close()
    events = parse_sse(received)
    assert ("ping", {"type": "ping"}) in events
    assert check_anthropic_grammar(events)[0]["text"] == "echo: hello"
    assert not fake.gate_timed_out


def test_images_described_for_text_models_or_rejected(home, fake):
    add_key_account(home, KEYS[0])
    fake.responder = claude_code_responder()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgoAAAANSUhEUg=="}}
    body = {"model": "claude-sonnet-4", "max_tokens": 50,
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]}
    with running(make_config(home, fake)) as server:
        for _ in range(2):
            status, _, reply = post_json(server, "/v1/messages", body)
            assert status == 200, reply
        vision = [r[2] for r in fake.chat_requests() if r[2]["model"] == "qwen3-vl-plus"]
        assert len(vision) == 1   # described once, then cached
        assert vision[0]["messages"][0]["content"][1]["type"] == "image_url"
        main = [r[2] for r in fake.chat_requests() if r[2]["model"] == "glm-4.6"]
        assert "a red square with the word HELLO" in main[-1]["messages"][0]["content"]
        assert "what?" in main[-1]["messages"][0]["content"]
        direct = dict(body, model="qwen3-vl-plus")
        assert post_json(server, "/v1/messages", direct)[0] == 200
        sent = fake.chat_requests()[-1][2]
        assert sent["messages"][0]["content"][0]["type"] == "image_url"
    with running(make_config(home, fake, describe_images=False)) as server:
        status, _, reply = post_json(server, "/v1/messages", body)
        assert status == 400 and "cannot see images" in reply["error"]["message"]


def test_count_tokens_endpoint_is_local(home, fake):
    recorded = fixture("claude-code-turn1.json")
    with running(make_config(home, fake)) as server:   # no account needed: nothing goes upstream
        status, _, body = post_json(server, "/v1/messages/count_tokens?beta=true",
                                    recorded["body"])
        assert status == 200 and set(body) == {"input_tokens"}
        assert 11830 * 0.85 <= body["input_tokens"] <= 11830 * 1.15  # Claude's tokenizer: 11830
        status, _, body = post_json(server, "/v1/messages/count_tokens", {"model": "x"},
                                    {"anthropic-version": "2023-06-01"})
        assert status == 400 and body["type"] == "error"
    assert fake.requests == []


def test_anthropic_sdk_stream_tools_thinking_images_count(home, fake):
    anthropic = sdk("anthropic")
    add_key_account(home, KEYS[0])
    fake.responder = claude_code_responder()
    with running(make_config(home, fake)) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
        tools = [{"name": "Read", "description": "Read a file", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}}}}]
        messages = [{"role": "user", "content": "Read hello.txt please"}]
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=1000, tools=tools,
                                    messages=messages, thinking={"type": "enabled",
                                                                 "budget_tokens": 1024}) as s:
            first = s.get_final_message()
        assert first.stop_reason == "tool_use"
        call = [b for b in first.content if b.type == "tool_use"][0]
        assert (call.id, call.name, call.input) == ("call_Read_01", "Read",
                                                    {"file_path": "/tmp/hello.txt"})
        messages += [{"role": "assistant", "content": first.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": "hello from the file"}]}]
        second = client.messages.create(model="claude-sonnet-4-6", max_tokens=1000, tools=tools,
                                        messages=messages, thinking={"type": "enabled",
                                                                     "budget_tokens": 1024})
        assert [b.type for b in second.content] == ["thinking", "text"]
        assert second.content[1].text == "The file says: hello from the file"
        assert second.stop_reason == "end_turn" and second.usage.output_tokens == 5
        sent = fake.chat_requests()[-1][2]
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_Read_01",
                                        "content": "hello from the file"}
        image = client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=[
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "text", "text": "describe it"}]}])
        assert image.content[0].text
        count = client.messages.count_tokens(model="claude-sonnet-4-6", messages=[
            {"role": "user", "content": "hello world, how are you today?"}])
        assert 5 <= count.input_tokens <= 20
        models = client.models.list()
        assert any(m.id == "glm-4.6" for m in models.data)
        fake.push(KEYS[0], ("business", 511))
        with pytest.raises(anthropic.BadRequestError):
            client.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                   messages=[{"role": "user", "content": "x"}])


# --- env and claude commands, and the real Claude Code ----------------------------------------

def test_env_command_for_each_shell(home):
    code, out, _ = run_cli("env", home=home)
    assert code == 0
    assert "export ANTHROPIC_BASE_URL='http://127.0.0.1:11450'" in out
    assert "export ANTHROPIC_DEFAULT_HAIKU_MODEL='qwen3-coder-plus'" in out
    for name in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
                 "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_SMALL_FAST_MODEL"):
        assert name in out
    if shutil.which("sh"):
        shown = subprocess.run(["sh", "-c", out + 'printf %s "$ANTHROPIC_MODEL"'],
                               capture_output=True, text=True, timeout=30).stdout
        assert shown == "glm-4.6"
    code, out, _ = run_cli("env", "--shell", "fish", "--model", "kimi-k2", home=home)
    assert "set -gx ANTHROPIC_MODEL 'kimi-k2'" in out
    code, out, _ = run_cli("env", "--shell", "powershell", home=home)
    assert "$env:ANTHROPIC_BASE_URL = 'http://127.0.0.1:11450'" in out
    write_config(home, {"client_keys": ["ck-very-secret-key"], "port": 9999})
    code, out, _ = run_cli("env", home=home)
    assert "ck-very-secret-key" not in out and "9999" in out
    code, out, _ = run_cli("env", "--reveal-key", home=home)
    assert "export ANTHROPIC_AUTH_TOKEN='ck-very-secret-key'" in out


def test_claude_command_runs_claude_against_the_proxy(home, fake, tmp_path):
    add_key_account(home, KEYS[0])
    script = tmp_path / "claude"
    script.write_text(
        "#!%s\nimport json, os, sys, urllib.request\n"
        "req = urllib.request.Request(os.environ['ANTHROPIC_BASE_URL'] + '/v1/messages',\n"
        "    data=json.dumps({'model': os.environ['ANTHROPIC_MODEL'], 'max_tokens': 20,\n"
        "    'messages': [{'role': 'user', 'content': ' '.join(sys.argv[1:])}]}).encode(),\n"
        "    headers={'Content-Type': 'application/json', 'Authorization': 'Bearer ' +\n"
        "             os.environ['ANTHROPIC_AUTH_TOKEN']})\n"
        "print(json.load(urllib.request.urlopen(req))['content'][0]['text'])\n"
        "print(os.environ['ANTHROPIC_DEFAULT_HAIKU_MODEL'])\n"
        "sys.exit(7)\n" % sys.executable)
    script.chmod(0o755)
    env = dict(os.environ, IFLOW_API_BASE=fake.url + "/v1", IFLOW_PROXY_HOME=home,
               IFLOW_PROXY_PORT="1")  # nothing runs on port 1: an in-process proxy starts
    out = subprocess.run([sys.executable, "iflow_proxy.py", "claude", "--model", "kimi-k2",
                          "--claude-bin", str(script), "-p", "hello", "--verbose"],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 7, out.stderr
    echo, haiku = out.stdout.splitlines()
    assert echo.startswith("echo: --settings {") and echo.endswith("} -p hello --verbose")
    rows = json.loads(echo[len("echo: --settings "):-len(" -p hello --verbose")])
    assert rows["modelPicker"]["options"] == [  # Claude Code knows them: see test_claude_code
        {"model": "kimi-k2", "behavesAs": "claude-sonnet-4-6", "label": "kimi-k2",
         "description": "kimi-k2 via iflow-proxy (128K window)"},
        {"model": "qwen3-coder-plus[1m]", "behavesAs": "claude-sonnet-4-6",
         "label": "qwen3-coder-plus", "description": "qwen3-coder-plus via iflow-proxy (256K "
         "window)"}]
    assert haiku == "qwen3-coder-plus[1m]"  # a window over 200K: the 1M one, compacted early
    assert fake.chat_requests()[0][2]["model"] == "kimi-k2"
    missing = subprocess.run([sys.executable, "iflow_proxy.py", "claude", "--claude-bin",
                              str(tmp_path / "nope")], cwd=HERE, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "npm install -g @anthropic-ai/claude-code" in \
        missing.stderr


def find_claude_code():
    for candidate in (os.environ.get("IFLOW_PROXY_TEST_CLAUDE_BIN"),
                      os.path.join(HERE, ".cache", "claude-code", "node_modules", ".bin",
                                   "claude"),
                      shutil.which("claude")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def claude_code_project(tmp_path):
    """(claude executable, a project folder holding hello.txt); skips without Claude Code."""
    claude = find_claude_code()
    if claude is None:
        pytest.skip("Claude Code is not installed (.ci/run installs it with npm into .cache)")
    work = tmp_path / "project"
    work.mkdir()
    (work / "hello.txt").write_text("hello from the file\n")
    return claude, work


def run_claude_code(claude, server, work, tmp_path):
    """The real Claude Code, asked to read hello.txt through the proxy."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"),
           "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "sk-test",
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    return subprocess.run([claude, "-p", "Read hello.txt and tell me what it says",
                           "--allowedTools", "Read"], cwd=str(work), env=env,
                          capture_output=True, text=True, timeout=240)


def test_real_claude_code_completes_a_tool_task(home, fake, tmp_path):
    claude, work = claude_code_project(tmp_path)
    add_key_account(home, KEYS[0])
    fake.responder = claude_code_responder(str(work))
    with running(make_config(home, fake)) as server:
        out = run_claude_code(claude, server, work, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hello from the file" in out.stdout
    sent = [r[2] for r in fake.chat_requests()]
    assert any(m["role"] == "tool" and "hello from the file" in m["content"]
               for s in sent for m in s["messages"])


# ==================================================================================================
# Routing, resilience, usage, status
# ==================================================================================================

def in_thread(fn, *args):
    """Run fn(*args) in a thread; returns (thread, result list)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


def content_of(upstream_request):
    return upstream_request[2]["messages"][-1]["content"]


def test_one_request_per_account_fifo_queue_and_timeout(home, fake):
    add_key_account(home, KEYS[0])
    fake.hold = threading.Event()
    with running(make_config(home, fake, queue_timeout=30)) as server:
        first = in_thread(post_json, server, "/v1/chat/completions", conversation(1))
        wait_for(lambda: len(fake.chat_requests()) == 1, what="first request upstream")
        second = in_thread(post_json, server, "/v1/chat/completions", conversation(2))
        wait_for(lambda: server.chat.router.waiting() == 1, what="second request queued")
        third = in_thread(post_json, server, "/v1/chat/completions", conversation(3))
        wait_for(lambda: server.chat.router.waiting() == 2, what="third request queued")
        assert len(fake.chat_requests()) == 1     # nothing sent while the account is busy
        fake.hold.set()
        for thread, result in (first, second, third):
            thread.join(30)
            assert result[0][0] == 200
        assert [content_of(r) for r in fake.chat_requests()] == \
            ["conversation 1", "conversation 2", "conversation 3"]   # first come, first served
    fake.hold = threading.Event()
    with running(make_config(home, fake, queue_timeout=0.2)) as server:
        first = in_thread(post_json, server, "/v1/chat/completions", conversation(1))
        wait_for(lambda: server.chat.router.in_flight(server.chat.router.all_accounts()[0]) == 1,
                 what="account busy")
        status, headers, body = post_json(server, "/v1/chat/completions", conversation(2))
        assert status == 429 and headers["Retry-After"] and "queue_timeout" in \
            body["error"]["message"]
        fake.hold.set()
        first[0].join(30)


def test_client_that_disconnects_while_queued_leaves_the_queue(home, fake):
    add_key_account(home, KEYS[0])
    fake.hold = threading.Event()
    with running(make_config(home, fake)) as server:
        first = in_thread(post_json, server, "/v1/chat/completions", conversation(1))
        wait_for(lambda: len(fake.chat_requests()) == 1, what="first request upstream")
        sock = socket.create_connection(server.server_address)
        payload = json.dumps(conversation(2)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        wait_for(lambda: server.chat.router.waiting() == 1, what="queued")
        sock.close()
        wait_for(lambda: server.chat.router.waiting() == 0, what="the queue to drop the gone client")
        fake.hold.set()
        first[0].join(30)
        wait_for(lambda: not any(fake.inflight.values()), what="the fake done with it")
        assert post_json(server, "/v1/chat/completions", conversation(3))[0] == 200
    assert [content_of(r) for r in fake.chat_requests()] == ["conversation 1", "conversation 3"]


def test_strategies_priority_and_affinity(home, fake):
    for key, nick in zip(KEYS, ("a", "b", "c")):
        add_key_account(home, key, nickname=nick)
    ip.AccountRegistry(home).set_default("b")
    with running(make_config(home, fake, strategy="fill-first")) as server:
        for i in range(4):
            assert post_json(server, "/v1/chat/completions", conversation(i))[0] == 200
        assert [r[3] for r in fake.chat_requests()] == [KEYS[1]] * 4   # the default, filled
        fake.hold = threading.Event()
        busy = in_thread(post_json, server, "/v1/chat/completions", conversation(10))
        wait_for(lambda: len(fake.chat_requests()) == 5, what="default busy")
        other = in_thread(post_json, server, "/v1/chat/completions", conversation(11))
        wait_for(lambda: len(fake.chat_requests()) == 6, what="spill to the next account")
        assert fake.chat_requests()[-1][3] == KEYS[0]
        fake.hold.set()
        busy[0].join(30), other[0].join(30)
        wait_for(lambda: not any(fake.inflight.values()), what="the fake done with them")
    fake.requests.clear()
    fake.hold = None
    with running(make_config(home, fake)) as server:   # round-robin with affinity
        for i in range(3):
            assert post_json(server, "/v1/chat/completions", conversation(i))[0] == 200
        assert [r[3] for r in fake.chat_requests()] == list(KEYS)
        for _ in range(3):   # the same conversation keeps its account (and upstream session)
            assert post_json(server, "/v1/chat/completions", conversation(1))[0] == 200
        assert [r[3] for r in fake.chat_requests()[3:]] == [KEYS[1]] * 3
        assert len({r[1]["session-id"] for r in fake.chat_requests()[3:]}) == 1
        body = {"model": "claude-sonnet-4", "max_tokens": 10, "metadata": {"user_id": "u-42"},
                "messages": [{"role": "user", "content": "turn 1"}]}
        post_json(server, "/v1/messages", body)
        body["messages"] += [{"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "turn 2"}]
        post_json(server, "/v1/messages", body)
        assert fake.chat_requests()[-1][3] == fake.chat_requests()[-2][3]
    registry = ip.AccountRegistry(home)
    with registry.edit(registry.read()["accounts"][2]["id"]) as change:
        change.update(priority=5)
    fake.requests.clear()
    with running(make_config(home, fake, strategy="least-busy")) as server:
        for i in range(3):
            assert post_json(server, "/v1/chat/completions", conversation(i))[0] == 200
        assert [r[3] for r in fake.chat_requests()] == [KEYS[2]] * 3   # highest priority first


def test_failover_before_first_byte_and_cooldowns_with_clock(home, fake, clock):
    add_key_account(home, KEYS[0], nickname="a")
    add_key_account(home, KEYS[1], nickname="b")
    with running(make_config(home, fake), router_clock=clock) as server:
        fake.push(KEYS[0], ("http", 429))      # Retry-After: 7
        status, _, _ = post_json(server, "/v1/chat/completions", conversation(1))
        assert status == 200 and [r[3] for r in fake.chat_requests()] == [KEYS[0], KEYS[1]]
        for i in range(3):   # a is skipped while it cools
            assert post_json(server, "/v1/chat/completions", conversation(10 + i))[0] == 200
        assert [r[3] for r in fake.chat_requests()[2:]] == [KEYS[1]] * 3
        clock.advance(7.5)  # a's Retry-After has passed: it is back in rotation
        for i in range(2):
            assert post_json(server, "/v1/chat/completions", conversation(20 + i))[0] == 200
        assert sorted(r[3] for r in fake.chat_requests()[-2:]) == [KEYS[0], KEYS[1]]
        # 8211 without Retry-After backs off 1 s, 2 s, 4 s ...; success resets it.
        a = server.chat.router.all_accounts()[0]
        for expected in (1, 2, 4):
            fake.push(KEYS[0], ("business", 8211))
            status, _, _ = post_json(server, "/v1/chat/completions", dict(CHAT, model="a/glm-4.6"))
            assert status == 429
            assert server.chat.router.cooling_until(a, "glm-4.6") - clock() == expected
            clock.advance(expected)
        assert post_json(server, "/v1/chat/completions", dict(CHAT, model="a/glm-4.6"))[0] == 200
        fake.push(KEYS[0], ("business", 8211))
        post_json(server, "/v1/chat/completions", dict(CHAT, model="a/glm-4.6"))
        assert server.chat.router.cooling_until(a, "glm-4.6") - clock() == 1
        clock.advance(1)
        # 5xx cools the pair 60 s; 449 cools the account a few seconds.
        fake.push(KEYS[0], ("http", 503))
        assert post_json(server, "/v1/chat/completions", dict(CHAT, model="a/glm-4.6"))[0] == 502
        assert server.chat.router.cooling_until(a, "glm-4.6") - clock() == 60
        assert not server.chat.router.cooling_until(a, "kimi-k2")
        clock.advance(60)
        fake.push(KEYS[0], ("business", 449))
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, model="a/kimi-k2"))
        assert status == 429 and server.chat.router.cooling_until(a, "qwen3-max") - clock() == 3


def test_all_cooling_gives_429_with_retry_after_in_both_formats(home, fake, clock):
    add_key_account(home, KEYS[0])
    add_key_account(home, KEYS[1])
    with running(make_config(home, fake), router_clock=clock) as server:
        fake.push(KEYS[0], ("http", 503))
        fake.push(KEYS[1], ("http", 503))
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 502  # the real failure
        clock.advance(20)
        before = len(fake.chat_requests())
        status, headers, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 429 and headers["Retry-After"] == "40"
        assert "glm-4.6" in body["error"]["message"] and "40s" in body["error"]["message"]
        assert body["error"]["type"] == "rate_limit_error"
        status, headers, body = post_json(server, "/v1/messages", {
            "model": "glm-4.6", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        assert status == 429 and headers["Retry-After"] == "40"
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        assert len(fake.chat_requests()) == before    # answered without calling upstream
        clock.advance(41)
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200


def test_upstream_timeout_fails_over(home, fake):
    add_key_account(home, KEYS[0])
    add_key_account(home, KEYS[1])
    release = threading.Event()
    fake.push(KEYS[0], ("stall", release))
    try:
        with running(make_config(home, fake, first_byte_timeout=0.3)) as server:
            status, headers, body = post_json(server, "/v1/chat/completions", CHAT)
            assert status == 200
            assert [r[3] for r in fake.chat_requests()] == [KEYS[0], KEYS[1]]
            assert server.chat.router.recent_errors[-1]["kind"] == "timeout"
    finally:
        release.set()


def test_usage_status_and_dashboard(home, fake, tmp_path):
    add_key_account(home, KEYS[0], nickname="work")
    add_key_account(home, KEYS[1], nickname="home")
    log_stream = io.StringIO()
    config = make_config(home, fake, client_keys=("ck-status-key",))
    headers = {"x-api-key": "ck-status-key"}
    with running(config) as server:
        ip.setup_logging(config, stream=log_stream)
        for i in range(3):
            status, resp_headers, _ = post_json(server, "/v1/chat/completions", conversation(i),
                                                headers)
            assert status == 200
        fake.push(KEYS[1], ("http", 429))
        post_json(server, "/v1/chat/completions", conversation(7), headers)
        status, _, data = request(server, "GET", "/status")
        assert status == 401
        status, _, data = request(server, "GET", "/status", headers=headers)
        info = json.loads(data)
        assert status == 200 and info["version"] == ip.__version__ and info["listen"] == server.url
        by_nick = {a["nickname"]: a for a in info["accounts"]}
        assert by_nick["work"]["default"] and by_nick["work"]["state"] == "healthy"
        assert by_nick["home"]["state"] == "cooling" and by_nick["home"]["cooldowns"]
        assert info["usage"]["today"]["sum"]["requests"] == 5
        assert info["usage"]["today"]["sum"]["failures"] == {"429": 1}
        assert info["usage"]["today"]["sum"]["input_tokens"] == 44
        assert info["recent_errors"][0]["upstream_status"] == 429
        for secret in KEYS[:2] + ("ck-status-key",):
            assert secret not in data.decode()
        status, page_headers, page = request(server, "GET", "/")
        assert status == 200 and page_headers["Content-Type"].startswith("text/html")
        assert b"ck-status-key" not in page and b"<script>" in page
        line = [l for l in log_stream.getvalue().splitlines() if resp_headers["x-request-id"] in l]
        assert line and "openai POST /v1/chat/completions" in line[0]
        assert "model=glm-4.6" in line[0] and "account=" in line[0] and "status=200" in line[0]
        assert "attempts=1" in line[0] and "first_byte=" in line[0] and "tokens=11/5" in line[0]
        assert re.search(r" client=\S+", line[0]) and "ck-status-key" not in line[0]
        # `status` from the running server ...
        env = {"IFLOW_PROXY_PORT": str(server.server_address[1]),
               "IFLOW_PROXY_CLIENT_KEYS": "ck-status-key"}
        code, out, err = run_cli("status", env=env, home=home)
        assert code == 0 and "at %s" % server.url in out and "cooling" in out
        assert "today: 5 requests, 1 failures" in out and KEYS[0] not in out
    # ... and from files once it stopped: usage.json survived.
    code, out, _ = run_cli("status", env={"IFLOW_PROXY_PORT": "1"}, home=home)
    assert code == 0 and "not running" in out and "today: 5 requests, 1 failures" in out
    assert stat.S_IMODE(os.stat(os.path.join(home, "usage.json")).st_mode) == 0o600
    with running(make_config(home, fake)) as server:
        assert server.chat.status(server.url)["usage"]["total"]["sum"]["requests"] == 5


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_dashboard_renders_in_headless_chromium(home, fake, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    add_key_account(home, KEYS[0], nickname="work")
    add_key_account(home, KEYS[1], nickname="home")
    with running(make_config(home, fake, client_keys=("ck-dash",))) as server:
        post_json(server, "/v1/chat/completions", CHAT, {"x-api-key": "ck-dash"})
        fake.push(KEYS[1], ("http", 429))
        post_json(server, "/v1/chat/completions", conversation(5), {"x-api-key": "ck-dash"})
        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--user-data-dir=" + str(tmp_path / "profile"),
                "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000"]
        url = server.url + "/#key=ck-dash"
        shot = tmp_path / "dashboard.png"
        run = subprocess.run(args + ["--window-size=412,915", "--screenshot=" + str(shot), url],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and shot.stat().st_size > 5000
        dom = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True,
                             timeout=120)
        console = [l for l in dom.stderr.splitlines() + run.stderr.splitlines()
                   if ":CONSOLE" in l]
        assert console == []
        accounts = dom.stdout[dom.stdout.index('id="accounts"'):dom.stdout.index('id="addform"')]
        assert "work (default)" in accounts and "home" in accounts
        assert 'badge healthy' in accounts and 'badge cooling' in accounts
        assert "ck-dash" not in dom.stdout and KEYS[0] not in dom.stdout
        # Without the key the page asks for it instead of showing anything.
        locked = subprocess.run(args + ["--dump-dom", server.url + "/"], capture_output=True,
                                text=True, timeout=120)
        assert "client key required" in locked.stdout and "work (default)" not in locked.stdout
        if os.environ.get("IFLOW_PROXY_KEEP_SCREENSHOT"):
            shutil.copy(str(shot), os.environ["IFLOW_PROXY_KEEP_SCREENSHOT"])


# ==================================================================================================
# Login flows and the credential lifecycle, against a fake iFlow OAuth + platform server
# ==================================================================================================

class FakeOAuth(FakeServer):
    """iflow.cn's OAuth endpoints, user info, a device endpoint, and the platform key API.

    Tokens rotate on refresh (the old refresh token stops working) and every token's user info
    yields a new apiKey, which is added to the fake upstream's accepted keys.
    """

    def __init__(self, upstream=None, expires_in=3600):
        super().__init__(("127.0.0.1", 0), FakeOAuthHandler)
        self.upstream, self.expires_in = upstream, expires_in
        self.lock = threading.Lock()
        self.codes = {}            # code -> (redirect, challenge)
        self.access = {}           # access token -> apiKey
        self.refresh_valid = set()
        self.generation = 0
        self.refresh_calls = 0
        self.refresh_script = []   # "soft" / "invalid" answers consumed by refresh grants
        self.userinfo_down = False
        self.device_script = []    # answers to device-code polls, then approval
        self.device_polls = []
        self.platform_keys = 0
        self.serve_in_thread()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def issue(self):
        """A fresh token pair whose user info gives a fresh apiKey."""
        self.generation += 1
        access, refresh = "at-%d-secret" % self.generation, "rt-%d-secret" % self.generation
        key = "sk-oauth-%d-abcdef" % self.generation
        self.access[access] = key
        self.refresh_valid.add(refresh)
        if self.upstream is not None:
            self.upstream.keys.add(key)
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.expires_in,
                "token_type": "bearer", "scope": "read"}



class FakeOAuthHandler(QuietHandler):
    def send(self, status, obj, headers=None, html=False):
        body = obj.encode() if html else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if html else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        parts = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(parts.query))
        if parts.path == "/oauth":
            assert q["client_id"] == ip.OAUTH_CLIENT_ID and q["state"] and q["type"] == "phone"
            code = "code-%s" % secrets_hex()
            with srv.lock:
                srv.codes[code] = (q["redirect"], q["code_challenge"])
            if q["redirect"].endswith("/oauth/code-display"):
                return self.send(200, "<p>Your code: <b id=code>%s</b></p>" % code, html=True)
            target = q["redirect"] + "?" + urllib.parse.urlencode({"code": code,
                                                                   "state": q["state"]})
            return self.send(302, {}, {"Location": target})
        if parts.path == "/api/oauth/getUserInfo":
            if srv.userinfo_down:
                return self.send(503, {"error": "user info is down"})
            key = srv.access.get(q.get("accessToken"))
            if not key:
                return self.send(200, {"success": False, "message": "invalid token"})
            return self.send(200, {"success": True, "data": {
                "apiKey": key, "email": "john@example.com", "phone": "13800001234",
                "userId": 7, "userName": "john"}})
        if parts.path == "/api/openapi/apikey":
            return self.platform(None)
        self.send(404, {"error": "not found"})

    def do_POST(self):
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/api/openapi/apikey":
            return self.platform(json.loads(raw))
        form = dict(urllib.parse.parse_qsl(raw.decode()))
        if parts.path == "/oauth/device":
            assert form["client_id"] == ip.OAUTH_CLIENT_ID and form["code_challenge"]
            return self.send(200, {"device_code": "dev-123", "user_code": "WDJB-MJHT",
                                   "verification_uri": srv.url + "/activate",
                                   "verification_uri_complete": srv.url + "/activate?c=WDJB",
                                   "expires_in": 600, "interval": 5})
        if parts.path != "/oauth/token":
            return self.send(404, {"error": "not found"})
        basic = base64.b64encode(("%s:%s" % (ip.OAUTH_CLIENT_ID, ip.OAUTH_CLIENT_SECRET))
                                 .encode()).decode()
        if self.headers.get("Authorization") != "Basic " + basic or \
                form.get("client_secret") != ip.OAUTH_CLIENT_SECRET:
            return self.send(401, {"error": "invalid_client"})
        grant = form.get("grant_type")
        with srv.lock:
            if grant == "authorization_code":
                redirect, challenge = srv.codes.pop(form.get("code"), (None, None))
                verifier = form.get("code_verifier", "")
                expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()) \
                    .decode().rstrip("=")
                if redirect is None or redirect != form.get("redirect_uri") or \
                        expected != challenge:
                    return self.send(400, {"error": "invalid_grant"})
                return self.send(200, srv.issue())
            if grant == "refresh_token":
                srv.refresh_calls += 1
                answer = srv.refresh_script.pop(0) if srv.refresh_script else None
                if answer == "soft":
                    return self.send(200, {"success": False, "code": "500",
                                           "message": "server busy"})
                if answer == "invalid" or form.get("refresh_token") not in srv.refresh_valid:
                    return self.send(400, {"error": "invalid_grant"})
                srv.refresh_valid.discard(form["refresh_token"])
                return self.send(200, srv.issue())
            if grant == ip.DEVICE_GRANT:
                srv.device_polls.append(form.get("device_code"))
                answer = srv.device_script.pop(0) if srv.device_script else "approve"
                if answer == "approve":
                    return self.send(200, srv.issue())
                return self.send(400, {"error": answer})
        self.send(400, {"error": "unsupported_grant_type"})

    def platform(self, body):
        srv = self.server
        if "BXAuth=good" not in (self.headers.get("Cookie") or ""):
            return self.send(200, {"success": False, "message": "not logged in"})
        with srv.lock:
            if body is not None:
                assert body == {"name": "my-key"} and self.headers.get("Origin")
                srv.platform_keys += 1
            key = "sk-plat-%d-abcdef" % srv.platform_keys
        if srv_upstream(srv):
            srv.upstream.keys.add(key)
        self.send(200, {"success": True, "data": {
            "name": "my-key", "apiKey": key, "apiKeyMask": key[:5] + "***",
            "expireTime": "2030-01-0%d 12:00" % (srv.platform_keys + 1), "hasExpired": False}})


def srv_upstream(srv):
    return srv.upstream is not None


def secrets_hex():
    return os.urandom(6).hex()


@pytest.fixture
def oauth(fake):
    yield from serving(FakeOAuth(upstream=fake))


def oauth_config(home, fake, oauth, **overrides):
    overrides.setdefault("callback_port", 0)
    return make_config(home, fake, env={"IFLOW_OAUTH_BASE": oauth.url,
                                        "IFLOW_PLATFORM_BASE": oauth.url}, **overrides)


class LineFeeder:
    """A stdin whose next line the test supplies later (readline blocks until then)."""

    def __init__(self):
        self.lines = queue.Queue()

    def readline(self, *limit):
        return self.lines.get(timeout=30)

    def isatty(self):
        return False


def printed_urls(out):
    return re.findall(r"https?://\S+", out.getvalue())


def follow(url):
    """What a browser does: open the URL and follow redirects (to our callback)."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read().decode()


def test_browser_oauth_flow_end_to_end(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    out, opened = io.StringIO(), []

    def browser(url):
        opened.append(url)
        threading.Thread(target=lambda: opened.append(follow(url)), daemon=True).start()
    creds = ip.login_oauth(config, out, None, browser=True, open_browser=browser,
                           env={"DISPLAY": ":0"})
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(opened[0]).query))
    assert query["redirect"].startswith("http://localhost:") and \
        query["redirect"].endswith("/oauth2callback")
    assert query["code_challenge_method"] == "S256" and len(query["state"]) >= 20
    assert opened[0] in out.getvalue()
    wait_for(lambda: len(opened) == 2, what="browser page")
    assert opened[1][0] == 200 and "Logged in" in opened[1][1]
    assert creds["api_key"] == "sk-oauth-1-abcdef" and creds["email"] == "john@example.com"
    assert creds["refresh_token"] == "rt-1-secret" and creds["expired"] > creds["last_refresh"]
    assert "at-1-secret" not in out.getvalue() and "sk-oauth-1" not in out.getvalue()


def test_callback_rejects_wrong_state_error_and_reuse(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    out, seen = io.StringIO(), []

    def browser(url):
        def go():
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
            callback = query["redirect"]
            for bad in ("?code=x&state=wrong", "?state=" + query["state"], "?code=x"):
                try:
                    follow(callback + bad)
                except urllib.error.HTTPError as e:
                    seen.append((e.code, e.read().decode()))
            seen.append(follow(url))
            try:
                follow(url.replace("state=", "x="))  # a second callback after success
            except (urllib.error.HTTPError, urllib.error.URLError, OSError) as e:
                seen.append(getattr(e, "code", "closed"))
        threading.Thread(target=go, daemon=True).start()
    creds = ip.login_oauth(config, out, None, open_browser=browser, env={"DISPLAY": ":0"})
    assert creds["api_key"].startswith("sk-oauth-")
    assert [s[0] for s in seen[:3]] == [400, 400, 400]
    assert "state parameter does not match" in seen[0][1] and "no code" in seen[1][1]
    wait_for(lambda: len(seen) == 5, what="second callback")
    assert seen[4] == "closed"   # the one-shot listener is gone after the login
    events = queue.Queue()
    listener = ip.CallbackListener(0, "the-state", events)
    try:
        ok = listener.redirect_uri + "?code=c1&state=the-state"
        assert follow(ok)[0] == 200
        with pytest.raises(urllib.error.HTTPError) as again:
            follow(ok)
        assert again.value.code == 409
        assert events.get_nowait() == ("code", "c1", listener.redirect_uri)
        assert events.empty()
    finally:
        listener.close()

    def refuse(url):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        threading.Thread(target=lambda: pytest.raises(Exception, follow, query["redirect"] +
                         "?error=access_denied&state=" + query["state"]), daemon=True).start()
    with pytest.raises(ip.LoginError) as e:
        ip.login_oauth(config, io.StringIO(), None, open_browser=refuse, env={"DISPLAY": ":0"})
    assert "access_denied" in e.value.message


def test_callback_port_busy_is_a_clear_error(home, fake, oauth):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        config = oauth_config(home, fake, oauth, callback_port=blocker.getsockname()[1])
        with pytest.raises(ip.LoginError) as e:
            ip.login_oauth(config, io.StringIO(), None, open_browser=lambda u: None,
                           env={"DISPLAY": ":0"})
        assert "--callback-port" in e.value.message and "--no-browser" in e.value.message
    finally:
        blocker.close()


def test_headless_code_display_flow(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    out, stdin = io.StringIO(), LineFeeder()
    worker, result = in_thread(lambda: ip.login_oauth(config, out, stdin, env={
        "SSH_CONNECTION": "10.0.0.1 22 10.0.0.2 50000"}))
    url = wait_for(lambda: [u for u in printed_urls(out) if "code-display" in u],
                   what="code-display URL")[0]
    assert "ssh -L" in out.getvalue()
    status, page = follow(url)              # the user logs in on another device ...
    code = re.search(r"<b id=code>(.*?)</b>", page).group(1)
    stdin.lines.put(code + "\n")            # ... and types the code shown
    worker.join(30)
    assert result and result[0]["api_key"].startswith("sk-oauth-")


def test_headless_paste_callback_url_flow(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    out, stdin = io.StringIO(), LineFeeder()
    worker, result = in_thread(lambda: ip.login_oauth(config, out, stdin, browser=False,
                                                      env={"DISPLAY": ":0"}))
    url = wait_for(lambda: [u for u in printed_urls(out) if "localhost" in u and
                            "code-display" not in u], what="localhost URL")[0]

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None
    try:  # a browser on another machine: the redirect to localhost can't load there
        urllib.request.build_opener(NoRedirect).open(url, timeout=30)
    except urllib.error.HTTPError as e:
        final = e.headers["Location"]
    assert "/oauth2callback?code=" in final
    stdin.lines.put(final + "\n")
    worker.join(30)
    assert result and result[0]["email"] == "john@example.com"
    out2, stdin2 = io.StringIO(), LineFeeder()
    worker, result = in_thread(lambda: pytest.raises(ip.LoginError, ip.login_oauth, config, out2,
                                                     stdin2, browser=False, env={}))
    wait_for(lambda: printed_urls(out2), what="URL")
    stdin2.lines.put(final.replace("state=", "state=forged") + "\n")
    worker.join(30)
    assert "state" in result[0].value.message
    out3, stdin3 = io.StringIO(), LineFeeder()  # what urlsplit can't read: said, not a hang
    worker, result = in_thread(lambda: pytest.raises(ip.LoginError, ip.login_oauth, config, out3,
                                                     stdin3, browser=False, env={}))
    local = wait_for(lambda: [u for u in printed_urls(out3) if "localhost" in u and
                              "code-display" not in u], what="localhost URL")[0]
    port = urllib.parse.urlsplit(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
        local).query))["redirect"]).port  # the login listener's
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"GET http://[x/oauth2callback HTTP/1.0\r\n\r\n")
        assert raw.makefile("rb").readline().split()[1] == b"400"
    stdin3.lines.put("http://[x/oauth2callback?code=1\n")
    worker.join(30)
    assert "could not be read" in result[0].value.message


class FakeTime:
    """sleep() that advances clock() instead of waiting."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("script,outcome", [
    (["authorization_pending", "slow_down", "authorization_pending"], "approved"),
    (["authorization_pending", "access_denied"], "denied"),
    (["authorization_pending", "expired_token"], "expired"),
    (["authorization_pending"] * 200, "expired"),   # the code's lifetime runs out
])
def test_device_flow(home, fake, oauth, script, outcome):
    oauth.device_script = list(script)
    config = oauth_config(home, fake, oauth, device_endpoint=oauth.url + "/oauth/device")
    out, t = io.StringIO(), FakeTime()
    if outcome == "approved":
        creds = ip.login_device(config, out, sleep=t.sleep, clock=t.clock)
        assert creds["api_key"].startswith("sk-oauth-")
        assert t.sleeps[:4] == [5, 5, 10, 10]   # slow_down adds 5 s to the interval
    else:
        with pytest.raises(ip.LoginError) as e:
            ip.login_device(config, out, sleep=t.sleep, clock=t.clock)
        expected = {"denied": "denied", "expired": "Device code expired before authorization"}
        assert expected[outcome] in e.value.message
        if outcome == "expired":
            assert "run `python iflow_proxy.py login --device` again" in e.value.message
            assert t.now <= 600
    assert "WDJB-MJHT" in out.getvalue() and oauth.url + "/activate?c=WDJB" in out.getvalue()


def test_device_flow_without_endpoint_points_to_code_display(home):
    code, _, err = run_cli("login", "--device", home=home)
    assert code == 2 and "code-display" in err and "device_endpoint" in err


def test_cookie_login_and_rotation_via_cli(home, fake, oauth):
    env = {"IFLOW_API_BASE": fake.url + "/v1", "IFLOW_PLATFORM_BASE": oauth.url}
    code, out, err = run_cli("login", "--cookie", stdin="a=1; BXAuth=good; b=2\n", env=env,
                             home=home)
    assert code == 0, err
    assert "cookie" in out and "sk-plat-1-abcdef" not in out
    account = ip.AccountRegistry(home).load_accounts()[0]
    assert (account.kind, account.api_key) == ("cookie", "sk-plat-1-abcdef")
    creds = ip.AccountRegistry(home).read_credentials({"id": account.id})
    assert creds["expire_time"] == "2030-01-02 12:00" and creds["expired"] == \
        "2030-01-02T04:00:00Z" and creds["cookie"].endswith("b=2")
    code, _, err = run_cli("login", "--cookie", stdin="a=1\n", env=env, home=home)
    assert code == 2 and "BXAuth" in err
    code, _, err = run_cli("login", "--cookie", stdin="BXAuth=bad\n", env=env, home=home)
    assert code == 1 and "did not accept the cookie" in err


def oauth_account(home, config, oauth, clock_now, nickname=None):
    tokens = oauth.issue()
    info = {"apiKey": oauth.access[tokens["access_token"]], "email": "john@example.com"}
    creds = ip.oauth_credentials(tokens, info, clock=lambda: clock_now)
    entry, _ = ip.AccountRegistry(home).upsert(ip.identity_of("oauth", creds), "oauth", creds,
                                               nickname=nickname)
    return entry


def test_refresh_due_uses_lead_of_at_most_half_the_lifetime():
    config = ip.Config(home="/x")
    day = 86400
    long_lived = {"refresh_token": "r", "expired": ip.rfc3339(10 * day),
                  "last_refresh": ip.rfc3339(0)}
    assert ip.refresh_due("oauth", long_lived, config) == 9 * day
    short = {"refresh_token": "r", "expired": ip.rfc3339(3600), "last_refresh": ip.rfc3339(0)}
    assert ip.refresh_due("oauth", short, config) == 1800   # not in a loop
    cookie = {"cookie": "BXAuth=x", "expired": ip.rfc3339(7 * day)}
    assert ip.refresh_due("cookie", cookie, config) == 5 * day
    assert ip.refresh_due("api-key", {"expired": ip.rfc3339(5)}, config) is None


def test_refresh_rotates_key_and_soft_failure_keeps_old(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    entry = oauth_account(home, config, oauth, clock_now=time.time())
    registry = ip.AccountRegistry(home)
    old = registry.read_credentials(entry)
    refresher = ip.Refresher(registry, config, clock=lambda: time.time() + 1801)  # past due
    oauth.refresh_script = ["soft"]
    assert refresher.refresh(entry["id"]) is False
    assert registry.read_credentials(entry) == old            # old credentials kept
    account = registry.load_accounts()[0]
    assert account.status == "ok" and "server busy" in account.refresh_error
    assert refresher._backoff[entry["id"]][1] == 60           # 1 min, doubling
    code, out, _ = run_cli("accounts", "--json", home=home)
    listed = json.loads(out)[0]
    assert listed["status"] == "ok" and "server busy" in listed["refresh_error"]
    assert "renewal failing" in run_cli("accounts", home=home)[1]
    assert refresher.refresh(entry["id"]) is True
    new = registry.read_credentials(entry)
    assert new["api_key"] == "sk-oauth-2-abcdef" and new["refresh_token"] == "rt-2-secret"
    assert registry.load_accounts()[0].refresh_error == ""
    assert refresher.refresh(entry["id"]) is False             # fresh again: nothing to do
    oauth.refresh_script = ["invalid"]
    assert refresher.refresh(entry["id"], force=True) is False
    assert registry.load_accounts()[0].status == "needs-login"


def test_background_refresher_renews_when_due(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    entry = oauth_account(home, config, oauth, clock_now=time.time() - 3000)  # due now
    refresher = ip.Refresher(ip.AccountRegistry(home), config).start()
    try:
        wait_for(lambda: oauth.refresh_calls == 1, what="background refresh")
        wait_for(lambda: ip.AccountRegistry(home).read_credentials(entry)["api_key"] ==
                 "sk-oauth-2-abcdef", what="rotated key stored")
        due, _ = refresher.next_due()
        assert due > time.time() + 1000   # next renewal scheduled, not a busy loop
    finally:
        refresher.stop()
    assert oauth.refresh_calls == 1


def test_upstream_439_refreshes_and_retries_once(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    entry = oauth_account(home, config, oauth, clock_now=time.time())
    first_key = ip.AccountRegistry(home).read_credentials(entry)["api_key"]
    fake.push(first_key, ("business", 439))
    with running(config) as server:
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 200
        assert [r[3] for r in fake.chat_requests()] == [first_key, "sk-oauth-2-abcdef"]
        assert oauth.refresh_calls == 1
        fake.keys.discard("sk-oauth-2-abcdef")
        fake.push("sk-oauth-2-abcdef", ("business", 434))   # AK blocked: no refresh loop
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 503 and oauth.refresh_calls == 1
    assert ip.AccountRegistry(home).load_accounts()[0].status == "disabled"


def test_concurrent_refresh_from_two_processes(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    oauth.expires_in = 60
    entry = oauth_account(home, config, oauth, clock_now=time.time() - 50)  # due now
    env = dict(os.environ, IFLOW_PROXY_HOME=home, IFLOW_OAUTH_BASE=oauth.url)
    procs = [subprocess.Popen([sys.executable, "iflow_proxy.py", "refresh"], cwd=HERE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert oauth.refresh_calls == 1
    assert sorted("renewed" in o[0] for o in outs) == [False, True]
    creds = ip.AccountRegistry(home).read_credentials(entry)
    assert creds["refresh_token"] in oauth.refresh_valid and creds["api_key"] == \
        "sk-oauth-2-abcdef"
    for o in outs:
        assert "sk-oauth-2-abcdef" not in o[0] + o[1] and "rt-2-secret" not in o[0] + o[1]


def test_import_from_iflow_cli_ccs_and_cliproxyapi(home, tmp_path):
    user = tmp_path / "user"
    (user / ".iflow").mkdir(parents=True)
    (user / ".iflow" / "oauth_creds.json").write_text(json.dumps({
        "access_token": "at-cli", "refresh_token": "rt-cli", "expiry_date": 1900000000000,
        "token_type": "bearer", "apiKey": "sk-cli-oauth-key", "email": "cli@example.com"}))
    (user / ".iflow" / "settings.json").write_text(json.dumps({
        "selectedAuthType": "iflow", "apiKey": "sk-cli-plain-key",
        "baseUrl": "https://mirror.example/v1"}))
    ccs = user / ".ccs" / "cliproxy"
    (ccs / "auth").mkdir(parents=True)
    shared = {"access_token": "at-x", "refresh_token": "rt-x", "expired": "2030-01-01T00:00:00Z",
              "last_refresh": "2029-12-31T00:00:00Z", "api_key": "sk-shared-key",
              "email": "ann@example.com", "type": "iflow"}
    (ccs / "auth" / "iflow-ann.json").write_text(json.dumps(shared))
    (ccs / "accounts.json").write_text(json.dumps({"version": 1, "providers": {"iflow": {
        "default": "ann@example.com", "accounts": {"ann@example.com": {
            "email": "ann@example.com", "nickname": "annie", "tokenFile": "iflow-ann.json"}}}}}))
    (user / ".cli-proxy-api").mkdir()
    (user / ".cli-proxy-api" / "iflow-ann-1.json").write_text(json.dumps(shared))  # duplicate
    (user / ".cli-proxy-api" / "iflow-broken.json").write_text("{oops")
    env = {"HOME": str(user)}
    code, out, err = run_cli("import", "--dry-run", env=env, home=home)
    assert code == 0 and out.count("would") == 3 and "skip" in out
    assert not os.path.exists(os.path.join(home, "accounts.json"))
    code, out, err = run_cli("import", env=env, home=home)
    assert code == 0 and out.count("import ") == 3, out
    accounts = {a.nickname: a for a in ip.AccountRegistry(home).load_accounts()}
    assert set(accounts) == {"cli", "api-key", "annie"}
    assert accounts["annie"].kind == "oauth" and accounts["api-key"].base_url == \
        "https://mirror.example/v1"
    assert accounts["cli"].expires == "2030-03-17T17:46:40Z"
    for secret in ("sk-cli-oauth-key", "sk-shared-key", "rt-x", "at-cli"):
        assert secret not in out + err
    code, out, _ = run_cli("import", env=env, home=home)
    assert out.count("skip") == 4 and "import " not in out
    # Our credential files use CLIProxyAPI's field names, so they move back as well.
    ours = json.load(open(ip.AccountRegistry(home).credential_path({"id": accounts["annie"].id})))
    assert {k: ours[k] for k in ("access_token", "refresh_token", "expired", "api_key", "email",
                                 "type")} == {k: shared[k] for k in ("access_token",
                                 "refresh_token", "expired", "api_key", "email", "type")}
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"api_key": "sk-single-file-1", "type": "iflow"}))
    code, out, _ = run_cli("import", str(single), home=home)
    assert code == 0 and "import " in out
    code, _, err = run_cli("import", str(tmp_path / "missing.json"), home=home)
    assert code == 2 and "no such file" in err


# ==================================================================================================
# Hardening: malformed input, slow and vanishing clients, limits, shutdown, crashes, secrets
# ==================================================================================================

def raw_exchange(server, data, timeout=15, half_close=True):
    """Send raw bytes, half-close, and read the whole answer (b"" if the server just closed)."""
    with socket.create_connection(server.server_address, timeout=timeout) as sock:
        chunks = []
        try:
            sock.sendall(data)
            if half_close:  # only once the answer began or the server has gone quiet: a
                sock.settimeout(0.5)  # client that closes its side while waiting for an
                try:                  # answer is taken as gone, as nginx does
                    chunks.append(sock.recv(65536))
                except socket.timeout:
                    pass
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(timeout)
        except OSError:
            pass
        while chunks[-1:] != [b""]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def http_bytes(method, path, body=b"", headers=None):
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method, path)
    for k, v in (headers or {"Content-Type": "application/json",
                              "Content-Length": str(len(body))}).items():
        head += "%s: %s\r\n" % (k, v)
    return head.encode() + b"\r\n" + body


WEIRD_VALUES = [None, 0, -1, 1.5, 10 ** 30, "", "x" * 3000, True, [], [1, "a", None], {},
                {"a": {"b": [1]}}, "\u0000\ud7ff", [{"type": 5}], {"type": "text", "text": 5}]

OPENAI_VALID = {"model": "glm-4.6", "stream": False, "temperature": 0.5, "top_p": 0.9,
                "max_tokens": 50, "stop": ["END"], "user": "u", "n": 1, "seed": 3,
                "tool_choice": "auto", "reasoning_effort": "low",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                "messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
ANTHROPIC_VALID = {"model": "claude-sonnet-4", "max_tokens": 50, "stream": False,
                   "system": [{"type": "text", "text": "be brief"}], "temperature": 0.5,
                   "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"],
                   "metadata": {"user_id": "u1"}, "thinking": {"type": "enabled",
                                                                 "budget_tokens": 1024},
                   "tool_choice": {"type": "auto"},
                   "tools": [{"name": "f", "description": "d", "input_schema": {}}],
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                {"role": "assistant", "content": [
                                    {"type": "thinking", "thinking": "t", "signature": "s"},
                                    {"type": "redacted_thinking", "data": "r"},
                                    {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                                {"role": "user", "content": [
                                    {"type": "tool_result", "tool_use_id": "t1",
                                     "content": "ok"}]}]}


def mutations(rng, valid):
    """Copies of ``valid`` with one field (top-level or nested) set to a weird value."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + [i])
                walk(v, path + [i])
    walk(valid, [])
    for path in paths:
        for value in rng.sample(WEIRD_VALUES, 4):
            body = json.loads(json.dumps(valid))
            node = body
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value
            yield path, body


@pytest.mark.parametrize("block, fragment", [
    ({"type": "thinking", "thinking": 5, "signature": "s"}, "a thinking block needs a string"),
    ({"type": "thinking", "signature": "s"}, "a thinking block needs a string"),
    ({"type": "redacted_thinking", "data": ["x"]}, "a redacted_thinking block needs a string"),
    ({"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "tool_reference", "tool_name": ["x"]}]}, "a tool_reference block needs"),
])
def test_malformed_blocks_are_a_400_naming_them(home, fake, block, fragment):
    body = dict(ANTHROPIC_VALID, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [block]},
        {"role": "user", "content": "go on"}])
    where = re.escape("messages[1].content[0]") + r"(\.content\[0\])?: "  # (or the block's)
    with pytest.raises(ip.BadRequest, match=where + re.escape(fragment)):
        ip.validate_anthropic_request(body)
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:  # (each was a 500: the token count)
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            status, _h, data = post_json(server, path, body)
            assert status == 400 and fragment in data["error"]["message"], path


def test_fuzz_malformed_requests_get_json_4xx(home, fake):
    import random
    rng = random.Random(20261122)
    add_key_account(home, KEYS[0])
    config = make_config(home, fake, max_body_bytes=200000, header_timeout=5, body_timeout=5,
                         max_concurrency=0)
    cases = [
        b"GET\r\n\r\n", b"\x00\xff\xfe garbage\r\n\r\n", b"POST /v1/models HTTP/9.9\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) +
        b"\r\n",
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n",
    ]
    chat = "/v1/chat/completions"
    for length in ("-5", "abc", "1e3", "99999999999", " ", "10, 20"):
        cases.append(http_bytes("POST", chat, b"{}", {"Content-Length": length}))
    cases.append(http_bytes("POST", chat, b"{}", {"Content-Length": "2"}).replace(
        b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 3"))
    cases.append(http_bytes("POST", chat, b'{"model":', {"Content-Length": "500"}))  # short
    for chunked in (b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nab", b"3\r\nabcXY0\r\n\r\n",
                    b"-1\r\n\r\n", b"fffffffffff\r\n"):
        cases.append(http_bytes("POST", chat, chunked, {"Transfer-Encoding": "chunked"}))
    for body in (b"\xff\xfe\xfd", b"[" * 50000 + b"]" * 50000, b'{"a":' * 5000, b"1" * 5000,
                 b'"' + b"x" * 150000 + b'"', b"{" + b'"k":1,' * 40000 + b'"z":1}',
                 json.dumps({"model": "m", "messages": "x" * 300000}).encode(),
                 b"null", b"true", b'{"model": NaN}', b"\x00"):
        for path in (chat, "/v1/messages", "/v1/messages/count_tokens"):
            cases.append(http_bytes("POST", path, body))
    # framing: TE/CL combinations, early errors with bodies, surrogates, huge lines (all run)
    framing, sampled = [], cases
    cases = framing
    body = json.dumps(CHAT).encode()
    for headers in ({"Transfer-Encoding": "chunked", "Content-Length": str(len(body))},
                    {"Transfer-Encoding": "gzip, chunked"}, {"Transfer-Encoding": "xchunked"},
                    {"Content-Length": "+%d" % len(body)}, {"Transfer-Encoding": "identity"}):
        cases.append(http_bytes("POST", chat, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                                dict(headers, **{"Content-Type": "application/json"})))
    for method, path in (("POST", "/v1/embeddings"), ("PUT", chat), ("POST", "/healthz")):
        cases.append(http_bytes(method, path, body) + http_bytes("GET", "/healthz"))
    for text in (b'"\\ud800"', b'"\\udfff x"', b'"\\ud83d\\ude00"'):
        cases.append(http_bytes("POST", chat, body.replace(b'"hi"', text)))
    cases.append(http_bytes("POST", chat, b'{"model": "' + b"m" * 100000 + b'"}'))
    cases.append(b"GET /healthz HTTP/1.1\r\nHost: " + b"h" * 66000 + b"\r\n\r\n")
    cases = sampled
    for valid, path in ((OPENAI_VALID, chat), (ANTHROPIC_VALID, "/v1/messages")):
        for _field, body in mutations(rng, valid):
            cases.append(http_bytes("POST", path, json.dumps(body).encode()))
    rng.shuffle(cases)
    cases = cases[:400] + framing
    deadline = time.monotonic() + 120
    statuses = []
    with running(config) as server:
        for case in cases:
            assert time.monotonic() < deadline, "fuzzing took too long"
            try:
                reply = raw_exchange(server, case)
            except OSError as e:
                raise AssertionError("no answer to %r: %s" % (case[:300], e))
            assert reply.startswith(b"HTTP/1.1 "), (case[:120], reply[:200])
            status = int(reply[9:12])
            statuses.append(status)
            assert status < 500, (case[:300], reply[:400])
            if status >= 400:
                body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
                assert "error" in body, reply[:300]
        assert post_json(server, chat, CHAT)[0] == 200
        assert request(server, "GET", "/healthz")[0] == 200
    assert len(statuses) >= 300 and sum(400 <= s < 500 for s in statuses) >= 150


def test_client_disconnect_mid_stream_frees_everything(home, fake):
    add_key_account(home, KEYS[0])
    fake.gate = threading.Event()
    fake.responder = lambda body: {"content": "x" * 24000000, "chunk": 65536}  # > socket buffers
    log_stream = io.StringIO()
    config = make_config(home, fake)
    with running(config) as server:
        ip.setup_logging(config, stream=log_stream)
        sock = socket.create_connection(server.server_address)
        payload = json.dumps(dict(CHAT, stream=True)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                     b"Content-Type: application/json\r\n\r\n%s" % (len(payload), payload))
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        sock.close()                       # the client goes away mid-stream
        fake.gate.set()
        account = server.chat.router.all_accounts()[0]
        wait_for(lambda: server.chat.router.in_flight(account) == 0, what="slot freed")
        wait_for(lambda: fake.aborted_streams == 1, what="upstream stream abandoned")
        assert all(not idle for idle in server.chat.upstream.pool._idle.values())  # not pooled
        wait_for(lambda: "client disconnected" in log_stream.getvalue(), what="log line")
        assert "Traceback" not in log_stream.getvalue()
        assert log_stream.getvalue().count("client disconnected") == 1
        fake.gate = None
        fake.responder = None
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200


def test_slow_clients_are_cut_off(home, fake):
    add_key_account(home, KEYS[0])
    config = make_config(home, fake, header_timeout=0.6, body_timeout=0.6)
    with running(config) as server:
        def trickle(sock, data):
            try:
                for byte in data:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)   # the slowloris client's own pace, well under any timeout
            except OSError:
                pass
        started = time.monotonic()
        sock = socket.create_connection(server.server_address)
        threading.Thread(target=trickle, args=(sock, b"GET /healthz HTTP/1.1\r\n" +
                                               b"X-Slow: " + b"a" * 100), daemon=True).start()
        sock.settimeout(10)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
        sock.close()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
                b"Content-Type: application/json\r\n\r\n{\"model\"")
        reply = raw_exchange(server, head, half_close=False)
        assert reply == b"" or b" 408 " in reply[:20] or b" 400 " in reply[:20]
        assert request(server, "GET", "/healthz")[0] == 200


def test_connection_cap_answers_503_and_recovers(home, fake):
    with running(make_config(home, fake, max_connections=3)) as server:
        busy = [socket.create_connection(server.server_address) for _ in range(3)]
        for sock in busy:  # each in the middle of its request headers: none of them idle
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        wait_for(lambda: server.connections == 3 and not server._idle, what="3 busy")
        reply = raw_exchange(server, http_bytes("GET", "/healthz", headers={}))
        assert reply.startswith(b"HTTP/1.1 503") and b"max_connections" in reply
        busy.pop().close()
        wait_for(lambda: server.connections == 2, what="a connection to end")
        assert request(server, "GET", "/healthz")[0] == 200
        for sock in busy:
            sock.close()


def test_idle_connections_make_room_and_get_header_timeout(home, fake):
    """Connections that send nothing can't keep others out: at the cap the oldest idle one is
    dropped, and a new connection gets header_timeout (not client_idle_timeout) to start."""
    config = make_config(home, fake, max_connections=4, header_timeout=1,
                         client_idle_timeout=60)
    with running(config) as server:
        idle = [socket.create_connection(server.server_address) for _ in range(4)]
        wait_for(lambda: server.connections == 4 and len(server._idle) == 4, what="4 idle")
        for _ in range(3):  # each request takes an idle connection's place at once
            assert request(server, "GET", "/healthz")[0] == 200
        started = time.monotonic()
        wait_for(lambda: server.connections == 0, timeout=10, what="silent ones cut")
        assert time.monotonic() - started < 5  # header_timeout, not client_idle_timeout
        for sock in idle:
            sock.close()


def test_keepalive_reuses_client_connection(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
        assert server.connections == 1
        conn.close()


def serve_subprocess(home, fake, *extra, env=None):
    environment = dict(os.environ, IFLOW_API_BASE=fake.url + "/v1", IFLOW_PROXY_HOME=home,
                       **(env or {}))
    proc = subprocess.Popen([sys.executable, "iflow_proxy.py", "serve", "--port", "0"] +
                            list(extra), cwd=HERE, env=environment, stderr=subprocess.PIPE,
                            text=True)
    line = wait_for(lambda: proc.stderr.readline(), what="banner")
    port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", line).group(1))
    return proc, port


def test_sigterm_lets_streams_finish_then_exits_0(home, fake):
    if not hasattr(signal, "SIGTERM") or os.name != "posix":
        pytest.skip("POSIX signals")
    add_key_account(home, KEYS[0])
    fake.gate = threading.Event()
    proc, port = serve_subprocess(home, fake)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(dict(CHAT, stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.read1(65536)
        proc.send_signal(signal.SIGTERM)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True
        wait_for(refused, what="listener closed")
        fake.gate.set()
        rest = resp.read()
        assert sse_payloads(first + rest)[-1] == "[DONE]"
        assert proc.wait(timeout=30) == 0
        assert os.path.exists(os.path.join(home, "usage.json"))
        assert json.load(open(os.path.join(home, "usage.json")))["days"]
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_second_signal_exits_at_once(home, fake):
    if os.name != "posix":
        pytest.skip("POSIX signals")
    add_key_account(home, KEYS[0])
    release = threading.Event()
    fake.push(KEYS[0], ("stall", release))
    proc, port = serve_subprocess(home, fake, env={"IFLOW_PROXY_LOG_LEVEL": "info"})
    try:
        threading.Thread(target=lambda: raw_exchange(
            type("S", (), {"server_address": ("127.0.0.1", port)}),
            http_bytes("POST", "/v1/chat/completions", json.dumps(CHAT).encode())),
            daemon=True).start()
        wait_for(lambda: len(fake.chat_requests()) == 1, what="request in flight")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "no new connections" in proc.stderr.readline(), what="first signal")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 1     # long before the 10 s grace period
    finally:
        release.set()
        proc.kill()
        proc.wait()
        proc.stderr.close()


CRASH_WRITER = r"""
import itertools, sys, os
sys.path.insert(0, %(here)r)
import iflow_proxy as ip
registry = ip.AccountRegistry(%(home)r)
usage = ip.UsageBook(os.path.join(%(home)r, "usage.json"))
for i in itertools.count():
    registry.upsert("key:%%d" %% (i %% 3), "api-key", {"api_key": "sk-crash-%%08d" %% i},
                    settings={"priority": i})
    usage.record("acct", "m", 200, {"prompt_tokens": i}, 1.0)
    usage.save()
    if i == 2:
        print("ready", flush=True)
"""


def test_files_survive_kill_9_at_random_moments(home):
    import random
    rng = random.Random(7)
    script = CRASH_WRITER % {"here": HERE, "home": home}
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.2))   # let it write for a random moment, then kill it
        proc.kill()
        proc.wait()
        proc.stdout.close()
        registry = ip.AccountRegistry(home)
        data = registry.read()                       # valid JSON, valid registry
        assert 1 <= len(data["accounts"]) <= 3
        for entry in data["accounts"]:
            creds = registry.read_credentials(entry)   # valid JSON
            assert re.match(r"^sk-crash-\d{8}$", creds["api_key"])
            assert stat.S_IMODE(os.stat(registry.credential_path(entry)).st_mode) == 0o600
        usage = json.load(open(os.path.join(home, "usage.json")))
        assert usage["version"] == 1
        for name in ("accounts.json", "usage.json"):
            assert stat.S_IMODE(os.stat(os.path.join(home, name)).st_mode) == 0o600


def test_secrets_never_appear_in_full(home, fake, oauth, tmp_path):
    secrets_seen = []
    client_key = "ck-super-secret-client-key-123"
    env = {"IFLOW_API_BASE": fake.url + "/v1", "IFLOW_OAUTH_BASE": oauth.url}
    outputs = []
    code, out, err = run_cli("login", "--api-key", "--nickname", "plain", stdin=KEYS[0] + "\n",
                             env=env, home=home)
    outputs += [out, err]
    config = oauth_config(home, fake, oauth)
    entry = oauth_account(home, config, oauth, clock_now=time.time())
    creds = ip.AccountRegistry(home).read_credentials(entry)
    secrets_seen += [KEYS[0], client_key, creds["api_key"], creds["access_token"],
                     creds["refresh_token"], ip.OAUTH_CLIENT_SECRET]
    fake.push(creds["api_key"], ("business", 439))     # forces a refresh with new tokens
    log_file = str(tmp_path / "proxy.log")
    proc, port = serve_subprocess(home, fake, "--client-key", client_key, "--log-file", log_file,
                                  "--log-level", "debug", env={"IFLOW_OAUTH_BASE": oauth.url})
    try:
        server = type("S", (), {"server_address": ("127.0.0.1", port)})
        auth = {"Authorization": "Bearer " + client_key}
        pinned = dict(CHAT, model="%s/glm-4.6" % entry["nickname"])   # the OAuth account
        for body in (pinned, pinned, CHAT):
            outputs.append(request(server, "POST", "/v1/chat/completions", body, auth)[2])
        outputs.append(request(server, "POST", "/v1/chat/completions", CHAT,
                               {"Authorization": "Bearer " + client_key[:-1]})[2])
        outputs.append(request(server, "GET", "/status", headers=auth)[2])
        outputs.append(request(server, "GET", "/")[2])
        code, out, err = run_cli("status", env={"IFLOW_PROXY_PORT": str(port),
                                                "IFLOW_PROXY_CLIENT_KEYS": client_key},
                                 home=home)
        outputs += [out, err]
        for command in (["accounts"], ["accounts", "--json"], ["check"], ["env"]):
            code, out, err = run_cli(*command, env=dict(env, IFLOW_PROXY_CLIENT_KEYS=client_key),
                                     home=home)
            outputs += [out, err]
        proc.terminate()
        proc.wait(timeout=30)
        outputs.append(proc.stderr.read())
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    rotated = ip.AccountRegistry(home).read_credentials(entry)
    assert rotated["api_key"] != creds["api_key"]      # the refresh really happened
    secrets_seen += [rotated["api_key"], rotated["access_token"], rotated["refresh_token"]]
    outputs.append(open(log_file).read())
    text = "\n".join(o.decode() if isinstance(o, bytes) else o for o in outputs)
    assert "status=200" in text and "renewed the credentials" in text
    for secret in secrets_seen:
        assert secret not in text, "a secret leaked: %s" % ip.mask_secret(secret)


def test_model_lists_406_and_max_attempts(home, fake, clock):
    add_key_account(home, KEYS[0], nickname="glm-only", models=["glm-*"])
    add_key_account(home, KEYS[1], nickname="no-glm46", excluded_models=["GLM-4.6"])
    with running(make_config(home, fake), router_clock=clock) as server:
        for i in range(3):
            assert post_json(server, "/v1/chat/completions", conversation(i))[0] == 200
        assert {r[3] for r in fake.chat_requests()} == {KEYS[0]}      # only glm-only serves it
        for i in range(2):
            body = dict(conversation(10 + i), model="kimi-k2")
            assert post_json(server, "/v1/chat/completions", body)[0] == 200
        assert {r[3] for r in fake.chat_requests()[3:]} == {KEYS[1]}
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, model="glm-only/"
                                                                            "kimi-k2"))
        assert status == 404 and "not allowed" in body["error"]["message"]
    fake.requests.clear()
    add_key_account(home, KEYS[2], nickname="third")
    with running(make_config(home, fake, max_attempts=2), router_clock=clock) as server:
        fake.push(KEYS[0], ("business", 406))      # 406: never retried on another account
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, model="glm-5"))
        assert status == 502 and body["error"]["code"] == "upstream_rejected"
        assert len(fake.chat_requests()) == 1
        for key in KEYS[1:]:
            fake.push(key, ("http", 500))
        status, _, body = post_json(server, "/v1/chat/completions",
                                    dict(conversation(5), model="glm-5"))
        assert status == 502 and len(fake.chat_requests()) == 3       # 2 attempts at most


def test_burst_of_connections_is_not_reset(home, fake):
    with running(make_config(home, fake)) as server:
        start = threading.Barrier(60)
        results = []

        def hit():
            start.wait()
            try:
                results.append(request(server, "GET", "/healthz")[0])
            except OSError as e:
                results.append(repr(e))
        threads = [threading.Thread(target=hit) for _ in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 60


def test_upstream_silence_mid_stream_becomes_error_event(home, fake):
    add_key_account(home, KEYS[0])
    fake.gate = threading.Event()
    try:
        with running(make_config(home, fake, idle_timeout=0.3)) as server:
            status, _, data = request(server, "POST", "/v1/chat/completions",
                                      dict(CHAT, stream=True))
            assert status == 200
            payloads = sse_payloads(data)
            error = json.loads(payloads[-2])["error"]
            assert error["code"] == "upstream_timeout" and payloads[-1] == "[DONE]"
    finally:
        fake.gate.set()


def test_token_estimates_memo_gives_the_same_counts_and_stays_bounded():
    body = fixture("claude-code-turn2-tool-result.json")["body"]
    memo = ip.TokenEstimates(size=4)
    assert ip.count_request_tokens(body, memo) == ip.count_request_tokens(body)
    assert ip.count_request_tokens(json.loads(json.dumps(body)), memo) == \
        ip.count_request_tokens(body)
    for i in range(20):
        assert memo("word " * 200 + str(i)) == ip.estimate_tokens("word " * 200 + str(i))
    assert len(memo._memo) <= 4


def test_claude_command_reuses_a_running_proxy(home, fake, tmp_path):
    add_key_account(home, KEYS[0])
    script = tmp_path / "claude"
    script.write_text("#!%s\nimport os\nprint(os.environ['ANTHROPIC_BASE_URL'])\n"
                      "print(os.environ['ANTHROPIC_AUTH_TOKEN'])\n" % sys.executable)
    script.chmod(0o755)
    with running(make_config(home, fake, client_keys=("ck-reuse-1",))) as server:
        env = dict(os.environ, IFLOW_API_BASE=fake.url + "/v1", IFLOW_PROXY_HOME=home,
                   IFLOW_PROXY_PORT=str(server.server_address[1]),
                   IFLOW_PROXY_CLIENT_KEYS="ck-reuse-1")
        out = subprocess.run([sys.executable, "iflow_proxy.py", "claude", "--claude-bin",
                              str(script)], cwd=HERE, env=env, capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [server.url, "ck-reuse-1"]


# ==================================================================================================
# The handler without sockets (CPython test_httpservers style): framing and request checks
# ==================================================================================================

class StubConnection:
    def settimeout(self, seconds):
        pass

    def setsockopt(self, *args):
        pass

    def getsockopt(self, *args):
        raise OSError("a stub, not a socket")  # so Timeouts keeps to settimeout

    def shutdown(self, how):
        pass


class ScriptedExchange:
    """What the handler needs of a ChatExchange, answering with a canned completion."""

    protocol = "openai"

    def __init__(self, request, model=None, content="ok"):
        self.request, body = request, request.openai()
        self.body, self.asked, self.stream = body, body["model"], body.get("stream") is True
        self.model = model or body["model"]
        payload = {"id": "c", "object": "chat.completion", "model": self.model, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}]}
        self.answer = ip.UpstreamAnswer(CannedResponse(200, json.dumps(payload).encode()),
                                        stream=False).open()
        self.opened = self.closed = False
        self.error = None

    def open(self):
        self.opened = True
        return self

    def chunks(self):
        return self.answer.chunks()

    def fail(self, error):
        self.error = error.message

    def close(self):
        self.closed = True

    account = types.SimpleNamespace(nickname="stub")  # what the access log reads
    attempts, usage = 1, None


class ScriptedChat:
    def __init__(self, model=None):
        self.model, self.exchanges = model, []
        self.router = ip.Router(ip.AccountRegistry("/nonexistent"), ip.Config(home="/x"))
        self.token_estimates = ip.estimate_tokens

    def exchange(self, request, conversation, cancelled=None):
        self.exchanges.append(ScriptedExchange(request, self.model))
        return self.exchanges[-1]

    def claude_defaults(self):
        return ip.DEFAULT_CLAUDE_MODELS

    def count_class(self, request_class):
        pass

    def resolve(self, requested):
        return (None,) + ip.resolve_model(requested, ip.Config(home="/x"))

    def status(self, listen, client_key=None):
        return {"listen": listen}


class SocketlessServer:
    """What ProxyHandler needs of its server: config, chat, the budget, no-op watches."""

    def __init__(self, config=None, chat=None, **overrides):
        self.config = (config or ip.Config(home="/x")).replace(**overrides)
        self.chat = chat or ScriptedChat()
        self.bodies = ip.BodyBudget(self.config.max_inflight_body_bytes)
        self.limits = ip.ClientLimits(usage=None)
        self.server_address = ("127.0.0.1", 11450)
        self.url = "http://127.0.0.1:11450"

    def watch(self, *args):
        pass

    watch_client = set_idle = watch_silence = watch

    def request_started(self):
        pass

    request_finished = request_started

    access_log = None  # access lines written at once

    def request_id(self):
        return "req_socketless"

    def http_date(self):
        return "Mon, 23 Nov 2026 00:00:00 GMT"


def drive_raw(raw, server=None, address=("127.0.0.1", 40000)):
    """Run ProxyHandler over one connection's bytes; the bytes it wrote back."""
    handler = ip.ProxyHandler.__new__(ip.ProxyHandler)
    handler.server = server or SocketlessServer()
    handler.client_address = address
    handler.connection = StubConnection()
    handler.timeouts = ip.Timeouts(handler.connection)
    handler.rfile = io.BufferedReader(io.BytesIO(raw))
    handler.wfile = io.BytesIO()
    handler.requests_served = 0
    handler.handle()
    return handler.wfile.getvalue()


def drive(raw, server=None):
    """Run ProxyHandler over one connection's bytes; the list of (status, headers, body)."""
    replies, data = [], drive_raw(raw, server)
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        size = int(headers.get("Content-Length", 0))
        replies.append((int(lines[0].split()[1]), headers, data[:size]))
        data = data[size:]
    return replies


def req(method, path, body=b"", **headers):
    """Raw request bytes (Host 127.0.0.1 and, with a body, JSON type and length, by default)."""
    head = {"Host": "127.0.0.1"}
    if body:
        head.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
    head.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = ["%s %s HTTP/1.1" % (method, path)] + ["%s: %s" % kv for kv in head.items()
                                                   if kv[1] is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_socketless_keep_alive_chat_and_models():
    body = json.dumps(CHAT).encode()
    replies = drive(req("POST", "/v1/chat/completions", body) + req("GET", "/healthz"))
    assert [r[0] for r in replies] == [200, 200]
    assert json.loads(replies[0][2])["choices"][0]["message"]["content"] == "ok"


def test_socketless_request_line_edge_cases():
    """The request loop (ours, not http.server's): an over-long request line is 414, an
    unknown method 405 in JSON, Expect: 100-continue gets its interim answer first."""
    status, headers, body = drive(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")[0]
    assert status == 414 and headers["Connection"] == "close" and json.loads(body)["error"]
    status, _, body = drive(b"BREW /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0]
    assert status == 405 and "BREW" in json.loads(body)["error"]["message"]
    handler_bytes = req("POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                        Expect="100-continue")
    out = drive_raw(handler_bytes)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")


def test_early_errors_never_leave_the_body_to_be_read_as_a_request():
    """After a 404/405/401 the unread body used to be parsed as the next request (desync)."""
    body = json.dumps(dict(CHAT, input="x" * 500)).encode()
    replies = drive(req("POST", "/v1/embeddings", body) + req("DELETE", "/healthz", body)
                    + req("GET", "/healthz"))
    assert [r[0] for r in replies] == [404, 405, 200]
    keyed = SocketlessServer(client_keys=("ck-1",))
    replies = drive(req("POST", "/v1/chat/completions", body) + req(
        "POST", "/v1/chat/completions", body, Authorization="Bearer ck-1"), keyed)
    assert [r[0] for r in replies] == [401, 200]
    # a body too large to drain closes the connection instead
    big = b"{" + b" " * (ip.DRAIN_LIMIT + 10) + b"}"
    replies = drive(req("POST", "/v1/nothing", big) + req("GET", "/healthz"))
    assert [r[0] for r in replies] == [404] and replies[0][1]["Connection"] == "close"


@pytest.mark.parametrize("framing", [
    {"Transfer_Encoding": "chunked", "Content_Length": "5"},   # TE and CL together
    {"Transfer_Encoding": "xchunked"},
    {"Transfer_Encoding": "gzip, chunked"},
    {"Content_Length": "+5"}, {"Content_Length": "²"},         # not ASCII digits
])
def test_ambiguous_framing_is_refused_and_closes(framing):
    raw = req("POST", "/v1/chat/completions", **framing) + b"0\r\n\r\n" + req("GET", "/healthz")
    replies = drive(raw)
    assert [r[0] for r in replies] == [400] and replies[0][1]["Connection"] == "close"
    assert json.loads(replies[0][2])["error"]["code"] == "bad_framing"


def test_two_transfer_encoding_headers_are_read_together():
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked"
           b"\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n")
    assert [r[0] for r in drive(raw)] == [400]


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:11450", 200), ("localhost:11450", 200), ("[::1]:11450", 200),
    ("10.1.2.3:11450", 200), ("app.localhost", 200), ("evil.example:11450", 403),
    ("evil.example", 403), ("proxy.internal", 200)])
def test_host_header_is_checked_against_dns_rebinding(host, status):
    server = SocketlessServer(allowed_hosts=("proxy.internal",))
    replies = drive(req("GET", "/healthz", Host=host), server)
    assert replies[0][0] == status
    if status == 403:
        assert json.loads(replies[0][2])["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "https://evil.example", "Content_Type": "text/plain"}, 403),
    ({"Origin": "https://evil.example"}, 403),
    ({"Sec_Fetch_Site": "cross-site"}, 403), ({"Sec_Fetch_Site": "same-site"}, 403),
    ({"Origin": "null"}, 403),
    ({"Content_Type": "text/plain"}, 415), ({"Content_Type": "application/x-www-form-urlencoded"}, 415),
    ({"Content_Type": "multipart/form-data; boundary=x"}, 415),
    ({"Origin": "http://127.0.0.1", "Sec_Fetch_Site": "same-origin"}, 200),
    ({"Content_Type": "application/json; charset=utf-8"}, 200),
    ({"Origin": "https://app.example", "Sec_Fetch_Site": "cross-site"}, 200),  # configured
    ({"Sec_Fetch_Site": "none"}, 200), ({}, 200)])
def test_cross_site_requests_are_refused(headers, status):
    server = SocketlessServer(allowed_origins=("https://app.example",))
    replies = drive(req("POST", "/v1/chat/completions", json.dumps(CHAT).encode(), **headers),
                    server)
    assert replies[0][0] == status, replies[0][2]


def test_dashboard_and_healthz_stay_reachable_from_links():
    for path in ("/", "/healthz"):
        assert drive(req("GET", path, Sec_Fetch_Site="cross-site"))[0][0] == 200


@pytest.mark.parametrize("model", ["glm\r\nAccess-Control-Allow-Origin: *", "a\x00b", "x" * 300,
                                   "m\x1b[2J", " "])
def test_bad_model_names_are_400(model):
    body = json.dumps(dict(CHAT, model=model)).encode()
    for path in ("/v1/chat/completions", "/v1/messages"):
        status, _h, data = drive(req("POST", path, body))[0]
        assert status == 400 and b"model" in data


def test_non_ascii_model_name_is_escaped_in_headers():
    chat = ScriptedChat(model="模型-2")
    body = json.dumps(dict(CHAT, model="alias")).encode()
    status, headers, _ = drive(req("POST", "/v1/chat/completions", body),
                               SocketlessServer(chat=chat))[0]
    assert status == 200 and headers["x-iflow-proxy-model"] == "%E6%A8%A1%E5%9E%8B-2"


@pytest.mark.parametrize("raw_body", [b'{"model": "glm-4.6", "messages": [{"role": "user", '
                                      b'"content": "\\ud83d"}]}',
                                      b'{"model": "glm-4.6", "temperature": 1e999, "messages": '
                                      b'[{"role": "user", "content": "hi"}]}'])
def test_lone_surrogates_and_infinite_numbers_are_400(raw_body):
    for path in ("/v1/chat/completions", "/v1/messages"):
        status, _h, data = drive(req("POST", path, raw_body))[0]
        assert status == 400, data


def test_access_log_escapes_control_characters(caplog):
    ip.log.propagate = True
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(ip.EscapingFormatter("%(message)s"))
    ip.log.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="iflow_proxy"):
            drive(b"GET /v1/\x1b[31mRED\x1b[0m/\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            body = json.dumps(dict(CHAT, model="evil\u2028name\x85")).encode()
            drive(req("POST", "/v1/chat/completions", body))
    finally:
        ip.log.removeHandler(handler)
    written = handler.stream.getvalue()
    assert "\x1b" not in written and "\x07" not in written and "\\x1b[31mRED" in written
    assert "\x85" not in written and len(written.strip().splitlines()) >= 2


def test_access_line_fast_path_writes_what_logging_would():
    """log_info_line skips the LogRecord, not a character of the line: the same text as
    logger.info through the same formatter, control characters escaped, nothing when the level
    is above INFO, and a plain logger.info for handlers it does not know."""
    logger = logging.getLogger("iflow-proxy-test-fast-path")
    logger.propagate, stream = False, io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ip.EscapingFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ip.log_info_line(logger, "GET /x\x1b[2J\nforged \u2028")
        logger.info("%s", "GET /x\x1b[2J\nforged \u2028")
        fast, slow = stream.getvalue().split("\n")[:2]
        assert fast.split(" ", 2)[2] == slow.split(" ", 2)[2]
        assert fast.split(" ", 2)[2].startswith("INFO GET /x\\x1b[2J\\x0aforged ")
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", fast)
        handler.setFormatter(ip.EscapingFormatter("%(levelname)s|%(message)s"))
        ip.log_info_line(logger, "other format")
        assert stream.getvalue().split("\n")[-2] == "INFO|other format"
        logger.setLevel(logging.WARNING)
        ip.log_info_line(logger, "quiet")
        assert "quiet" not in stream.getvalue()
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("batched", [False, True])
def test_access_lines_from_many_threads_stay_whole_and_in_order(tmp_path, monkeypatch, batched):
    """Lines written without a lock (one write(2) each), or handed to a LineWriter (the
    server's: written in batches by its own thread, whole lines of at most PIPE_BUF bytes a
    write), never interleave, keep each thread's order, and are all there (by close())."""
    # a logger of its own: one that exists already, not propagating, gets pytest's handlers
    logger = logging.Logger("iflow-proxy-test-threads")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(str(tmp_path / "access.log"), encoding="utf-8")
    handler.setFormatter(ip.EscapingFormatter())
    logger.addHandler(handler)
    writes, real_write = [], ip.write_fully
    monkeypatch.setattr(ip, "write_fully", lambda fd, data: (writes.append(bytes(data)),
                                                             real_write(fd, data)))
    # a small backlog: the adding threads write batches too, not only the writer's thread
    writer = ip.LineWriter(interval=0.01, backlog=3000) if batched else None

    def write(n):
        for i in range(200):
            ip.log_info_line(logger, "thread %d line %d %s 模型" % (n, i, "x" * (i % 50)),
                             writer)
    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if writer is not None:
            writer.close()
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = (tmp_path / "access.log").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 1601
    pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO thread (\d) line (\d+) "
                         r"x* 模型\Z")
    seen = {}
    for line in lines[:-1]:
        n, i = map(int, pattern.match(line).groups())
        assert i == seen.get(n, -1) + 1  # each thread's lines in the order it wrote them
        seen[n] = i
    assert all(len(w) <= ip.LineWriter.CHUNK and w.endswith(b"\n") for w in writes)
    assert 1 < len(writes) < 1600 if batched else len(writes) == 1600


def test_line_writer_writes_within_its_interval_without_being_asked(tmp_path):
    path = str(tmp_path / "lines")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    writer = ip.LineWriter(interval=0.02)
    try:
        writer.add(fd, b"first\n")
        deadline = time.monotonic() + 5
        while open(path, "rb").read() != b"first\n":
            assert time.monotonic() < deadline, "the line was never written"
            time.sleep(0.005)
    finally:
        writer.close()
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    writer.add(fd, b"after close\n")  # a request that ends after shutdown: written at once
    os.close(fd)
    assert open(path, "rb").read() == b"first\nafter close\n"
    writer.add(-1, b"to a closed descriptor\n")  # a broken log stream is passed over, as
    writer.flush()                                 # logging does


def test_client_key_compares_the_bytes_that_were_sent():
    server = SocketlessServer(client_keys=("ключ-секрет",))
    raw = req("GET", "/status").replace(b"\r\n\r\n", b"\r\nx-api-key: " +
                                        "ключ-секрет".encode("utf-8") + b"\r\n\r\n")
    assert drive(raw, server)[0][0] == 200
    assert drive(req("GET", "/status", x_api_key="kljuch"), server)[0][0] == 401


def test_body_budget_bounds_bodies_held_at_once():
    budget = ip.BodyBudget(100)
    assert budget.take(60) and not budget.take(50, timeout=0.01)
    budget.give(60)
    assert budget.take(50) and budget.take(50) and budget.held == 100
    assert ip.BodyBudget(0).take(10 ** 12)  # 0 = unlimited
    server = SocketlessServer(max_inflight_body_bytes=10)
    server.bodies.take(10)
    status, headers, _ = drive(req("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
                               server)[0]
    assert status == 503 and headers["Retry-After"] == "1"


# ==================================================================================================
# Hostile upstreams and unlucky clients (issue 11), over real sockets
# ==================================================================================================

BASH_CUT = '{"command": "rm -rf /tmp/x'


def test_cut_tool_call_is_never_complete(home, fake):
    """A Bash call cut mid-string by finish_reason "length" (or by a stream that just ends) is
    reported as cut: max_tokens / an error event, and never a tool_use block to run."""
    add_key_account(home, KEYS[0])
    calls = [{"index": 0, "id": "call_1", "function": {"name": "Bash", "arguments": ""}},
             {"index": 0, "function": {"arguments": BASH_CUT}}]
    body = {"model": "claude-sonnet-4", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "clean up"}]}
    with running(make_config(home, fake)) as server:
        fake.responder = lambda b: {"content": "Cleaning.", "tool_call_chunks": calls,
                                    "finish_reason": "length"}
        status, _, data = request(server, "POST", "/v1/messages", body)
        events = parse_sse(data)
        blocks = check_anthropic_grammar(events)
        assert status == 200 and [b["type"] for b in blocks] == ["text"]
        assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
        assert b"rm -rf" not in data
        status, _, message = post_json(server, "/v1/messages", dict(body, stream=False))
        assert status == 200 and message["stop_reason"] == "max_tokens"
        assert [b["type"] for b in message["content"]] == ["text"]
        # the stream simply ends: an error event, no message_stop, nothing complete
        fake.responder = lambda b: {"content": "Cleaning.", "tool_call_chunks": calls,
                                    "cut": True}
        status, _, data = request(server, "POST", "/v1/messages", body)
        events = parse_sse(data)
        assert events[-1][0] == "error" and "message_stop" not in [e[0] for e in events]
        assert "tool_use" not in data.decode()
        fake.responder = lambda b: {"content": "half an answer", "cut": True}
        status, _, data = request(server, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        payloads = sse_payloads(data)
        assert '"error"' in payloads[-2] and payloads[-1] == "[DONE]"
        assert not any('"finish_reason": "stop"' in p for p in payloads)


def test_split_surrogate_pair_is_joined_and_lone_ones_replaced(home, fake):
    add_key_account(home, KEYS[0])
    body = {"model": "claude-sonnet-4", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "smile"}]}
    with running(make_config(home, fake, client_idle_timeout=5)) as server:
        fake.responder = lambda b: {"content": "ok \ud83d\ude00!", "chunk": 4}  # splits the pair
        status, _, data = request(server, "POST", "/v1/messages", body)
        blocks = check_anthropic_grammar(parse_sse(data))
        assert status == 200 and blocks[0]["text"] == "ok \U0001F600!"
        fake.responder = lambda b: {"content": "lone \ud83d here"}
        status, _, message = post_json(server, "/v1/messages", dict(body, stream=False))
        assert status == 200 and message["content"][0]["text"] == "lone \ufffd here"
        status, _, data = request(server, "POST", "/v1/messages", body)
        assert check_anthropic_grammar(parse_sse(data))[0]["text"] == "lone \ufffd here"


def test_client_leaving_while_upstream_is_silent_frees_the_slot(home, fake):
    add_key_account(home, KEYS[0])
    fake.hold = threading.Event()
    with running(make_config(home, fake)) as server:
        sock = socket.create_connection(server.server_address)
        sock.sendall(http_bytes("POST", "/v1/chat/completions",
                                json.dumps(dict(CHAT, stream=True)).encode()))
        account = server.chat.router.all_accounts()[0]
        wait_for(lambda: server.chat.router.in_flight(account) == 1, what="request upstream")
        sock.close()  # upstream says nothing yet: the proxy must notice anyway
        wait_for(lambda: server.chat.router.in_flight(account) == 0, timeout=5,
                 what="the slot to be freed")
        fake.hold.set()
        # the fake (like iFlow) answers 449 while it still counts the abandoned request
        wait_for(lambda: not any(fake.inflight.values()), what="the fake done with it")
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200


def test_upstream_error_text_is_scrubbed_of_keys(home, fake, tmp_path):
    add_key_account(home, KEYS[0])
    log_file = tmp_path / "proxy.log"
    config = make_config(home, fake, log_file=str(log_file))
    ip.setup_logging(config, stream=io.StringIO())
    try:
        with running(config) as server:
            fake.responder = None
            echo = {"error": {"message": "Incorrect API key provided: %s. Also sk-other-"
                              "abcdefghijklmnop." % KEYS[0]}}
            fake.push(KEYS[0], ("reply", (401, echo)))
            status, _, body = post_json(server, "/v1/chat/completions", CHAT)
            status_doc = json.dumps(server.chat.status(server.url))
        seen = json.dumps(body) + status_doc + log_file.read_text() + \
            open(os.path.join(home, "accounts.json")).read()
        assert status == 503 and "Incorrect API key" in json.dumps(body)
        assert KEYS[0] not in seen and "sk-other-abcdefghijklmnop" not in seen
    finally:
        ip.log.handlers[:] = []


def test_tables_stay_bounded_whatever_models_clients_invent(tmp_path):
    router = ip.Router(ip.AccountRegistry(str(tmp_path)), ip.Config(home=str(tmp_path)),
                       clock=FakeClock())
    account = ip.Account(id="a1", nickname="a", kind="api-key", api_key="k")
    error = ip.UpstreamError("model_unsupported", "no")
    for i in range(3000):
        router.record_failure(account, "model-%d" % i, error)
    assert len(router._cooldowns) <= ip.MAX_COOLDOWNS
    book = ip.UsageBook(str(tmp_path / "usage.json"))
    for i in range(3000):
        book.record("a", "model-%d" % i, 404, None, 1.0)
    rows = book.summary()["today"]["rows"]
    assert len(rows) <= ip.MAX_USAGE_ROWS + 1
    assert any(r["model"] == ip.OTHER_MODELS and r["requests"] > 2000 for r in rows)


@pytest.mark.parametrize("event, fragment", [
    (b"data: not json\n\n", "not a JSON"), (b"data: {\"choices\": [], \"x\": \"\xff\"}\n\n", ""),
    (b'data: {"error": {"message": "bad \xff key sk-abcdefghijklmnopq", "code": 429}}\n\n',
     "bad"), (b"data: [1, 2]\n\n", "")])
def test_reader_checks_every_stream_event(event, fragment):
    """Non-JSON events, invalid UTF-8 and errors are never relayed as they are; an error event
    whose text is not UTF-8 is still classified (429 here), with keys scrubbed."""
    first = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
    answer = stream_answer(first, event, b"data: [DONE]\n\n")
    with pytest.raises(ip.UpstreamError) as e:
        list(answer.chunks())
    assert fragment in e.value.message and "abcdefghijklmnopq" not in e.value.message
    if b"429" in event:
        assert e.value.kind == "rate_limit"


def test_event_splitter_is_linear_and_capped():
    splitter = ip.EventSplitter(limit=1 << 20)
    for _ in range(15):  # a long event arriving in many small reads
        assert splitter.feed(b"x" * 65536) == []
    assert len(splitter._parts) == 15  # kept as pieces, not re-joined on every read
    with pytest.raises(ip.UpstreamError) as e:
        splitter.feed(b"x" * 65536 * 2)
    assert "exceeded" in e.value.message


def test_huge_upstream_event_ends_the_answer_with_an_error(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        fake.responder = lambda b: {"content": "a" + "x" * (ip.MAX_EVENT_BYTES + 10),
                                    "chunk": ip.MAX_EVENT_BYTES + 100}
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, stream=True))
        assert status == 502 and "exceeded" in body["error"]["message"]


def test_non_stream_network_error_fails_over_or_is_a_clean_error(home, fake, clock):
    add_key_account(home, KEYS[0], nickname="one")
    add_key_account(home, KEYS[1], nickname="two")
    fake.responder = lambda b: {"content": "", "finish_reason": "network_error"}
    with running(make_config(home, fake, strategy="fill-first"), router_clock=clock) as server:
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 502 and "network_error" in body["error"]["message"]
        assert len(fake.chat_requests()) == 2  # both accounts tried before the error
        fake.responder = None
        clock.advance(61)  # past the cooldown those failures earned
        fake.push(KEYS[0], ("network_error_json", None))  # the default account, tried first
        fake.requests.clear()
        status, _, body = post_json(server, "/v1/chat/completions", conversation(7))
        assert status == 200 and body["choices"][0]["message"]["content"].startswith("echo:")
        assert [r[3] for r in fake.chat_requests()] == [KEYS[0], KEYS[1]]


def test_streams_cut_at_shutdown_get_an_error_event_and_usage(home, fake):
    add_key_account(home, KEYS[0])
    fake.gate = threading.Event()
    fake.responder = lambda b: {"content": "x" * 40, "chunk": 4}
    server = ip.start_server(make_config(home, fake))
    try:
        resp = open_anthropic_stream(server, "hi")
        first = resp.read1(65536)
        assert b"message_start" in first
        server.stop_streams(grace=5)
        rest = resp.read()
        assert b"event: error" in rest and b"shutting down" in rest
        rows = server.chat.usage.summary()["today"]["rows"]
        assert rows and rows[0]["failures"] == {"502": 1}
    finally:
        fake.gate.set()
        server.shutdown()
        server.server_close()


def test_log_file_never_changes_an_existing_directory(tmp_path, home):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    config = make_config(home, log_file=str(shared / "p.log"))
    err = io.StringIO()
    ip.setup_logging(config, stream=err)
    try:
        ip.log.warning("hello")
    finally:
        for h in ip.log.handlers:
            h.close()
        ip.log.handlers[:] = []
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(shared / "p.log").st_mode) == 0o600
    loose = shared / "loose.log"
    loose.write_text("")
    os.chmod(loose, 0o644)
    ip.setup_logging(config.replace(log_file=str(loose)), stream=err)
    for h in ip.log.handlers:
        h.close()
    ip.log.handlers[:] = []
    assert "readable by other users" in err.getvalue()
    new_dir = tmp_path / "made" / "logs"
    ip.setup_logging(config.replace(log_file=str(new_dir / "x.log")), stream=err)
    for h in ip.log.handlers:
        h.close()
    ip.log.handlers[:] = []
    assert stat.S_IMODE(os.stat(new_dir).st_mode) == 0o700


def test_client_keys_file_and_loose_config_warning(home, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nck-from-file-1\n\nck-from-file-2\n")
    os.chmod(keys, 0o600)
    config = make_config(home, env={"IFLOW_PROXY_CLIENT_KEYS_FILE": str(keys)})
    assert [k.key for k in config.client_keys] == ["ck-from-file-1", "ck-from-file-2"]
    assert ip.loose_permission_warnings(config) == []
    write_config(home, {"client_keys": ["ck-in-config"]})
    os.chmod(os.path.join(home, "config.json"), 0o644)
    warnings = ip.loose_permission_warnings(make_config(home))
    assert len(warnings) == 1 and "chmod 600" in warnings[0]
    assert "IFLOW_PROXY_CLIENT_KEYS" in ip.build_parser()._subparsers._group_actions[0] \
        .choices["serve"].format_help()


def test_rotated_refresh_token_is_saved_before_user_info(home, fake, oauth):
    config = oauth_config(home, fake, oauth)
    entry = oauth_account(home, config, oauth, clock_now=time.time())
    registry = ip.AccountRegistry(home)
    refresher = ip.Refresher(registry, config, clock=lambda: time.time() + 1801,
                             sleep=lambda s: None)
    oauth.userinfo_down = True  # the second call fails (or the process dies) after rotation
    assert refresher.refresh(entry["id"]) is False
    saved = registry.read_credentials(entry)
    assert saved["refresh_token"] in oauth.refresh_valid  # the live one, not the retired one
    oauth.userinfo_down = False
    assert refresher.refresh(entry["id"], force=True) is True


# ==================================================================================================
# The router without sockets: queue order, strategies, cooldowns on an injected clock
# ==================================================================================================

def pool_router(tmp_path, n=3, clock=None, **config):
    accounts = [ip.Account(id="p%d" % i, nickname="k%d" % i, kind="pool", api_key="sk-%d" % i,
                           default=i == 0) for i in range(n)]
    registry = ip.AccountRegistry(str(tmp_path), pool=accounts)
    return ip.Router(registry, ip.Config(home=str(tmp_path)).replace(**config),
                     clock=clock or FakeClock())


def test_router_queue_is_first_come_first_served(tmp_path):
    router = pool_router(tmp_path, n=1, queue_timeout=30)
    held = router.acquire("m")
    order, threads = [], []
    for name in ("second", "third"):
        def wait(name=name):
            account = router.acquire("m")
            order.append(name)
            router.release(account)
        threads.append(threading.Thread(target=wait))
        threads[-1].start()
        wait_for(lambda n=len(threads): router.waiting() == n, what="%s queued" % name)
    router.release(held)
    for thread in threads:
        thread.join(10)
    assert order == ["second", "third"] and router.waiting() == 0


def test_router_queue_times_out_and_leaves_when_cancelled(tmp_path):
    router = pool_router(tmp_path, n=1, queue_timeout=0.2)
    held = router.acquire("m")
    with pytest.raises(ip.RateLimited):
        router.acquire("m")
    router.config = router.config.replace(queue_timeout=30)
    with pytest.raises(ip.ClientGone):
        router.acquire("m", cancelled=lambda: True)
    assert router.waiting() == 0
    router.release(held)


def test_router_strategies_and_priority(tmp_path):
    router = pool_router(tmp_path, max_concurrency=0)
    picks = [router.acquire("m").nickname for _ in range(4)]
    assert picks == ["k0", "k1", "k2", "k0"]  # round-robin
    router = pool_router(tmp_path, max_concurrency=0, strategy="fill-first")
    assert {router.acquire("m").nickname for _ in range(3)} == {"k0"}
    router = pool_router(tmp_path, max_concurrency=0, strategy="least-busy")
    first = router.acquire("m")
    assert router.acquire("m").id != first.id
    router = pool_router(tmp_path, max_concurrency=0)
    router.registry.pool = tuple(a.replace(priority=5 if a.id == "p2" else 0)
                                 for a in router.registry.pool)
    assert {router.acquire("m").nickname for _ in range(3)} == {"k2"}


def test_router_cooldowns_follow_the_injected_clock(tmp_path):
    clock = FakeClock()
    router = pool_router(tmp_path, n=1, clock=clock)
    account = router.all_accounts()[0]
    limited = ip.UpstreamError("rate_limit", "slow down")
    for expected in (1, 2, 4):  # exponential without Retry-After
        router.record_failure(account, "m", limited)
        assert router.cooling_until(account, "m") - clock() == expected
    router.record_success(account, "m")
    router.record_failure(account, "m", limited)
    assert router.cooling_until(account, "m") - clock() == 1  # success resets the strikes
    router.record_failure(account, "m", ip.UpstreamError("rate_limit", "x", retry_after=7))
    assert router.cooling_until(account, "m") - clock() == 7
    with pytest.raises(ip.RateLimited) as e:
        router.acquire("m")
    assert e.value.retry_after == 7 and "m" in e.value.message
    assert not router.cooling_until(account, "other")  # per model
    router.record_failure(account, "m2", ip.UpstreamError("concurrency", "449"))
    assert router.cooling_until(account, "anything") - clock() == 3  # account-wide
    clock.advance(8)
    assert not router.cooling_until(account, "m") and router.acquire("m") is not None
    router.record_failure(account, "m", ip.UpstreamError("key_blocked", "blocked"))
    assert router.all_accounts()[0].status == "disabled"


# ==================================================================================================
# Every living provider, in either protocol (issue 12): a strict Anthropic-protocol upstream and
# a DeepSeek-like OpenAI upstream
# ==================================================================================================

ANTHROPIC_FIELDS = {"model", "messages", "system", "max_tokens", "stream", "temperature", "top_p",
                    "top_k", "stop_sequences", "tools", "tool_choice", "metadata", "thinking",
                    "output_config"}
# the content blocks DeepSeek's Anthropic endpoint lists (api-docs.deepseek.com/guides/anthropic_api)
ANTHROPIC_BLOCKS = {"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"}


class FakeAnthropic(FakeServer):
    """A strict Anthropic Messages API: the key as ``auth`` says (x-api-key or Bearer) and an
    anthropic-version header required; unknown request fields, unknown models and max_tokens
    over the model's limit answered 400 invalid_request_error; Anthropic's event grammar;
    scripted 429 (retry-after) / 529 overloaded_error / 401, mid-stream errors and cuts."""

    def __init__(self, keys=("sk-anthropic-1111",), auth="x-api-key",
                 models=("deepseek-flash", "deepseek-v4-flash", "deepseek-v4-pro"),
                 max_output=8192):
        super().__init__(("127.0.0.1", 0), FakeAnthropicHandler)
        self.keys, self.auth, self.models, self.max_output = set(keys), auth, models, max_output
        self.requests, self.script, self.lock = [], [], threading.Lock()
        self.responder = None   # body -> {"text", "thinking", "tool", "stop_reason"}
        self.gate = None        # threading.Event: streams pause after their first text delta
        self.server_tools = ()  # server tool types it runs (DeepSeek's: web_search_20250305)
        self.serve_in_thread()

    @property
    def url(self):
        return "http://127.0.0.1:%d/anthropic" % self.server_address[1]


class FakeAnthropicHandler(QuietHandler):
    def error(self, status, etype, message, headers=None):
        body = json.dumps({"type": "error", "error": {"type": etype, "message": message}})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body.encode())

    def problem(self, body):
        srv = self.server
        key = self.headers.get("x-api-key") if srv.auth == "x-api-key" else \
            (self.headers.get("Authorization") or "")[7:]
        if key not in srv.keys:
            return 401, "authentication_error", "invalid x-api-key"
        if not self.headers.get("anthropic-version"):
            return 400, "invalid_request_error", "anthropic-version header is required"
        unknown = set(body) - ANTHROPIC_FIELDS
        if unknown:
            return 400, "invalid_request_error", "%s: Extra inputs are not permitted" % (
                sorted(unknown)[0])
        if body.get("model") not in srv.models:
            return 404, "not_found_error", "model: %s" % body.get("model")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > srv.max_output:
            return 400, "invalid_request_error", "max_tokens: %s > %d, which is the maximum " \
                "allowed number of output tokens" % (body.get("max_tokens"), srv.max_output)
        thinking = body.get("thinking")
        if thinking is not None and (thinking.get("type") not in ("enabled", "disabled") or
                                     set(thinking) - {"type", "budget_tokens"}):
            return 400, "invalid_request_error", "thinking: type must be enabled or disabled"
        if set(body.get("output_config") or {}) - {"effort"}:  # DeepSeek: "only effort"
            return 400, "invalid_request_error", "output_config: only effort is supported"
        for n, tool in enumerate(body.get("tools") or ()):
            if tool.get("type") not in (None, "custom") + tuple(srv.server_tools) or \
                    tool.get("type") in (None, "custom") and "input_schema" not in tool:
                return 400, "invalid_request_error", "tools.%d: unknown tool type %s" % (
                    n, tool.get("type"))
        messages = body.get("messages") or []
        for m in messages:
            for block in m.get("content") if isinstance(m.get("content"), list) else ():
                if block.get("type") not in ANTHROPIC_BLOCKS:
                    return 400, "invalid_request_error", "messages: unknown content block " \
                        "type %s" % block.get("type")
        if not messages or messages[0].get("role") != "user" or any(
                m.get("role") not in ("user", "assistant") for m in messages) or any(
                a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
            return 400, "invalid_request_error", "messages: roles must alternate, user first"
        return None

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw)
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, dict(self.headers), body))
            action = srv.script.pop(0) if srv.script else None
        if self.path != "/anthropic/v1/messages":
            return self.error(404, "not_found_error", "no route %s" % self.path)
        problem = self.problem(body)
        if problem:
            return self.error(*problem)
        if action == 429:
            return self.error(429, "rate_limit_error", "slow down", {"retry-after": "9"})
        if isinstance(action, dict):  # {"status": 400, "message": "..."}
            return self.error(action["status"], "invalid_request_error", action["message"])
        if action in (529, 401):
            return self.error(action, "overloaded_error" if action == 529 else
                              "authentication_error", "scripted %d" % action)
        message = self.message(body)
        if not body.get("stream"):
            data = json.dumps(message).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        self.stream(message, action)

    def message(self, body):
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(
            b.get("text", "") for b in last if b.get("type") == "text") or json.dumps(last)
        out = (self.server.responder or (lambda b: {"text": "echo: " + text}))(body)
        content = []
        if out.get("thinking"):
            content.append({"type": "thinking", "thinking": out["thinking"], "signature": "s"})
        if out.get("text"):
            content.append({"type": "text", "text": out["text"]})
        if out.get("tool"):
            content.append(dict(out["tool"], type="tool_use", id="toolu_fake_1"))
        return {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
                "content": content, "stop_sequence": None,
                "stop_reason": out.get("stop_reason") or ("tool_use" if out.get("tool")
                                                          else "end_turn"),
                "usage": {"input_tokens": 21, "output_tokens": 7,
                          "cache_read_input_tokens": 3}}

    def stream(self, message, action):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event):
            data = ("event: %s\ndata: %s\n\n" % (event["type"], json.dumps(event))).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        send({"type": "message_start", "message": dict(message, content=[], stop_reason=None,
                                                       usage={"input_tokens": 21,
                                                              "output_tokens": 1})})
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                send({"type": "content_block_start", "index": index,
                      "content_block": {"type": "text", "text": ""}})
                for i in range(0, len(block["text"]), 4):
                    send({"type": "content_block_delta", "index": index,
                          "delta": {"type": "text_delta", "text": block["text"][i:i + 4]}})
                    if i == 0 and self.server.gate is not None:
                        self.server.gate.wait(10)
            elif block["type"] == "thinking":
                send({"type": "content_block_start", "index": index,
                      "content_block": {"type": "thinking", "thinking": ""}})
                send({"type": "content_block_delta", "index": index,
                      "delta": {"type": "thinking_delta", "thinking": block["thinking"]}})
            else:
                args = json.dumps(block["input"])
                send({"type": "content_block_start", "index": index,
                      "content_block": dict(block, input={})})
                for piece in (args[:5], args[5:]):
                    send({"type": "content_block_delta", "index": index,
                          "delta": {"type": "input_json_delta", "partial_json": piece}})
            send({"type": "content_block_stop", "index": index})
            if action == "error":
                send({"type": "error", "error": {"type": "overloaded_error",
                                                 "message": "Overloaded"}})
                break
        else:
            if action != "cut":
                send({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                         "stop_sequence": None},
                      "usage": {"output_tokens": 7}})
                send({"type": "message_stop"})
        self.end_chunked()


@pytest.fixture
def anthropic_fake():
    yield from serving(FakeAnthropic())


def add_provider_account(home, key, provider, protocol, base_url, nickname=None):
    registry = ip.AccountRegistry(home)
    entry, _ = registry.upsert("key:%s:%s/%s" % (ip.fingerprint(key), provider, protocol),
                               "api-key", {"api_key": key}, nickname=nickname,
                               settings={"provider": provider, "protocol": protocol,
                                         "base_url": base_url, "signing": False})
    return entry


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "description": "Weather.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_providers_and_models_commands(home, anthropic_fake):
    code, out, _ = run_cli("providers", home=home)
    assert code == 0 and "https://api.deepseek.com/anthropic" in out and "deepseek-v4-flash (1M)" in out
    code, out, _ = run_cli("providers", "--json", home=home)
    deepseek = next(p for p in json.loads(out) if p["name"] == "deepseek")
    assert deepseek["openai"] == "https://api.deepseek.com" and deepseek["models"][0]["window"]
    code, out, err = run_cli("login", "--api-key", "--provider", "deepseek", "--protocol",
                             "anthropic", "--base-url", anthropic_fake.url, home=home,
                             stdin="sk-anthropic-1111\n")
    assert code == 0 and "on deepseek (anthropic)" in out and "verified" in out, err
    code, out, _ = run_cli("login", "--api-key", "--provider", "deepseek", "--no-verify",
                           home=home, stdin="sk-anthropic-1111\n")
    listed = json.loads(run_cli("accounts", "--json", home=home)[1])
    assert [(a["nickname"], a["provider"], a["protocol"], a["base_url"]) for a in listed] == [
        ("deepseek-anthropic", "deepseek", "anthropic", anthropic_fake.url),
        ("deepseek", "deepseek", "openai", "https://api.deepseek.com")]
    code, out, _ = run_cli("models", home=home)
    assert code == 0 and re.search(r"deepseek-v4-pro\s+deepseek\s+1M", out)
    rows = json.loads(run_cli("models", "--json", home=home)[1])
    assert {r["id"] for r in rows} == set(ip.PROVIDERS["deepseek"].models)
    for argv, fragment in ((("--provider", "nope"), "the presets are: iflow, deepseek"),
                           (("--provider", "iflow", "--protocol", "anthropic"),
                            "no anthropic endpoint")):
        code, _, err = run_cli("login", "--api-key", "--no-verify", *argv, home=home,
                               stdin="sk-whatever-key\n")
        assert code == 2 and fragment in err, err
    code, _, err = run_cli("login", "--api-key", "--protocol", "smtp", home=home, stdin="k\n")
    assert code == 2 and "invalid choice" in err


def test_openai_client_through_an_anthropic_protocol_upstream(home, anthropic_fake):
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url)
    body = {"model": "deepseek-v4-flash", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "user", "content": "and tomorrow?"}],
        "tools": [WEATHER_TOOL], "tool_choice": "required", "stop": ["END"], "max_tokens": 99999}
    anthropic_fake.responder = lambda b: {"thinking": "hmm", "tool": {
        "name": "weather", "input": {"city": "Oslo", "day": 2}}}
    with running(make_config(home)) as server:
        status, headers, answer = post_json(server, "/v1/chat/completions", body)
        sent = anthropic_fake.requests[-1][2]
        # within the table's 393216, refused by upstream (max 8192), learnt, retried once
        assert [r[2]["max_tokens"] for r in anthropic_fake.requests] == [99999, 8192]
        assert status == 200 and sent["system"] == "Be brief."
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
        assert sent["messages"][2]["content"][0] == {"type": "tool_result",
                                                     "tool_use_id": "call_1", "content": "rain"}
        assert sent["tool_choice"] == {"type": "any"} and sent["stop_sequences"] == ["END"]
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"][
            "reasoning_content"] == "hmm"
        call = choice["message"]["tool_calls"][0]
        assert call["function"]["name"] == "weather" and json.loads(
            call["function"]["arguments"]) == {"city": "Oslo", "day": 2}
        assert answer["usage"]["prompt_tokens"] == 24 and answer["usage"][
            "completion_tokens"] == 7
        status, _, data = request(server, "POST", "/v1/chat/completions", dict(body, stream=True),
                                  {"Content-Type": "application/json"})
        payloads = sse_payloads(data)
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert payloads[-1] == "[DONE]"
        args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                       for c in chunks if c["choices"] and c["choices"][0]["delta"].get(
                           "tool_calls"))
        assert json.loads(args) == {"city": "Oslo", "day": 2}
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == \
            "tool_calls"
        assert chunks[-1]["usage"]["completion_tokens"] == 7
        assert anthropic_fake.requests[-1][2]["max_tokens"] == 8192  # learnt: no second try
        assert len(anthropic_fake.requests) == 3


def test_anthropic_client_passes_through_an_anthropic_upstream(home, anthropic_fake):
    """Model mapped (the only provider's Claude mapping), fields the upstream rejects removed,
    events relayed one by one as they arrive, errors feeding cooldowns and failover."""
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="one")
    request_body = {"model": "claude-sonnet-4-5", "max_tokens": 128000, "stream": True,
                    "context_management": {"edits": []}, "messages": [
                        {"role": "user", "content": "hello there"}]}
    anthropic_fake.gate = threading.Event()
    with running(make_config(home)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("POST", "/v1/messages", json.dumps(request_body),
                     {"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
        resp = conn.getresponse()
        received = b""
        while b"text_delta" not in received:  # upstream waits at its gate meanwhile
            piece = resp.read1(65536)
            assert piece, received  # (the answer ended without any text)
            received += piece
        anthropic_fake.gate.set()
        received += resp.read()
        conn.close()
        sent = anthropic_fake.requests[-1][2]
        assert sent["model"] == "deepseek-flash" and "context_management" not in sent
        assert sent["max_tokens"] == 8192
        events = parse_sse(received)
        assert [b["text"] for b in check_anthropic_grammar(events)] == ["echo: hello there"]
        assert resp.headers["x-iflow-proxy-model"] == "deepseek-flash"
        status, _, message = post_json(server, "/v1/messages", dict(request_body, stream=False),
                                       {"anthropic-version": "2023-06-01"})
        assert status == 200 and message["id"] == "msg_fake" and message["usage"][
            "cache_read_input_tokens"] == 3
        anthropic_fake.script[:] = [529]
        status, _, error = post_json(server, "/v1/messages", dict(request_body, stream=False),
                                     {"anthropic-version": "2023-06-01"})
        assert status == 502 and error["error"]["type"] == "api_error"
        account = server.chat.router.all_accounts()[0]
        assert server.chat.router.cooling_until(account, "deepseek-flash")


def test_model_of_another_provider_is_not_sent_and_fails_over_across_protocols(
        home, fake, anthropic_fake, clock):
    fake.models, fake.signing = ["deepseek-v4-flash", "deepseek-v4-pro"], False
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="anth")
    add_provider_account(home, KEYS[0], "deepseek", "openai", fake.url + "/v1", nickname="oai")
    with running(make_config(home, strategy="fill-first"), router_clock=clock) as server:
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, model="glm-4.6"))
        assert status == 404 and "iflow, zhipu, zai" in body["error"]["message"]
        assert not fake.requests and not anthropic_fake.requests
        anthropic_fake.script[:] = [429]  # the first account (anthropic) says later...
        status, _, body = post_json(server, "/v1/chat/completions",
                                    dict(CHAT, model="deepseek-v4-flash"))
        assert status == 200 and body["choices"][0]["message"]["content"] == "echo: hi"
        assert len(anthropic_fake.requests) == 1 and len(fake.chat_requests()) == 1
        anth = next(a for a in server.chat.router.all_accounts() if a.nickname == "anth")
        assert server.chat.router.cooling_until(anth, "deepseek-v4-flash") - clock() == 9
        # ...and an Anthropic client is answered by the OpenAI-protocol account meanwhile
        status, _, message = post_json(server, "/v1/messages", {
            "model": "claude-opus-4", "max_tokens": 50, "messages": [
                {"role": "user", "content": "new topic"}]}, {"anthropic-version": "2023-06-01"})
        assert status == 200 and message["content"][0]["text"] == "echo: new topic", message
        assert anthropic_fake.requests[-1][2]["model"] == "deepseek-v4-pro", \
            [r[2]["model"] for r in fake.chat_requests()]  # opus, mapped


def test_fallback_chain_in_both_formats(home, fake, clock):
    add_provider_account(home, KEYS[0], "deepseek", "openai", fake.url + "/v1")
    fake.models, fake.signing = ["deepseek-v4-flash"], False  # v4-pro: 435, cooled 10 min
    config = make_config(home, model_fallbacks={"deepseek-v4-pro": ["deepseek-v4-flash"]})
    with running(config, router_clock=clock) as server:
        for stream in (False, True):
            status, headers, data = request(server, "POST", "/v1/chat/completions", dict(
                CHAT, model="deepseek-v4-pro", stream=stream),
                {"Content-Type": "application/json"})
            assert status == 200 and headers["x-iflow-proxy-model"] == "deepseek-v4-flash"
            assert b"echo" in data
            status, headers, data = request(server, "POST", "/v1/messages", {
                "model": "deepseek-v4-pro", "max_tokens": 50, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]},
                {"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
            assert status == 200 and headers["x-iflow-proxy-model"] == "deepseek-v4-flash"
    write_config(home, {"model_fallbacks": {"a": "b"}})
    with pytest.raises(ip.ConfigError) as e:
        ip.load_config(home, {}, {})
    assert "model_fallbacks" in e.value.message
    write_config(home, {"model_fallbacks": {"a": ["a"]}})
    with pytest.raises(ip.ConfigError) as e:
        ip.load_config(home, {}, {})
    assert "itself" in e.value.message


def test_claude_families_follow_the_only_provider():
    deepseek = ip.Account(id="d", nickname="d", kind="api-key", api_key="k", provider="deepseek",
                          signing=False)
    iflow = ip.Account(id="i", nickname="i", kind="api-key", api_key="k")
    assert ip.claude_families([deepseek], {})["opus"] == "deepseek-v4-pro"
    assert ip.claude_families([deepseek, iflow], {})["opus"] == "glm-4.6"
    assert ip.claude_families([deepseek], {"opus": "x"})["opus"] == "x"
    assert ip.map_claude_model("claude-haiku-4-5", {}, ip.claude_families([deepseek], {})) == \
        "deepseek-flash"


def deepseek_fake(fake):
    fake.signing, fake.models = False, ["deepseek-v4-flash", "deepseek-v4-pro"]
    fake.max_output, fake.require_reasoning = 8192, True
    return fake


def test_deepseek_reasoning_passback_and_output_range(home, fake):
    """OpenAI clients drop reasoning_content; DeepSeek's thinking mode answers 400 without it.
    The proxy puts back what it relayed (stream and not), and learns the max_tokens range."""
    deepseek_fake(fake)
    add_provider_account(home, KEYS[0], "deepseek", "openai", fake.url + "/v1")
    call = {"index": 0, "id": "call_w1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    with running(make_config(home)) as server:
        for stream in (False, True):
            fake.responder = lambda b: {"content": "", "reasoning_chunks": ["Need the ",
                                                                            "weather."],
                                        "tool_call_chunks": [dict(call, id="call_%s" % stream)]}
            first = dict(CHAT, model="deepseek-v4-flash", tools=[WEATHER_TOOL], stream=stream,
                         max_tokens=50000)
            status, _, data = request(server, "POST", "/v1/chat/completions", first,
                                      {"Content-Type": "application/json"})
            assert status == 200 and b"call_%s" % str(stream).encode() in data
            fake.responder = None
            follow = dict(first, stream=False, messages=CHAT["messages"] + [
                {"role": "assistant", "content": None, "tool_calls": [dict(
                    call, id="call_%s" % stream)]},  # the client dropped reasoning_content
                {"role": "tool", "tool_call_id": "call_%s" % stream, "content": "rain"}])
            status, _, body = post_json(server, "/v1/chat/completions", follow)
            assert status == 200, body
            sent = fake.chat_requests()[-1][2]["messages"][1]
            assert sent["reasoning_content"] == "Need the weather."
        # max_tokens 50000 was refused once, then sent as 8192 from there on
        asked = [r[2].get("max_tokens") for r in fake.chat_requests()]
        assert asked[0] == 50000 and set(asked[1:]) == {8192}


def test_both_sdks_through_an_anthropic_protocol_account(home, anthropic_fake):
    openai, anthropic = sdk("openai"), sdk("anthropic")
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url)
    anthropic_fake.responder = lambda b: {"text": "Hello from an Anthropic upstream",
                                          "thinking": "a thought"}
    with running(make_config(home)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="deepseek-v4-flash",
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello from an Anthropic upstream"
        stream = client.chat.completions.create(model="deepseek-v4-flash", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            "Hello from an Anthropic upstream"
        claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
        message = claude.messages.create(model="claude-opus-5-5", max_tokens=100, messages=[
            {"role": "user", "content": "hi"}])
        assert [b.type for b in message.content] == ["thinking", "text"]
        with claude.messages.stream(model="claude-opus-5-5", max_tokens=100, messages=[
                {"role": "user", "content": "hi"}]) as events:
            assert events.get_final_text() == "Hello from an Anthropic upstream"
        anthropic_fake.script[:] = [529]
        with pytest.raises(anthropic.APIStatusError):
            claude.messages.create(model="claude-opus-5-5", max_tokens=100, messages=[
                {"role": "user", "content": "hi"}])


def test_anthropic_upstream_breaking_mid_stream_is_reported(home, anthropic_fake):
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url)
    body = {"model": "deepseek-v4-flash", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}
    with running(make_config(home)) as server:
        for action in ("error", "cut"):
            anthropic_fake.script[:] = [action]
            status, _, data = request(server, "POST", "/v1/messages", body,
                                      {"Content-Type": "application/json"})
            events = parse_sse(data)
            assert status == 200 and events[-1][0] == "error", events[-3:]
            assert "message_stop" not in [e[0] for e in events]
            anthropic_fake.script[:] = [action]
            status, _, data = request(server, "POST", "/v1/chat/completions",
                                      dict(body, stream=True), {"Content-Type":
                                                                "application/json"})
            payloads = sse_payloads(data)
            assert '"error"' in payloads[-2] and payloads[-1] == "[DONE]"


def test_real_claude_code_through_an_anthropic_protocol_account(home, anthropic_fake, tmp_path):
    claude, work = claude_code_project(tmp_path)
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url)

    def respond(body):
        last = body["messages"][-1]["content"]
        results = [b for b in last if isinstance(b, dict) and b.get("type") == "tool_result"] \
            if isinstance(last, list) else []
        if results:
            content = results[0].get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            return {"text": "The file says: " + text}
        if body.get("tools") and "hello.txt" in json.dumps(body["messages"]):
            return {"tool": {"name": "Read", "input": {"file_path": str(work / "hello.txt")}}}
        return {"text": "Hi!"}
    anthropic_fake.responder = respond
    anthropic_fake.max_output = 400000
    with running(make_config(home)) as server:
        out = run_claude_code(claude, server, work, tmp_path)
    sent = [r[2] for r in anthropic_fake.requests]
    assert out.returncode == 0, out.stdout + out.stderr + json.dumps(
        [[(m["role"], [b.get("type") for b in m["content"]] if isinstance(m["content"], list)
           else "str") for m in s["messages"]] for s in sent])
    assert "hello from the file" in out.stdout
    assert all(s["model"] in ("deepseek-v4-flash", "deepseek-v4-pro") for s in sent)
    assert not any("context_management" in s for s in sent)


def test_kimi_thinking_tool_choice_and_provider_thinking_switch():
    kimi = ip.Account(id="k", nickname="k", kind="api-key", api_key="x", provider="moonshot",
                      signing=False)
    body = dict(CHAT, model="kimi-k2.6", tools=[WEATHER_TOOL], tool_choice="required")
    shaped = ip.shape_provider_body(body, "kimi-k2.6", kimi, thinking=True, limit=1000)
    assert shaped["tool_choice"] == "auto" and shaped["thinking"] == {"type": "enabled"}
    assert ip.shape_provider_body(body, "kimi-k2.6", kimi)["tool_choice"] == "required"
    deepseek = kimi.replace(provider="deepseek")
    shaped = ip.shape_provider_body(dict(body, max_tokens=10 ** 6), "deepseek-v4-pro", deepseek,
                                    thinking=False, limit=393216)
    assert shaped["thinking"] == {"type": "disabled"} and shaped["max_tokens"] == 393216
    assert ip.max_tokens_range("Invalid max_tokens value, the valid range of max_tokens is "
                               "[1, 8192]") == 8192


def test_check_names_a_service_that_is_gone(home):
    add_key_account(home, KEYS[0])  # an iFlow account, and iFlow's host does not answer
    env = {"IFLOW_API_BASE": "http://127.0.0.1:9/v1"}
    code, out, _ = run_cli("check", home=home, env=env)
    assert code == 1 and "ended on 2026-04-17" in out and "deepseek" in out


def test_openai_request_translated_for_anthropic_upstreams():
    body = {"model": "m", "max_completion_tokens": 77, "temperature": 0.3, "stop": "STOP",
            "user": "u1", "parallel_tool_calls": False, "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": [
                             {"type": "text", "text": "what is this?"},
                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                 "iVBORw0KGgo="}},
                             {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}
    out = ip.openai_to_anthropic_request(body)
    assert out["system"] == "sys" and out["max_tokens"] == 77 and out["temperature"] == 0.3
    assert out["stop_sequences"] == ["STOP"] and out["metadata"] == {"user_id": "u1"}
    assert out["tool_choice"] == {"type": "tool", "name": "weather",
                                  "disable_parallel_tool_use": True}
    assert out["tools"][0]["input_schema"]["properties"] == {"city": {"type": "string"}}
    blocks = out["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type":
                                                     "image/png", "data": "iVBORw0KGgo="}}
    assert blocks[2]["source"] == {"type": "url", "url": "https://x/y.png"}
    for choice, expected in (("auto", "auto"), ("none", "none"), ("required", "any")):
        assert ip.openai_to_anthropic_request(dict(body, tool_choice=choice, parallel_tool_calls=None))[
            "tool_choice"] == {"type": expected}
    completion = ip.anthropic_message_to_completion({"id": "msg_1", "content": [
        {"type": "text", "text": "cut"}], "stop_reason": "max_tokens",
        "usage": {"input_tokens": 2, "output_tokens": 3}}, "m")
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert ip.alternating_turns([{"role": "user", "content": "a"}, {"role": "system",
                                                                    "content": "note"},
                                 {"role": "user", "content": "b"}]) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {
            "type": "text", "text": "<system-reminder>\nnote\n</system-reminder>"},
            {"type": "text", "text": "b"}]}]


# ==================================================================================================
# Claude Code, first-class (issue 13)
# ==================================================================================================

def test_real_claude_code_through_the_claude_command_believes_the_window(home, fake, tmp_path):
    """`python iflow_proxy.py claude -p …` with the real Claude Code: the window variables are
    set from the provider table, the gateway model list is fetched, no unknown-model warning."""
    claude, work = claude_code_project(tmp_path)
    add_key_account(home, KEYS[0])
    fake.responder = claude_code_responder(str(work))
    seen = tmp_path / "claude-env.json"
    wrapper = tmp_path / "claude-wrapper"
    wrapper.write_text("#!%s\nimport json, os, sys\njson.dump(dict(os.environ), open(%r, 'w'))\n"
                       "os.execv(%r, [%r] + sys.argv[1:])\n" % (sys.executable, str(seen),
                                                                 claude, claude))
    wrapper.chmod(0o755)
    log = tmp_path / "proxy.log"
    env = dict(os.environ, IFLOW_API_BASE=fake.url + "/v1", IFLOW_PROXY_HOME=home,
               IFLOW_PROXY_PORT="1", IFLOW_PROXY_LOG_FILE=str(log), HOME=str(tmp_path / "h"),
               DISABLE_TELEMETRY="1")
    for key in ("CLAUDE_CODE_MAX_CONTEXT_TOKENS", "CLAUDE_CODE_AUTO_COMPACT_WINDOW", "CI"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "claude",
                          "--claude-bin", str(wrapper), "-p", "say hi"], cwd=str(work), env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Hi! How can I help?" in out.stdout
    assert "recognize the model" not in out.stdout + out.stderr
    variables = json.load(open(seen))
    assert variables["ANTHROPIC_MODEL"] == "glm-4.6"
    assert variables["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "200000"
    assert int(variables["CLAUDE_CODE_AUTO_COMPACT_WINDOW"]) < 200000
    assert variables["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] == "1"
    assert "GET /v1/models" in log.read_text()


def test_env_command_sets_the_window_of_the_main_model(home):
    add_provider_account(home, "sk-deepseek-0001", "deepseek", "openai", "http://127.0.0.1:9")
    code, out, _ = run_cli("env", home=home)
    assert "ANTHROPIC_MODEL='deepseek-flash'" in out
    assert "CLAUDE_CODE_MAX_CONTEXT_TOKENS='1048576'" in out
    assert "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY='1'" in out
    code, out, _ = run_cli("env", "--model", "kimi-k2", home=home)
    assert "CLAUDE_CODE_MAX_CONTEXT_TOKENS='128000'" in out  # iFlow's kimi-k2, per the table


def test_model_list_and_probes_for_claude_code(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        for method in ("GET", "HEAD"):
            assert request(server, method, "/api/hello")[0] == 200
        assert request(server, "HEAD", "/")[0] == 200
        status, _, data = request(server, "GET", "/v1/models?limit=1000",
                                  headers={"anthropic-version": "2023-06-01"})
        models = json.loads(data)["data"]
        assert status == 200 and models[0]["id"] == "claude-opus"
        assert models[0]["display_name"] == "Opus → glm-4.6"
        glm = next(m for m in models if m["id"] == "glm-4.6")
        assert "iFlow" in glm["description"] and "200000-token context window" in \
            glm["description"]


def test_llama_cpp_context_error_is_context_length():
    text = ("request (16464 tokens) exceeds the available context size (16384 tokens), try "
            "increasing it")
    assert ip.kind_for(400, text) == "context_length"
    assert ip.too_long_figures(text) == (16464, 16384)
    assert ip.too_long_figures("prompt is too long: 210000 tokens > 200000 maximum") == \
        (210000, 200000)
    assert ip.too_long_figures("nothing here") is None


def test_input_too_long_in_the_words_each_client_acts_on(home, fake):
    """Upstream's "input too long" (iFlow 511 here) reaches Anthropic clients as Claude Code's
    "prompt is too long: N tokens > M maximum" and OpenAI clients as context_length_exceeded;
    a request far over the window is answered that way at once, with no upstream call."""
    add_key_account(home, KEYS[0])
    pattern = re.compile(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)")
    with running(make_config(home, fake)) as server:
        fake.push(KEYS[0], ("business", 511))
        status, _, body = post_json(server, "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [
                {"role": "user", "content": "long story " * 50}]},
            {"anthropic-version": "2023-06-01"})
        found = pattern.search(body["error"]["message"])
        assert status == 400 and body["error"]["type"] == "invalid_request_error" and found
        assert int(found.group(1)) > int(found.group(2)) == 200000
        fake.push(KEYS[0], ("business", 511))
        status, _, body = post_json(server, "/v1/chat/completions", CHAT)
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 200000 tokens" in body["error"]["message"]
        fake.requests.clear()
        huge = "word " * 300000  # about 300K tokens for a 200K window
        status, _, body = post_json(server, "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [
                {"role": "user", "content": huge}]}, {"anthropic-version": "2023-06-01"})
        assert status == 400 and pattern.search(body["error"]["message"])
        status, _, body = post_json(server, "/v1/chat/completions", dict(CHAT, messages=[
            {"role": "user", "content": huge}]))
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert fake.chat_requests() == []  # pre-flight: upstream never asked


def test_main_turns_go_before_background_ones_on_a_one_slot_account(home, fake):
    add_key_account(home, KEYS[0])
    fake.hold = threading.Event()
    order = []
    fake.responder = lambda b: order.append(b["messages"][-1]["content"]) or {"content": "ok"}

    def ask(model, text):
        return post_json(server, "/v1/messages", {"model": model, "max_tokens": 20, "messages": [
            {"role": "user", "content": text}]}, {"anthropic-version": "2023-06-01"})[0]
    with running(make_config(home, fake, queue_timeout=60)) as server:
        first, r1 = in_thread(ask, "claude-sonnet-4-5", "main 1")
        wait_for(lambda: server.chat.router.in_flight(server.chat.router.all_accounts()[0]),
                 what="first request upstream")
        title, r2 = in_thread(ask, "claude-haiku-4-5", "title")
        wait_for(lambda: server.chat.router.waiting() == 1, what="haiku queued")
        second, r3 = in_thread(ask, "claude-opus-4-5", "main 2")
        wait_for(lambda: server.chat.router.waiting() == 2, what="main turn queued")
        fake.hold.set()
        for thread in (first, title, second):
            thread.join(30)
    assert r1 == r2 == r3 == [200]
    assert order == ["main 1", "main 2", "title"]  # the later main turn overtook the title


def test_background_request_ages_and_is_not_starved(tmp_path, monkeypatch):
    monkeypatch.setattr(ip, "BACKGROUND_WAIT", 0.2)
    router = pool_router(tmp_path, n=1, queue_timeout=30)
    held = router.acquire("m")
    got = []
    background, _ = in_thread(lambda: got.append("bg") or router.release(
        router.acquire("m", lane=2)))
    wait_for(lambda: router.waiting() == 1, what="background queued")
    wait_for(lambda: router._queue[0].rank(time.monotonic()) == 0,
             what="the background request to age")
    main, _ = in_thread(lambda: got.append("main") or router.release(router.acquire("m")))
    wait_for(lambda: router.waiting() == 2, what="main queued")
    router.release(held)
    background.join(10)
    main.join(10)
    assert got == ["bg", "main"]  # aged: its place by arrival


def test_token_counts_learn_from_what_upstream_counts(home, fake):
    add_key_account(home, KEYS[0])
    body = {"model": "claude-sonnet-4-5", "max_tokens": 20, "messages": [
        {"role": "user", "content": "Please review this function carefully. " * 40}]}
    estimate = ip.count_request_tokens(body)
    actual = int(estimate * 1.6)  # this model's upstream counts 60 % more (template, tokenizer)
    fake.responder = lambda b: {"content": "ok", "usage": {"prompt_tokens": actual,
                                                           "completion_tokens": 1}}
    with running(make_config(home, fake)) as server:
        counted = post_json(server, "/v1/messages/count_tokens", body)[2]["input_tokens"]
        before = abs(counted - actual) / actual
        for i in range(4):
            assert post_json(server, "/v1/messages", body, {"anthropic-version":
                                                            "2023-06-01"})[0] == 200
        counted = post_json(server, "/v1/messages/count_tokens", body)[2]["input_tokens"]
        after = abs(counted - actual) / actual
        assert after <= before / 2, (before, after)
        factor = server.chat.status(server.url)["token_calibration"]["glm-4.6"]
        assert factor["samples"] == 4 and 1.5 < factor["factor"] < 1.7
        server.chat.save_state()
    reloaded = ip.UsageBook(os.path.join(home, "usage.json")).extra["calibration"]
    assert len(reloaded["glm-4.6"]) == 4
    calibration = ip.TokenCalibration()
    for ratio in (1.5, 1.5, 1.6, 3.9, 1.55):  # one outlier does not move the median far
        calibration.observe("m", 1000, int(1000 * ratio))
    calibration.observe("m", 1000, 10 ** 6)  # far off: ignored
    assert calibration.factor("m") == 1.55


def test_all_cooling_429_tells_claude_code_when_to_retry(home, fake, clock):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake), router_clock=clock) as server:
        fake.push(KEYS[0], ("http", 429))
        post_json(server, "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5,
                                           "messages": [{"role": "user", "content": "x"}]},
                  {"anthropic-version": "2023-06-01"})
        status, headers, body = post_json(server, "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [
                {"role": "user", "content": "y"}]}, {"anthropic-version": "2023-06-01"})
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        assert headers["Retry-After"] == "7" and headers["x-should-retry"] == "true"
        assert "glm-4.6" in body["error"]["message"]


# ==================================================================================================
# The header parser (issue 14): every limit the server enforced with the email package, kept
# ==================================================================================================

@pytest.mark.parametrize("head, status", [
    (b"X-A: 1\r\n\r\n", None), (b"X-A:1\r\nx-a:  2 \r\n\r\n", None),
    (b"X-A: 1\r\n folded\r\n\r\n", 400),            # obsolete line folding
    (b"X A: 1\r\n\r\n", 400), (b"X-A : 1\r\n\r\n", 400), (b": 1\r\n\r\n", 400),
    (b"no colon here\r\n\r\n", 400), (b"X-A: a\x00b\r\n\r\n", 400), (b"X-A: a\x1bb\r\n\r\n", 400),
    (b"X-A: " + b"v" * 70000 + b"\r\n\r\n", 431),
    (b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431)])
def test_read_headers_limits_and_grammar(head, status):
    if status is None:
        headers = ip.read_headers(io.BytesIO(head))
        assert headers.get("x-a") == headers["X-A"] == "1" and "X-a" in headers
        assert headers.get_all("X-A") in (["1"], ["1", "2"]) and headers.get("nope", 5) == 5
        return
    with pytest.raises(ip.HeaderError) as e:
        ip.read_headers(io.BytesIO(head))
    assert e.value.status == status
    request = b"GET /healthz HTTP/1.1\r\n" + head
    assert drive(request)[0][0] == status


def test_read_headers_takes_a_buffered_section_at_once_with_the_same_verdicts():
    """A section already in the buffer is checked as one block; line by line (a reader with
    no peek, or a section not yet all there) must come to the same fields or the same error."""
    import random
    rng = random.Random(20261123)
    pieces = [b"X-A: 1", b"x-a:  2 ", b"Host: h", b"X A: 1", b"X-A : 1", b": 1", b"no colon",
              b"X-A: a\x00b", b"X-A: a\x1bb", b" folded", b"\tfolded", b"X-B: caf\xc3\xa9",
              b"X-C: a\rb", b"X-D:", b"X-E: \x7f", b"X-F: v\tw", b"X-G: " + b"v" * 9000]
    heads = [b"\r\n", b"\n", b"X-A: 1\n\r\n", b"".join(b"X-H%d: v\r\n" % i for i in range(101)) +
             b"\r\n", b"".join(b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n"]
    for _ in range(400):
        heads.append(b"".join(rng.choice(pieces) + rng.choice([b"\r\n", b"\r\n", b"\n"])
                              for _ in range(rng.randrange(1, 6))) + b"\r\n")

    def verdict(fp):
        try:
            return list(ip.read_headers(fp).items()), fp.read()
        except ip.HeaderError as e:
            return e.status, e.message
    heads += [b"X-A: 1\n\n", b"X-A: 1\n\r\n", b"X-A: 1\r\n\n", b"\rX-A: 1\r\n\r\n"]
    for head in heads:  # (a body that holds a blank line must not be taken for the head's end)
        for body in (b"BODY", b"BODY\r\n\r\nMORE"):
            slow = verdict(io.BytesIO(head + body))
            assert verdict(io.BufferedReader(io.BytesIO(head + body), 65536)) == slow, head
            assert verdict(io.BufferedReader(io.BytesIO(head + body), 16)) == slow, head


class RecordingPool:
    def __init__(self):
        self.released = []

    def release(self, key, conn):
        self.released.append(conn)


def upstream_answer(raw, method="POST"):
    """(UpstreamResponse, pool) for the raw bytes an upstream sent, read over a real socket."""
    ours, theirs = socket.socketpair()
    theirs.sendall(raw)
    theirs.close()
    conn, pool = ip.UpstreamConnection(ours, "up.example"), RecordingPool()
    return ip.UpstreamResponse(pool, "key", conn, ip.read_status(conn.reader), 5, method), pool


@pytest.mark.parametrize("raw, body, reused", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n"
     b"2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n", b"abcde", True),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close", b"until the close",
     False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", b"ok", False),   # both: chunked wins, never reused
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
])
def test_upstream_answer_framing(raw, body, reused):
    response, pool = upstream_answer(raw)
    assert response.read_all() == body
    assert response.closed and bool(pool.released) == reused


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",              # ends early
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",   # cut mid-chunk
])
def test_upstream_answer_broken_bodies_fail_cleanly(raw):
    response, pool = upstream_answer(raw)
    with pytest.raises(ip.UpstreamError) as e:
        response.read_all()
    assert e.value.kind == "transient" and not pool.released


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",       # the same grammar as requests
    b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"",
])
def test_upstream_answer_heads_are_read_by_the_same_parser(raw):
    with pytest.raises((ValueError, OSError)):
        upstream_answer(raw)


def test_an_answer_back_in_the_pool_is_not_cut_by_a_late_abort():
    """A client that leaves after its answer was read whole must not cut the connection that
    went back to the pool: another exchange may be using it by then (this cut streams in two
    under load)."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn, pool = ip.UpstreamConnection(ours, "up.example"), RecordingPool()
    response = ip.UpstreamResponse(pool, "key", conn, ip.read_status(conn.reader), 5)
    assert response.read_all() == b"ok" and pool.released == [conn]
    response.abort()
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):  # no end of file: the connection was left alone
        theirs.recv(1)
    theirs.setblocking(True)
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    response = ip.UpstreamResponse(pool, "key", conn, ip.read_status(conn.reader), 5)
    response.abort()  # one still being read is cut
    theirs.settimeout(5)
    assert theirs.recv(10) == b""
    conn.close()
    theirs.close()


def test_upstream_request_goes_out_in_one_write_and_refuses_header_injection():
    ours, theirs = socket.socketpair()
    conn = ip.UpstreamConnection(ours, "up.example:8080")
    conn.send("POST", "/v1/chat/completions", {"Authorization": "Bearer k"}, b"{}")
    theirs.settimeout(5)
    assert theirs.recv(65536) == (b"POST /v1/chat/completions HTTP/1.1\r\nHost: up.example:8080"
                                  b"\r\nAccept-Encoding: identity\r\nAuthorization: Bearer k\r\n"
                                  b"Content-Length: 2\r\n\r\n{}")
    with pytest.raises(ValueError):
        conn.send("POST", "/", {"X-A": "1\r\nX-Injected: 1"}, b"")
    conn.close()
    theirs.close()


def test_upstream_waits_stretch_to_the_larger_timeout():
    """Reads wait the smaller of first_byte_timeout and idle_timeout (set once per connection);
    a wait for the larger one is stretched, without losing a byte."""
    ours, theirs = socket.socketpair()
    conn = ip.UpstreamConnection(ours, "up.example")
    conn.expect(first_byte=0.6, idle=0.1)
    assert conn.step == 0.1
    timer = threading.Timer(0.25, theirs.sendall, (b"xy",))
    timer.start()
    started = time.monotonic()
    conn.wait(5)  # longer than a read's own 0.1 s: still there when the byte comes
    assert conn.reader.read1(2) == b"xy" and time.monotonic() - started >= 0.2
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        conn.wait(0.6)
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    with pytest.raises(socket.timeout):  # and a read waits its own 0.1 s again
        conn.reader.read1(1)
    assert time.monotonic() - started < 0.5
    timer.join()
    conn.close()
    theirs.close()


def test_kernel_timeouts_report_socket_timeout():
    ours, theirs = socket.socketpair()
    conn = ip.UpstreamConnection(ours, "up.example")
    conn.timeouts.set(0.05)
    with pytest.raises(socket.timeout):
        conn.reader.read1(10)
    theirs.sendall(b"late")
    conn.timeouts.set(None)
    assert conn.reader.read1(10) == b"late"
    conn.close()
    theirs.close()


def test_kernel_timeouts_only_for_plain_sockets_and_never_look_at_ssl(monkeypatch):
    # ssl is imported lazily; a request thread that looked up ssl.SSLSocket while another thread
    # was still importing ssl met a half-made module and the connection died (seen in the bench)
    monkeypatch.setitem(sys.modules, "ssl", types.ModuleType("ssl"))  # half-made: no SSLSocket
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    assert ip._kernel_timeouts(ours) is (os.name == "posix")

    class Wrapped(socket.socket):  # stands for ssl.SSLSocket, a subclass: Python's timeouts
        pass
    wrapped = Wrapped(socket.AF_INET, socket.SOCK_STREAM)
    wrapped.settimeout(5)
    assert ip._kernel_timeouts(wrapped) is False and wrapped.gettimeout() == 5
    for s in (ours, theirs, wrapped):
        s.close()


# ==================================================================================================
# Named client keys with limits (issue 15, first part)
# ==================================================================================================

def test_client_keys_with_limits_in_both_formats(home, fake, clock):
    add_key_account(home, KEYS[0])
    keys = ["ck-plain-1", {"name": "alice", "key": "ck-alice-1", "rpm": 2},
            {"name": "bob", "key": "ck-bob-1", "models": ["glm-*"], "tokens_per_day": 30},
            {"name": "old", "key": "ck-old-1", "expires": "2000-01-01"}]
    write_config(home, {"client_keys": keys})
    config = make_config(home, fake)
    anthropic = {"model": "glm-4.6", "max_tokens": 5, "messages": [{"role": "user",
                                                                    "content": "hi"}]}
    clock.now = time.time()  # expiry dates are compared with today
    with running(config, limits_clock=clock) as server:
        def chat(key, body=CHAT, path="/v1/chat/completions"):
            return post_json(server, path, body, {"x-api-key": key,
                                                  "anthropic-version": "2023-06-01"}
                             if path == "/v1/messages" else {"Authorization": "Bearer " + key})
        assert chat("ck-alice-1")[0] == 200 and chat("ck-alice-1")[0] == 200
        status, headers, body = chat("ck-alice-1")
        assert status == 429 and headers["Retry-After"] == "60" and "alice" in \
            body["error"]["message"]
        status, _, body = chat("ck-alice-1", anthropic, "/v1/messages")
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        clock.advance(61)
        assert chat("ck-alice-1")[0] == 200
        status, _, body = chat("ck-bob-1", dict(CHAT, model="kimi-k2"))
        assert status == 403 and body["error"]["code"] == "model_not_allowed"
        status, _, body = chat("ck-bob-1", dict(anthropic, model="kimi-k2"), "/v1/messages")
        assert status == 403 and body["error"]["type"] == "permission_error"
        assert chat("ck-bob-1")[0] == 200          # 16 tokens of his 30
        assert chat("ck-bob-1")[0] == 200          # 32: over, from the next request on
        status, headers, body = chat("ck-bob-1")
        assert status == 429 and int(headers["Retry-After"]) > 0 and "30 tokens" in \
            body["error"]["message"]
        status, _, body = chat("ck-old-1")
        assert status == 401 and "expired on 2000-01-01" in body["error"]["message"]
        assert chat("ck-plain-1")[0] == 200 and chat("ck-nope")[0] == 401
        today = server.chat.status(server.url)["clients_today"]
        names = {r["client"] for r in today}
        assert names == {"alice", "bob", "key-" + ip.fingerprint("ck-plain-1")[:8]}
        assert next(r for r in today if r["client"] == "bob")["input_tokens"] == 22
        assert "ck-alice-1" not in json.dumps(server.chat.status(server.url))
    write_config(home, {"client_keys": [{"name": "x", "key": "k", "colour": "red"}]})
    with pytest.raises(ip.ConfigError) as e:
        ip.load_config(home, {}, {})
    assert "colour" in e.value.message


def manage(server, method, path, body=None, key="mk-secret-123", headers=None):
    head = {"X-Management-Key": key} if key else {}
    head.update(headers or {})
    if body is not None:
        head.setdefault("Content-Type", "application/json")
    status, hdrs, data = request(server, method, "/v0/management/" + path, body, head)
    return status, hdrs, (json.loads(data) if data and data[:1] in b"{[" else data)


def test_management_api_routes_and_files(home, fake):
    add_key_account(home, KEYS[0], nickname="work")
    write_config(home, {"management_key": "mk-secret-123"})
    config = make_config(home, fake)
    with running(config) as server:
        status, _, body = manage(server, "GET", "accounts")
        assert status == 200 and [a["nickname"] for a in body["accounts"]] == ["work"]
        assert KEYS[0] not in json.dumps(body) and body["accounts"][0]["state"] == "healthy"
        status, _, body = manage(server, "POST", "accounts", {"api_key": KEYS[1],
                                                              "nickname": "home"})
        assert status == 201 and body["nickname"] == "home" and KEYS[1] not in json.dumps(body)
        status, _, body = manage(server, "POST", "accounts", {"api_key": "sk-not-accepted-1"})
        assert status == 400 and "did not accept" in body["error"]["message"]
        status, _, body = manage(server, "PATCH", "accounts/home", {
            "default": True, "priority": 3, "models": ["glm-*"], "max_concurrency": 2})
        assert status == 200 and body["default"] is True
        stored = json.load(open(os.path.join(home, "accounts.json")))
        entry = next(e for e in stored["accounts"] if e["nickname"] == "home")
        assert entry["priority"] == 3 and stored["default"] == entry["id"]
        assert stat.S_IMODE(os.stat(os.path.join(home, "accounts.json")).st_mode) == 0o600
        status, _, body = manage(server, "PATCH", "accounts/home", {"nickname": "house",
                                                                    "enabled": False})
        assert status == 200 and body["nickname"] == "house" and body["status"] == "disabled"
        assert manage(server, "PATCH", "accounts/house", {"colour": 1})[0] == 400
        assert manage(server, "PATCH", "accounts/nobody", {"priority": 1})[0] == 404
        status, _, body = manage(server, "POST", "accounts/work/check")
        assert status == 200 and body["reachable"] and body["key"] == "accepted"
        status, _, body = manage(server, "POST", "accounts/work/refresh")
        assert status == 200 and body["renewed"] is False
        assert manage(server, "DELETE", "accounts/house")[0] == 200
        assert [e["nickname"] for e in json.load(open(os.path.join(home, "accounts.json")))[
            "accounts"]] == ["work"]
        # settings: validated like config.json, written to it, applied at once
        status, _, body = manage(server, "PATCH", "settings", {
            "claude_models": {"opus": "kimi-k2"}, "model_aliases": {"fast": "qwen3-coder-plus"}})
        assert status == 200 and body["claude_models"] == {"opus": "kimi-k2"}
        assert json.load(open(os.path.join(home, "config.json")))["model_aliases"] == {
            "fast": "qwen3-coder-plus"}
        assert post_json(server, "/v1/chat/completions", dict(CHAT, model="fast"))[0] == 200
        assert fake.chat_requests()[-1][2]["model"] == "qwen3-coder-plus"
        for bad in ({"port": 1}, {"strategy": "random"}, {"claude_models": {"tiny": "x"}},
                    {"models": {"m": {"thinking": ["type"]}}},  # (unhashable: once a 500)
                    {"models": {"m": {"prices": {"input": 1, "output": 2, "periods": [
                        {"from": "01:00", "to": "02:00", "days": [{}]}]}}}}):
            status, _, body = manage(server, "PATCH", "settings", bad)
            assert status == 400, bad
        # client keys: created (shown once), listed masked, limited, revoked
        status, _, created = manage(server, "POST", "client-keys", {"name": "alice", "rpm": 1})
        assert status == 201 and created["key"].startswith("ck-")
        listed = manage(server, "GET", "client-keys")[2]["client_keys"]
        assert listed[0]["name"] == "alice" and created["key"] not in json.dumps(listed)
        ok = post_json(server, "/v1/chat/completions", CHAT,
                       {"Authorization": "Bearer " + created["key"]})
        assert ok[0] == 200
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 401
        assert post_json(server, "/v1/chat/completions", CHAT, {
            "Authorization": "Bearer " + created["key"]})[0] == 429  # rpm 1
        assert manage(server, "PATCH", "client-keys/alice", {"rpm": 0})[0] == 200
        assert manage(server, "PATCH", "client-keys/alice", {"key": "x"})[0] == 400
        assert manage(server, "DELETE", "client-keys/alice")[0] == 200
        assert manage(server, "DELETE", "client-keys/alice")[0] == 404
        status, _, body = manage(server, "GET", "usage")
        assert status == 200 and any(r["kind"] == "client key" and r["client"] == "alice"
                                     for r in body["usage"])
        status, headers, csv_bytes = manage(server, "GET", "usage?format=csv")
        assert status == 200 and headers["Content-Type"].startswith("text/csv")
        assert csv_bytes.decode().splitlines()[0].startswith("day,kind,account,client,model")
        assert manage(server, "GET", "nothing")[0] == 404
        assert manage(server, "PUT", "accounts")[0] == 405
    config_file = os.path.join(home, "config.json")
    assert stat.S_IMODE(os.stat(config_file).st_mode) == 0o600
    assert json.load(open(config_file))["client_keys"] == []


def test_management_auth_rules_and_ban(home, fake, clock):
    with running(make_config(home, fake)) as server:   # no key configured: the API is off
        assert manage(server, "GET", "accounts")[0] == 404
    write_config(home, {"management_key": "mk-secret-123"})
    clock.now = 1000.0
    delays = []
    with running(make_config(home, fake), guard_clock=clock, guard_sleep=delays.append) \
            as server:
        for _ in range(10):  # no key, or another site's page: refused, never counted
            assert manage(server, "GET", "accounts", key=None)[0] == 401
            assert manage(server, "GET", "accounts", key="wrong", headers={
                "Sec-Fetch-Site": "cross-site"})[0] == 403
        assert manage(server, "GET", "accounts", headers={
            "Authorization": "Bearer mk-secret-123"}, key=None)[0] == 200
        for _ in range(8):
            assert manage(server, "GET", "accounts", key="wrong")[0] == 401
        assert delays == [0.25, 0.5, 1.0]  # slowed past 5 wrong keys, doubling
        status, headers, body = manage(server, "GET", "accounts")  # this machine: never banned
        assert status == 200
        status, _, body = manage(server, "POST", "accounts", {"api_key": KEYS[0]},
                                 headers={"Content-Type": "text/plain"})
        assert status == 415
        clock.advance(ip.ManagementGuard.GUESS_WINDOW)  # old guesses no longer slow new ones
        assert manage(server, "GET", "accounts", key="wrong")[0] == 401 and len(delays) == 3
    # from another machine: refused unless allowed; allowed, banned after five wrong keys
    server = SocketlessServer(management_key="mk-secret-123")
    server.guard = ip.ManagementGuard()
    raw = req("GET", "/v0/management/accounts", X_Management_Key="mk-secret-123")
    handler_replies = drive_from(raw, server, ("10.0.0.5", 5555))
    assert handler_replies[0][0] == 403 and b"this machine" in handler_replies[0][2]
    guard = ip.ManagementGuard(clock, sleep=delays.append)
    config = ip.Config(home="/x", management_key="mk-secret-123", management_allow_remote=True)
    for _ in range(5):
        with pytest.raises(ip.Unauthorized):
            guard.check(config, "10.0.0.5", "wrong")
    with pytest.raises(ip.ProxyError) as banned:  # banned, even with the right key
        guard.check(config, "10.0.0.5", "mk-secret-123")
    assert banned.value.code == "banned" and banned.value.retry_after == 1801
    guard.check(config, "10.0.0.6", "mk-secret-123")  # another address is not
    for i in range(2000):  # failures from many other addresses never evict a ban in force
        with pytest.raises(ip.Unauthorized):
            guard.check(config, "10.1.%d.%d" % (i // 250, i % 250), "wrong")
    with pytest.raises(ip.ProxyError, match="too many wrong"):
        guard.check(config, "10.0.0.5", "mk-secret-123")
    clock.advance(1801)
    guard.check(config, "10.0.0.5", "mk-secret-123")  # the ban lapsed
    with pytest.raises(ip.Unauthorized):  # and one more wrong key does not bring it back
        guard.check(config, "10.0.0.5", "wrong")
    guard.check(config, "10.0.0.5", "mk-secret-123")


def drive_from(raw, server, address):
    head, _, body = drive_raw(raw, server, address).partition(b"\r\n\r\n")
    return [(int(head.split()[1]), head, body)]


def require_selenium():
    """selenium and Debian's chromium-driver; skips without them (CI installs them)."""
    try:
        import selenium  # noqa: F401 - only whether it is there
    except ImportError:
        if os.environ.get("CI"):
            raise AssertionError(".ci/run installs selenium")
        pytest.skip("pip install selenium (and apt-get install chromium-driver)")
    if not shutil.which("chromedriver") or not find_chromium():
        pytest.skip("chromium and chromium-driver are not installed")


def enter_management_key(driver, key):
    """Type ``key`` into the dashboard's management form and send it."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "mgmtkey").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#mgmtform button").click()


def selenium_chrome(tmp_path, width, height):
    """A headless Chromium driven by selenium (Debian's chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    driver_path, browser = shutil.which("chromedriver"), find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--user-data-dir=" + str(tmp_path / ("profile-%d" % width)),
                 "--window-size=%d,%d" % (width, height)):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_dashboard_actions_and_charts_in_chromium(home, fake, tmp_path):
    """Type the management key, make another account the default by clicking, see
    accounts.json change; the charts are drawn (screenshots at phone and desktop size)."""
    require_selenium()
    add_key_account(home, KEYS[0], nickname="work")
    add_key_account(home, KEYS[1], nickname="home")
    write_config(home, {"management_key": "mk-dash-123", "client_keys": ["ck-dash"],
                        "prices": {"glm-4.6": {"input": 1.0, "output": 2.0}}})
    with running(make_config(home, fake)) as server:
        for i in range(4):
            post_json(server, "/v1/chat/completions", conversation(i), {"x-api-key": "ck-dash"})
        post_json(server, "/v1/chat/completions", dict(CHAT, model="<b>bold</b>"),
                  {"x-api-key": "ck-dash"})  # a model name with markup, in the usage rows
        from selenium.webdriver.common.by import By
        for width, height in ((412, 915), (1280, 2000)):
            driver = selenium_chrome(tmp_path, width, height)
            try:
                driver.get(server.url + "/#key=ck-dash")
                wait_for(lambda: "work" in driver.find_element(By.ID, "accounts").text,
                         what="accounts rendered")
                enter_management_key(driver, "mk-dash-123")
                wait_for(lambda: driver.find_elements(By.XPATH,
                                                      "//button[text()='Make default']"),
                         what="actions shown")
                assert "<b>bold</b>" in driver.find_element(By.ID, "usage").text  # as text
                assert not driver.find_elements(By.CSS_SELECTOR, "#usage b")  # never markup
                if width == 412:  # on the phone: make "home" the default by clicking
                    rows = driver.find_elements(By.CSS_SELECTOR, "#accounts tbody tr")
                    target = next(r for r in rows if r.text.startswith("home"))
                    target.find_element(By.XPATH, ".//button[text()='Make default']").click()
                    first = ip.AccountRegistry(home).read()["accounts"][0]["id"]
                    wait_for(lambda: json.load(open(os.path.join(home, "accounts.json")))[
                        "default"] != first, what="accounts.json to change")
                    wait_for(lambda: "home (default)" in driver.find_element(
                        By.ID, "accounts").text, what="the page to show it")
                bars = driver.find_elements(By.CSS_SELECTOR, "#c-days-req rect")
                assert bars and "$" in driver.find_element(By.ID, "costs").text
                assert driver.find_element(By.ID, "familyform").is_displayed()
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(tmp_path / ("dashboard-%d.png" % width)))
                assert "ck-dash" not in driver.page_source.replace("#key=ck-dash", "")
                assert "mk-dash-123" not in driver.current_url
                logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"] \
                    if hasattr(driver, "get_log") else []
                assert logs == [], logs
            finally:
                driver.quit()
        stored = json.load(open(os.path.join(home, "accounts.json")))
        home_entry = next(e for e in stored["accounts"] if e["nickname"] == "home")
        assert stored["default"] == home_entry["id"]
        if os.environ.get("IFLOW_PROXY_KEEP_SCREENSHOT"):
            for width in (412, 1280):
                shutil.copy(str(tmp_path / ("dashboard-%d.png" % width)),
                            os.environ["IFLOW_PROXY_KEEP_SCREENSHOT"] + "-%d.png" % width)
