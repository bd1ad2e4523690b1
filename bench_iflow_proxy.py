#!/usr/bin/env python3
"""Benchmark iflow_proxy.py against a fast fake upstream: what does the proxy add?

    python bench_iflow_proxy.py [--quick] [--out results.json] [--python-flag=-S]

Processes: a fast fake upstream (OpenAI- and Anthropic-compatible), the proxy
(`iflow_proxy.py serve` with its default settings and log, its account pool at unlimited
concurrency so the per-account queue doesn't shape the figures, plus an Anthropic-protocol
account), the floor, and this load generator.  The floor is a minimal pass-through written here
from http.server and http.client, doing nothing but relaying: what stdlib Python reaches on this
machine.  Measurements run interleaved, so every row sees the same machine state:

- added latency p50/p99, non-stream, concurrency 1 (direct vs. through the proxy);
- time to first byte and the gaps between chunks of a 50-chunk stream whose upstream sleeps
  20 ms per chunk (a proxy that batches chunks shows up here);
- requests/s at concurrency 16 and 64 (non-stream), 64 concurrent streams (all must complete);
- against the floor, as ratios: requests/s at 16 and 64 and streams/s of batches of 64
  concurrent 50-chunk streams, for the OpenAI path (/v1/chat/completions) and the Anthropic
  path (/v1/messages to an Anthropic-protocol upstream): medians of interleaved rounds;
- the proxy's RSS while serving (sampled) and with its start-up, and its start-up time to the
  first healthy response; beside them the floor's peak RSS and what ``python -c pass`` costs
  with the same interpreter and flags (this machine's own share of every figure; the floor
  and the proxy run with the same flags);
- separately, the cost of the per-account queue (max_concurrency 1, one account).

Not part of the test suite.  Standard library only.
"""

import argparse
import http.client
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "sk-bench-key-0000000000"
COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "glm-4.6",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


MESSAGE = json.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "deepseek-v4-flash",
    "content": [{"type": "text", "text": "pong"}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}).encode()


# --- the fast fake upstream (runs as its own process) ------------------------------------------

class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        chunks, delay = stream_shape(body)
        if self.path.endswith("/v1/messages"):  # an Anthropic-protocol provider
            if body.get("stream"):
                return self.anthropic_stream(chunks, delay)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(MESSAGE), MESSAGE))
            return
        if body.get("stream"):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(chunks):
                event = b'data: {"choices":[{"index":0,"delta":{"content":"c%d"}}]}\n\n' % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(delay)
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(COMPLETION), COMPLETION))


    def anthropic_stream(self, chunks, delay):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
        events = [b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
                  b'"type":"message","role":"assistant","model":"deepseek-v4-flash","content":[],'
                  b'"stop_reason":null,"usage":{"input_tokens":5,"output_tokens":0}}}\n\n',
                  b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
                  b'"content_block":{"type":"text","text":""}}\n\n']
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        for i in range(chunks):
            event = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                     b'"delta":{"type":"text_delta","text":"c%d"}}\n\n' % i)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(delay)
        tail = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
                b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
                b'"end_turn","stop_sequence":null},"usage":{"output_tokens":50}}\n\n'
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))


def stream_shape(body):
    """(chunks, seconds between them) a stream request asks for: its last message says
    "stream CHUNKS DELAY" (in the body, so that it passes through any proxy)."""
    content = (body.get("messages") or [{}])[-1].get("content")
    if isinstance(content, list):  # content blocks (how a proxy may pass it on)
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    words = content.split() if isinstance(content, str) else []
    if len(words) == 3 and words[0] == "stream":
        return int(words[1]), float(words[2])
    return 50, 0.02


class Floor(http.server.BaseHTTPRequestHandler):
    """The floor: a minimal stdlib pass-through (http.server + http.client, one keep-alive
    upstream connection per client connection), doing nothing but relaying."""

    protocol_version = "HTTP/1.1"
    upstream_port = None

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.up = None

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.up is None:
            self.up = http.client.HTTPConnection("127.0.0.1", self.upstream_port)
            self.up.connect()
            self.up.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {k: self.headers[k] for k in ("Content-Type", "Authorization", "x-api-key",
                                                "anthropic-version") if self.headers.get(k)}
        self.up.request("POST", self.path, body, headers)
        resp = self.up.getresponse()
        content_type = resp.getheader("Content-Type") or "application/json"
        if "event-stream" not in content_type:
            data = resp.read()
            self.wfile.write(b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (resp.status, content_type.encode(), len(data), data))
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n" % content_type.encode())
        while True:
            data = resp.read1(65536)
            if not data:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")


def serve(handler, port_file):
    """Serve ``handler`` on a free loopback port, written to ``port_file``."""
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512   # the listen() backlog: a class attribute, read in __init__

    server = Server(("127.0.0.1", 0), handler)
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


def run_floor(port_file, upstream_port):
    Floor.upstream_port = upstream_port
    serve(Floor, port_file)


def run_upstream(port_file):
    serve(Upstream, port_file)


# --- measuring ------------------------------------------------------------------------------

CHAT = json.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "ping"}]})
MESSAGES = json.dumps({"model": "deepseek-v4-flash", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "ping"}]})
MESSAGES_STREAM = json.dumps(dict(json.loads(MESSAGES), stream=True))
STREAM = json.dumps({"model": "glm-4.6", "stream": True,
                     "messages": [{"role": "user", "content": "ping"}]})


class Client:
    """A keep-alive connection to one target (host, port, path prefix)."""

    def __init__(self, target):
        self.port, self.prefix = target
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def chat(self, body=CHAT, headers=None, path="/chat/completions"):
        started = time.perf_counter()
        self.conn.request("POST", self.prefix + path, body,
                          dict({"Content-Type": "application/json",
                                "Authorization": "Bearer " + KEY}, **(headers or {})))
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError("HTTP %d: %s" % (resp.status, data[:200]))
        return time.perf_counter() - started

    def stream(self, chunks=50, delay=0.02, anthropic=False):
        """(time to first chunk, [gaps between chunks]) in seconds."""
        started = time.perf_counter()
        path, body = ("/v1/messages", MESSAGES_STREAM) if anthropic else \
            ("/chat/completions", STREAM)
        body = json.loads(body)
        body["messages"][-1]["content"] = "stream %d %g" % (chunks, delay)
        self.conn.request("POST", self.prefix + path, json.dumps(body), {
            "Content-Type": "application/json", "Authorization": "Bearer " + KEY,
            "anthropic-version": "2023-06-01"})
        resp = self.conn.getresponse()
        arrivals, buf = [], b""
        while True:
            data = resp.read1(65536)
            if not data:
                break
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if (b"text_delta" if anthropic else b'"content"') in event:
                    arrivals.append(time.perf_counter())
        if len(arrivals) != chunks:
            raise RuntimeError("stream delivered %d of %d chunks" % (len(arrivals), chunks))
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return arrivals[0] - started, gaps

    def close(self):
        self.conn.close()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def latency(targets, n):
    clients = {name: Client(t) for name, t in targets.items()}
    samples = {name: [] for name in targets}
    for name, c in clients.items():   # warm up connections and caches
        for _ in range(20):
            c.chat()
    for _ in range(n):
        for name, c in clients.items():   # interleaved: both see the same machine state
            samples[name].append(c.chat())
    for c in clients.values():
        c.close()
    return {name: {"p50_ms": percentile(s, 50) * 1000, "p99_ms": percentile(s, 99) * 1000}
            for name, s in samples.items()}


def run_together(fn, count):
    """Run ``fn`` in ``count`` threads at once; seconds until the last one finished."""
    threads = [threading.Thread(target=fn) for _ in range(count)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def throughput(target, concurrency, seconds, anthropic=False):
    stop = time.perf_counter() + seconds
    counts, errors = [], []
    call = {"body": MESSAGES, "path": "/v1/messages",
            "headers": {"anthropic-version": "2023-06-01", "x-api-key": KEY}} if anthropic else {}

    def worker():
        c, n = Client(target), 0
        try:
            while time.perf_counter() < stop:
                c.chat(**call)
                n += 1
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            errors.append(repr(e))
        finally:
            c.close()
            counts.append(n)
    elapsed = run_together(worker, concurrency)
    return {"rps": sum(counts) / elapsed, "errors": len(errors),
            "first_error": errors[0] if errors else None}


def streams(target, count, chunks=50, delay=0.02, anthropic=False):
    results, errors = [], []

    def one():
        c = Client(target)
        try:
            results.append(c.stream(chunks, delay, anthropic))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            c.close()
    elapsed = run_together(one, count)
    return {"completed": len(results), "errors": len(errors), "seconds": elapsed,
            "first_error": errors[0] if errors else None,
            "streams_per_s": len(results) / elapsed,
            "ttfb_p50_ms": percentile([r[0] for r in results], 50) * 1000 if results else None,
            "gap_p99_ms": percentile([g for r in results for g in r[1]], 99) * 1000
            if results else None}


def stream_rate(target, seconds, anthropic=False):
    """Streams/s of batches of 64 concurrent 50-chunk streams (no pause between chunks: what
    relaying them costs), batch after batch for about ``seconds``."""
    done, spent = 0, 0.0
    while spent < seconds:
        batch = streams(target, 64, delay=0, anthropic=anthropic)
        if batch["errors"]:
            raise RuntimeError("%d of 64 streams failed, first: %s" % (batch["errors"],
                                                                       batch["first_error"]))
        done, spent = done + batch["completed"], spent + batch["seconds"]
    return done / spent


def vs_floor(floor, openai, anthropic, seconds, rounds):
    """Requests/s at 16 and 64 and streams/s of 64 concurrent 50-chunk streams: the floor,
    the proxy's OpenAI path and its Anthropic path (an Anthropic-protocol account), one after
    the other, ``rounds`` times.  Each figure is the median of its rounds, each ratio the
    median of the rounds' own ratios (a round's three rows see the same machine state)."""
    measures = {
        "rps_c16": lambda target, anth: throughput(target, 16, seconds, anth)["rps"],
        "rps_c64": lambda target, anth: throughput(target, 64, seconds, anth)["rps"],
        "streams_c64": lambda target, anth: stream_rate(target, seconds, anth)}
    samples = {key: {"floor": [], "openai": [], "anthropic": []} for key in measures}
    for _ in range(rounds):
        for key, measure in measures.items():
            for name, target, anth in (("floor", floor, False), ("openai", openai, False),
                                       ("anthropic", anthropic, True)):
                samples[key][name].append(measure(target, anth))
    rows = {}
    for key, row in samples.items():
        rows[key] = {name: statistics.median(values) for name, values in row.items()}
        for name in ("openai", "anthropic"):
            rows[key][name + "_ratio"] = statistics.median(
                path / floor for path, floor in zip(row[name], row["floor"]))
        rows[key]["rounds"] = row
    return rows


def rss_kb(pid):
    """(current, peak) resident set size of a process in KiB."""
    try:
        with open("/proc/%d/status" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except OSError:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True,
                             text=True).stdout.strip()
        return int(out or 0), int(out or 0)


class RssSampler:
    """The largest resident set a process reaches while it serves (sampled every 20 ms).
    VmHWM would count the start-up too, where CPython compiles the whole script once."""

    def __init__(self, pid):
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid)[0])

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def interpreter_alone(python_flags):
    """Peak RSS (KiB) and run time (ms) of ``python -c pass`` with the same flags, the median
    of 5: what every Python process here costs before any of its own code runs (the site
    hooks this machine installs included).  None for the RSS where there is no /proc."""
    peaks, times = [], []
    for _ in range(5):
        started = time.perf_counter()
        out = subprocess.run([sys.executable] + list(python_flags) + ["-c", (
            "import os\nif os.path.exists('/proc/self/status'):\n"
            " print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")],
            capture_output=True, text=True, check=True).stdout
        times.append((time.perf_counter() - started) * 1000)
        if out.strip():
            peaks.append(int(out.split()[1]))
    return {"peak_kb": statistics.median(peaks) if peaks else None,
            "run_ms": statistics.median(times)}


def start_proxy(upstream_port, max_concurrency, python_flags=()):
    home = tempfile.mkdtemp(prefix="iflow-bench-")
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump({"max_concurrency": max_concurrency}, f)  # the default log: every request
    env = dict(os.environ, IFLOW_PROXY_HOME=home, IFLOW_API_KEYS=KEY,
               IFLOW_API_BASE="http://127.0.0.1:%d/v1" % upstream_port)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # an Anthropic-protocol account for deepseek-v4-flash beside the pooled OpenAI key
    subprocess.run([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "login", "--api-key",
                    "--provider", "deepseek", "--protocol", "anthropic", "--no-verify",
                    "--base-url", "http://127.0.0.1:%d/anthropic" % upstream_port],
                   input=KEY + "\n", env=env, capture_output=True, text=True, check=True)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable] + list(python_flags) +
                            [os.path.join(HERE, "iflow_proxy.py"),
                             "serve", "--port", str(port)], env=env,
                            stderr=subprocess.DEVNULL)
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the proxy exited with %d" % proc.returncode)
            time.sleep(0.002)
    return proc, port, (time.perf_counter() - started) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    parser.add_argument("--out", help="also write the figures as JSON to this file")
    parser.add_argument("--python-flag", action="append", default=[], metavar="FLAG",
                        help="interpreter flag for the proxy and the floor, e.g. --python-flag=-S to "
                        "leave out site-packages hooks this machine may have (with '=': "
                        "the flag starts with a dash)")
    parser.add_argument("--upstream", help=argparse.SUPPRESS)  # internal: run the fake upstream
    parser.add_argument("--floor", nargs=2, help=argparse.SUPPRESS)  # internal: run the floor
    args = parser.parse_args(argv)
    if args.upstream:
        return run_upstream(args.upstream)
    if args.floor:
        return run_floor(args.floor[0], int(args.floor[1]))
    n, seconds = (300, 2.0) if args.quick else (1500, 5.0)

    port_file = tempfile.mktemp(prefix="iflow-bench-port-")
    upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--upstream",
                                 port_file])
    proxies = []
    try:
        while not (os.path.exists(port_file) and open(port_file).read()):
            time.sleep(0.01)
        up_port = int(open(port_file).read())
        startups = []  # nine: a start-up is 0.2 s, and this host's load moves single ones by 50 %
        for _ in range(3 if args.quick else 9):
            proc, _port, ms = start_proxy(up_port, 0, args.python_flag)
            startups.append(ms)
            proc.terminate()
            proc.wait()
        proxy, px_port, _ = start_proxy(up_port, 0, args.python_flag)
        queued, q_port, _ = start_proxy(up_port, 1, args.python_flag)
        floor_file = tempfile.mktemp(prefix="iflow-bench-floor-")
        floor = subprocess.Popen([sys.executable] + args.python_flag +  # the proxy's flags
                                 [os.path.abspath(__file__), "--floor", floor_file, str(up_port)])
        proxies += [proxy, queued, floor]
        while not (os.path.exists(floor_file) and open(floor_file).read()):
            time.sleep(0.01)
        floor_target = (int(open(floor_file).read()), "/v1")
        os.unlink(floor_file)
        direct, through = (up_port, "/v1"), (px_port, "/v1")
        time.sleep(1)  # (the proxy hands its start-up memory back once started)
        sampler = RssSampler(proxy.pid)
        r = {"startup_ms": statistics.median(startups)}
        r["latency"] = latency({"direct": direct, "proxy": through}, n)
        r["queue_latency"] = latency({"unlimited": through, "max_concurrency_1": (q_port, "/v1")},
                                     n // 2)
        single = {"direct": [], "proxy": []}
        for _ in range(3 if args.quick else 5):   # one stream at a time, interleaved
            for name, target in (("direct", direct), ("proxy", through)):
                c = Client(target)
                single[name].append(c.stream())
                c.close()
        r["stream"] = {name: {
            "ttfb_ms": statistics.median(s[0] for s in runs) * 1000,
            "gap_mean_ms": statistics.mean(g for s in runs for g in s[1]) * 1000,
            "gap_p99_ms": percentile([g for s in runs for g in s[1]], 99) * 1000}
            for name, runs in single.items()}
        for conc in (16, 64):
            r["rps_c%d" % conc] = {name: throughput(t, conc, seconds)
                                   for name, t in (("direct", direct), ("proxy", through))}
        r["streams_64"] = {name: streams(t, 64) for name, t in (("direct", direct),
                                                                 ("proxy", through))}
        r["anthropic_rps_c16"] = {name: throughput(t, 16, seconds, anthropic=True)
                                  for name, t in (("direct", (up_port, "/anthropic")),
                                                  ("proxy", (px_port, "")))}
        r["vs_floor"] = vs_floor(floor_target, through, (px_port, ""), 1.0 if args.quick
                                 else 2.0, 3 if args.quick else 7)
        r["proxy_rss_kb"] = dict(zip(("current", "peak"), rss_kb(proxy.pid)),
                                 serving_peak=sampler.stop())
        r["floor_rss_kb"] = rss_kb(floor.pid)[1]
        r["interpreter"] = interpreter_alone(args.python_flag)
    finally:
        for p in proxies + [upstream]:
            p.terminate()
            p.wait()
        if os.path.exists(port_file):
            os.unlink(port_file)

    lat, st = r["latency"], r["stream"]
    rows = [
        ("non-stream latency p50 (ms)", lat["direct"]["p50_ms"], lat["proxy"]["p50_ms"],
         "+%.2f ms" % (lat["proxy"]["p50_ms"] - lat["direct"]["p50_ms"])),
        ("non-stream latency p99 (ms)", lat["direct"]["p99_ms"], lat["proxy"]["p99_ms"],
         "+%.2f ms" % (lat["proxy"]["p99_ms"] - lat["direct"]["p99_ms"])),
        ("stream time to first byte (ms)", st["direct"]["ttfb_ms"], st["proxy"]["ttfb_ms"],
         "+%.2f ms" % (st["proxy"]["ttfb_ms"] - st["direct"]["ttfb_ms"])),
        ("stream chunk gap mean (ms)", st["direct"]["gap_mean_ms"], st["proxy"]["gap_mean_ms"],
         "%+.2f ms" % (st["proxy"]["gap_mean_ms"] - st["direct"]["gap_mean_ms"])),
        ("stream chunk gap p99 (ms)", st["direct"]["gap_p99_ms"], st["proxy"]["gap_p99_ms"],
         "%+.2f ms" % (st["proxy"]["gap_p99_ms"] - st["direct"]["gap_p99_ms"])),
    ]
    for conc in (16, 64):
        d, p = r["rps_c%d" % conc]["direct"]["rps"], r["rps_c%d" % conc]["proxy"]["rps"]
        rows.append(("requests/s at concurrency %d" % conc, d, p, "x%.2f" % (p / d)))
    d, p = r["anthropic_rps_c16"]["direct"]["rps"], r["anthropic_rps_c16"]["proxy"]["rps"]
    rows.append(("Anthropic pass-through req/s c16", d, p, "x%.2f" % (p / d)))
    s64 = r["streams_64"]
    rows.append(("64 concurrent streams completed", s64["direct"]["completed"],
                 s64["proxy"]["completed"], "%d errors" % s64["proxy"]["errors"]))
    rows.append(("64 streams: chunk gap p99 (ms)", s64["direct"]["gap_p99_ms"],
                 s64["proxy"]["gap_p99_ms"], ""))
    q = r["queue_latency"]
    rows.append(("queue (max_concurrency 1) p50 (ms)", q["unlimited"]["p50_ms"],
                 q["max_concurrency_1"]["p50_ms"], "+%.2f ms" % (
                     q["max_concurrency_1"]["p50_ms"] - q["unlimited"]["p50_ms"])))
    print("%-38s %12s %12s %12s" % ("measure", "direct", "proxy", "difference"))
    for name, a, b, diff in rows:  # None: nothing completed to measure (see the errors below)
        print("%-38s %12s %12s %12s" % (name, "-" if a is None else "%.2f" % a,
                                         "-" if b is None else "%.2f" % b, diff))
    print()
    print("%-38s %10s %18s %18s" % ("against the floor (same run)", "floor", "OpenAI path",
                                     "Anthropic path"))
    for key, name in (("rps_c16", "requests/s at concurrency 16"),
                      ("rps_c64", "requests/s at concurrency 64"),
                      ("streams_c64", "64 x 50-chunk streams/s")):
        row = r["vs_floor"][key]
        print("%-38s %10.1f %10.1f (x%.2f) %10.1f (x%.2f)" % (
            name, row["floor"], row["openai"], row["openai_ratio"], row["anthropic"],
            row["anthropic_ratio"]))
    print()
    print("%-38s %12s %12.1f" % ("proxy peak RSS while serving (MB)", "",
                                  r["proxy_rss_kb"]["serving_peak"] / 1024.0))
    print("%-38s %12s %12.1f" % ("proxy peak RSS with start-up (MB)", "",
                                  r["proxy_rss_kb"]["peak"] / 1024.0))
    print("%-38s %12s %12.1f" % ("proxy start-up to healthy (ms)", "", r["startup_ms"]))
    print("%-38s %12s %12.1f" % ("floor peak RSS (MB)", "", r["floor_rss_kb"] / 1024.0))
    alone = r["interpreter"]
    print("%-38s %12s %12s" % ("python -c pass: peak RSS (MB)", "", "-" if alone["peak_kb"] is
                               None else "%.1f" % (alone["peak_kb"] / 1024.0)))
    print("%-38s %12s %12.1f" % ("python -c pass: run time (ms)", "", alone["run_ms"]))
    for conc in (16, 64):
        for name in ("direct", "proxy"):
            if r["rps_c%d" % conc][name]["errors"]:
                print("errors at concurrency %d (%s): %d, first: %s" % (
                    conc, name, r["rps_c%d" % conc][name]["errors"],
                    r["rps_c%d" % conc][name]["first_error"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
