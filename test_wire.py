"""The wire (issue 22): HTTP/1.1 framing both ways from one table, the pool against servers that
close, reset and over-send, clients that stop reading or trickle, and RFC 9112's request rules.
"""

import http.client
import json
import re
import select
import socket
import threading
import time

import pytest

import iflow_proxy as ip
from test_iflow_proxy import (CHAT, KEYS, WEIRD_VALUES, FakeServer,  # noqa: F401
                              QuietHandler, add_key_account, add_provider_account, clock, drive,
                              drive_raw, fake, home, make_config, mutations, post_json, req,
                              request, running, wait_for)

PAYLOAD = json.dumps(CHAT).encode()
N = len(PAYLOAD)


def chunked(data, size_line="%x", trailer=b""):
    """``data`` in two chunks, then the last chunk and ``trailer`` (field lines)."""
    half = len(data) // 2
    parts = [data[:half], data[half:]]
    return b"".join((size_line % len(p)).encode() + b"\r\n" + p + b"\r\n" for p in parts) + \
        b"0\r\n" + trailer + b"\r\n"


# One table for both directions: (name, HTTP version, framing header fields, body bytes,
# the status a request framed so gets, the body a response framed so gives (None: refused),
# whether that response's connection may carry another request).
FRAMING = [
    ("content-length", "1.1", [("Content-Length", N)], PAYLOAD, 200, PAYLOAD, True),
    ("same length twice in a list", "1.1", [("Content-Length", "%d, %d" % (N, N))], PAYLOAD,
     200, PAYLOAD, True),
    ("two length fields that differ", "1.1", [("Content-Length", N), ("Content-Length", N + 1)],
     PAYLOAD, 400, None, False),
    ("a list of lengths that differ", "1.1", [("Content-Length", "%d, %d" % (N, N - 1))],
     PAYLOAD, 400, None, False),
    ("superscript digit", "1.1", [("Content-Length", "²")], PAYLOAD, 400, None, False),
    ("signed length", "1.1", [("Content-Length", "+%d" % N)], PAYLOAD, 400, None, False),
    ("chunked", "1.1", [("Transfer-Encoding", "chunked")], chunked(PAYLOAD), 200, PAYLOAD, True),
    ("chunk extensions and BWS", "1.1", [("Transfer-Encoding", "chunked")],
     chunked(PAYLOAD, "%x ;ext=1"), 200, PAYLOAD, True),
    ("a trailer line over 8 KiB taken whole", "1.1", [("Transfer-Encoding", "chunked")],
     chunked(PAYLOAD, trailer=b"X-Long: " + b"a" * 9000 + b"\r\nX-Two: 2\r\n"), 200, PAYLOAD,
     True),
    ("a trailer line over 64 KiB", "1.1", [("Transfer-Encoding", "chunked")],
     chunked(PAYLOAD, trailer=b"X-Long: " + b"a" * 70000 + b"\r\n"), 431, None, False),
    ("chunked beside a length", "1.1", [("Transfer-Encoding", "chunked"),
                                        ("Content-Length", N)], chunked(PAYLOAD), 400, PAYLOAD,
     False),
    ("a coding besides chunked", "1.1", [("Transfer-Encoding", "gzip, chunked")],
     chunked(PAYLOAD), 400, None, False),
    ("two coding fields", "1.1", [("Transfer-Encoding", "chunked"),
                                  ("Transfer-Encoding", "identity")], chunked(PAYLOAD), 400,
     None, False),
    ("chunked in HTTP/1.0", "1.0", [("Transfer-Encoding", "chunked")], chunked(PAYLOAD), 400,
     None, False),
    ("chunk data ended by a bare LF", "1.1", [("Transfer-Encoding", "chunked")],
     chunked(PAYLOAD).replace(b"\r\n0\r\n", b"\n0\r\n"), 400, None, False),
    ("a space before the chunk size", "1.1", [("Transfer-Encoding", "chunked")],
     chunked(PAYLOAD, " %x"), 400, None, False),
    ("bytes after the last chunk", "1.1", [("Transfer-Encoding", "chunked")],
     chunked(PAYLOAD) + b"HTTP/1.1 200 OK\r\n", 200, PAYLOAD, False),
    ("more bytes than the length", "1.1", [("Content-Length", N)],
     PAYLOAD + b"HTTP/1.1 200 OK\r\n", 200, PAYLOAD, False),
]


def framed(first_line, version, fields, body, extra=()):
    head = ["%s HTTP/%s" % (first_line, version)] if first_line.startswith("POST") else \
        ["HTTP/%s %s" % (version, first_line)]
    head += ["%s: %s" % field for field in list(extra) + list(fields)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@pytest.mark.parametrize("name, version, fields, body, request_status, response_body, reusable",
                         FRAMING, ids=[row[0] for row in FRAMING])
def test_framing_table_both_directions(name, version, fields, body, request_status,
                                       response_body, reusable):
    # a request framed so, to the server
    raw = framed("POST /v1/chat/completions", version, fields, body,
                 [("Host", "127.0.0.1"), ("Content-Type", "application/json")])
    replies = drive(raw)
    assert replies[0][0] == request_status, replies[0][2]
    if request_status >= 400:
        assert replies[0][1].get("Connection") == "close"
    # an answer framed so, from upstream, read by a real pool
    pool = ip.ConnectionPool(ip.Config(home="/x"))
    ours, theirs = socket.socketpair()
    theirs.sendall(framed("200 OK", version, fields, body))
    conn = ip.UpstreamConnection(ours, "up.example")
    try:
        response = ip.UpstreamResponse(pool, "key", conn, ip.read_status(conn.reader), 5)
        got = response.read_all()
    except ip.UpstreamError as e:
        got = None
        assert e.kind in ("malformed", "transient")
    assert got == response_body
    assert (pool._idle.get("key") == [conn]) is reusable
    conn.close()
    theirs.close()


@pytest.mark.parametrize("raw, reusable", [
    (b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n", False),   # a 204 with a body
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", True),
])
def test_answers_without_a_body_leave_nothing_behind(raw, reusable):
    pool = ip.ConnectionPool(ip.Config(home="/x"))
    ours, theirs = socket.socketpair()
    theirs.sendall(raw)
    conn = ip.UpstreamConnection(ours, "up.example")
    response = ip.UpstreamResponse(pool, "key", conn, ip.read_status(conn.reader), 5)
    assert response.read_all() == b""
    assert (pool._idle.get("key") == [conn]) is reusable
    theirs.close()
    conn.close()


def test_bytes_past_a_large_body_are_seen_before_the_pool():
    """A read of exactly what a body has left would leave bytes sent past its length in the
    socket, where the buffer check can't see them."""
    body = b"x" * 200000
    pool = ip.ConnectionPool(ip.Config(home="/x"))
    ours, theirs = socket.socketpair()
    conn = ip.UpstreamConnection(ours, "up.example")
    sender = threading.Thread(target=theirs.sendall, args=(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%sHTTP/1.1 200 OK\r\n" % (
            len(body), body),))
    sender.start()
    response = ip.UpstreamResponse(pool, "key", conn, ip.read_status(conn.reader), 5)
    assert response.read_all() == body
    sender.join()
    kept = pool._idle.get("key")  # (if a read ended just at the body's end: acquire sees it)
    assert not kept or not kept[0].quiet()
    theirs.close()
    conn.close()


def test_a_pooled_connection_is_handed_out_only_while_quiet():
    """Bytes that arrive after an answer (or the server's close) are seen before reuse."""
    clock_now = [100.0]
    pool = ip.ConnectionPool(ip.Config(home="/x"), clock=lambda: clock_now[0])
    ours, theirs = socket.socketpair()
    conn = ip.UpstreamConnection(ours, "up.example")
    pool.release("key", conn)
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # nobody asked for it
    pool._connect = lambda key: "fresh"
    clock_now[0] += 2 * ip.ASK_KERNEL_AFTER  # (idle for less, it is taken back unasked)
    assert pool.acquire("key") == ("fresh", False)
    with pytest.raises(OSError):
        conn.sock.getpeername()  # closed
    ours, theirs = socket.socketpair()
    conn = ip.UpstreamConnection(ours, "up.example")
    pool.release("key", conn)
    clock_now[0] += 1.0
    assert pool.acquire("key") == (conn, True)   # quiet and fresh: reused
    pool.release("key", conn)
    clock_now[0] += 4.5                          # idle past pool_idle_timeout: dropped
    assert pool.acquire("key") == ("fresh", False)
    theirs.close()


def test_retry_after_is_read_strictly_and_capped():
    assert ip.retry_after_seconds("7") == 7
    assert ip.retry_after_seconds("999999999") == ip.MAX_RETRY_AFTER == 60
    for bad in ("²", "-1", "1.5", "soon", "Mon, 99 Foo 9999 99:99:99 GMT"):
        assert ip.retry_after_seconds(bad) is None


# --- the pool against servers that close, reset and over-send -----------------------------------

def account_ok(server):
    return not server.chat.router.recent_errors and all(
        server.chat.router.state(a)[0] in ("healthy", "busy")
        for a in server.chat.router.all_accounts())


@pytest.mark.parametrize("stream", [False, True])
def test_a_server_that_closes_idle_connections(home, fake, stream):
    add_key_account(home, KEYS[0])
    fake.keep_alive = 0.2
    with running(make_config(home, fake)) as server:
        body = dict(CHAT, stream=stream)
        assert ip_post(server, body)[0] == 200
        pool = server.chat.upstream.pool
        wait_for(lambda: any(not c.quiet() for idle in pool._idle.values() for c in idle),
                 what="the fake closing the idle connection")
        status, _headers, _reply = ip_post(server, body)
        assert status == 200 and fake.connections == 2 and account_ok(server)


def ip_post(server, body):
    """(status, headers, raw bytes) of a POST, stream or not."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_connection_close_answers_are_never_reused(home, fake):
    add_key_account(home, KEYS[0])
    fake.close_every = 2
    with running(make_config(home, fake)) as server:
        for i in range(6):
            status, _h, reply = ip_post(server, dict(CHAT, stream=i % 3 == 0))
            assert status == 200, reply
        assert fake.connections == 3 and account_ok(server)


@pytest.mark.parametrize("stream_first", [False, True])
def test_a_reset_on_a_reused_connection_is_sent_again_without_cooling(home, fake, clock,
                                                                      stream_first):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake), router_clock=clock) as server:
        assert ip_post(server, dict(CHAT, stream=stream_first))[0] == 200
        fake.reset_reused = 1
        status, _h, reply = ip_post(server, CHAT)
        assert status == 200, reply
        assert fake.connections == 2 and fake.reset_reused == 0 and account_ok(server)
        assert len(fake.chat_requests()) == 2  # the reset one never reached the handler


@pytest.mark.parametrize("poison", [
    lambda n: ([("Content-Length", n)], b"EXTRA"),                          # more than it said
    lambda n: ([("Content-Length", n), ("Content-Length", n + 80)], b"x" * 80),  # two lengths
    lambda n: ([("Transfer-Encoding", "chunked")], None),                   # after the last chunk
], ids=["longer than its length", "two lengths", "after the last chunk"])
def test_bytes_left_over_never_become_the_next_answer(home, fake, clock, poison):
    """Pool poisoning: bytes after an answer were read as the next request's answer, and every
    later answer shifted by one, across clients."""
    add_key_account(home, KEYS[0])
    stolen = json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": "STOLEN"},
                         "finish_reason": "stop"}]}).encode()
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d" \
        b"\r\n\r\n%s" % (len(stolen), stolen)

    def action(n):
        fields, extra = poison(n)
        return fields, smuggled, extra is None
    fake.push(KEYS[0], ("poison", action))
    replies = []
    with running(make_config(home, fake), router_clock=clock) as server:
        for word in ("first", "second", "third"):
            replies.append(ip_post(server, dict(CHAT, messages=[{"role": "user",
                                                                 "content": word}])))
            clock.advance(3600)  # two lengths are a broken answer: past its cooldown
    texts = [json.loads(r[2])["choices"][0]["message"]["content"] if r[0] == 200 else r[0]
             for r in replies]
    assert texts[1:] == ["echo: second", "echo: third"], texts
    assert "STOLEN" not in json.dumps(texts)


# --- clients that stop reading or trickle --------------------------------------------------------

def test_a_client_that_stops_reading_frees_its_slot_after_send_timeout(home, fake):
    add_key_account(home, KEYS[0])
    fake.responder = lambda body: {"content": "x" * (8 << 20), "chunk": 1 << 16}
    config = make_config(home, fake, send_timeout=0.5, queue_timeout=30)
    with running(config) as server:
        stuck = socket.create_connection(server.server_address[:2])
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps(dict(CHAT, stream=True)).encode()
        stuck.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type:"
                      b" application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: server.chat.router.state(server.chat.router.all_accounts()[0])[0]
                 == "busy", what="the stuck stream to start")
        fake.responder = None
        wait_for(lambda: server.chat.router.state(server.chat.router.all_accounts()[0])[0]
                 == "healthy", timeout=20, what="the send timeout to free the account")
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200  # the slot is free
        stuck.close()


def test_the_drain_after_an_early_answer_has_one_deadline(home, fake):
    """A body nobody reads, trickled a byte at a time, can't hold the connection past
    body_timeout (each byte used to restart the read's own timeout)."""
    with running(make_config(home, fake, body_timeout=1)) as server:
        client = socket.create_connection(server.server_address[:2])
        client.sendall(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                       b"application/json\r\nContent-Length: 1000\r\n\r\n{")
        client.settimeout(10)
        assert client.recv(65536).startswith(b"HTTP/1.1 404")
        started, closed = time.monotonic(), False
        while not closed and time.monotonic() - started < 8:
            try:
                client.sendall(b" ")
            except OSError:
                closed = True
                break
            # the trickle's pace (the client's behaviour under test), watching for the close
            if select.select([client], [], [], 0.2)[0]:
                try:
                    closed = client.recv(1) == b""
                except OSError:
                    closed = True
        assert closed, "a trickled body held the connection for 8 s (body_timeout is 1 s)"
        client.close()


# --- RFC 9112's rules for requests, socketless --------------------------------------------------

@pytest.mark.parametrize("raw, statuses", [
    (b"GET /healthz HTTP/1.1\r\n\r\n", [400]),                                # no Host
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", [400]),          # two
    (b"GET /healthz HTTP/1.0\r\n\r\n", [200]),                                # 1.0 may omit it
    (b"GET /healthz HTTP/1.00\r\nHost: 127.0.0.1\r\n\r\n", [400]),            # one digit each
    (b"GET /healthz HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", [400]),
    (b"GET\x0b/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", [400]),          # VT: no separator
    (b"GET\t/healthz\tHTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", [200, 200]),      # HTAB is one
    (b"GET /health\x00z HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", [400]),         # NUL in the target
    (b"GET http://[::1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", [400, 200]),  # broken
    (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", [200, 200]),
])
def test_request_line_and_host_rules(raw, statuses):
    """A head the wire refuses is answered 400 and closes the connection; one it reads (even
    with a target the router refuses) leaves the connection for the next request."""
    replies = drive(raw + req("GET", "/healthz"))
    assert [r[0] for r in replies] == statuses
    if statuses == [400]:
        assert replies[0][1]["Connection"] == "close"


@pytest.mark.parametrize("fields", [["Connection: TE, close"], ["Connection: keep-alive",
                                                                "Connection: close"]])
def test_every_connection_option_is_read(fields):
    raw = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + \
        "".join(f + "\r\n" for f in fields).encode() + b"\r\n"
    replies = drive(raw + req("GET", "/healthz"))
    assert [r[0] for r in replies] == [200] and replies[0][1]["Connection"] == "close"


def test_head_is_answered_wherever_get_is():
    for path in ("/healthz", "/status", "/", "/api/hello"):
        raw = req("HEAD", path)
        handler_out = drive_raw(raw)
        assert handler_out.startswith(b"HTTP/1.1 200 ") and handler_out.endswith(b"\r\n\r\n")
        assert b"Content-Length: " in handler_out


def test_100_continue_only_after_the_checks():
    from test_iflow_proxy import SocketlessServer
    body = json.dumps(CHAT).encode()
    keyed = SocketlessServer(client_keys=(ip.client_key("ck-1"),))
    out = drive_raw(req("POST", "/v1/chat/completions", body, Expect="100-continue"), keyed)
    assert out.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in out
    assert b"Connection: close" in out  # the body it never asked for is not read
    small = SocketlessServer(max_body_bytes=10)
    out = drive_raw(req("POST", "/v1/chat/completions", body, Expect="100-continue"), small)
    assert out.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in out
    out = drive_raw(req("POST", "/v1/chat/completions", body, Expect="100-continue",
                        Authorization="Bearer ck-1"), keyed)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")


def test_a_malformed_origin_is_a_400_not_a_500():
    status, _h, body = drive(req("POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                                 Origin="http://[x"))[0]
    assert status == 400 and b"Origin" in body


def test_head_on_the_model_list_over_sockets(home, fake):
    import http.client
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("HEAD", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0
        assert resp.read() == b""
        conn.request("GET", "/v1/models")  # the same connection: nothing was left unread
        assert json.loads(conn.getresponse().read())["data"]
        conn.close()


# --- issue 27 items that live on the request path -----------------------------------------------

def test_an_expired_client_key_opens_no_route(home, fake):
    """The README says expired -> 401: /status, /v1/models and count_tokens too, not only chat."""
    add_key_account(home, KEYS[0])
    keys = ({"name": "old", "key": "ck-old-1", "expires": "2000-01-01"},
            {"name": "ok", "key": "ck-ok-1"})
    with running(make_config(home, fake, client_keys=tuple(ip.client_key(k) for k in keys))) \
            as server:
        count = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hi"}]}
        for key, expected in (("ck-old-1", 401), ("ck-ok-1", 200)):
            auth = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
            for method, path, body in (("GET", "/status", None), ("GET", "/v1/models", None),
                                       ("POST", "/v1/messages/count_tokens", count),
                                       ("POST", "/v1/chat/completions", CHAT)):
                status, _h, data = request(server, method, path, body, auth)
                assert status == expected, (key, path, data[:200])
                if expected == 401:
                    assert b"expired on 2000-01-01" in data


@pytest.mark.skipif(not hasattr(select, "POLLRDHUP"), reason="POLLRDHUP is Linux's")
def test_a_client_that_left_is_seen_behind_a_byte_it_sent_more(home, fake):
    """A CRLF after the body hid the client's FIN from a peek: its account slot stayed held
    until first_byte_timeout."""
    add_key_account(home, KEYS[0])
    fake.hold = threading.Event()
    with running(make_config(home, fake)) as server:
        sock = socket.create_connection(server.server_address[:2])
        body = json.dumps(dict(CHAT, stream=True)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        account = server.chat.router.all_accounts()[0]
        wait_for(lambda: server.chat.router.in_flight(account) == 1, what="request upstream")
        sock.sendall(b"\r\n")        # one byte more, after the body was read ...
        sock.shutdown(socket.SHUT_WR)  # ... and gone, with it still unread
        wait_for(lambda: server.chat.router.in_flight(account) == 0, timeout=5,
                 what="the slot to be freed")
        sock.close()
        fake.hold.set()
        # iFlow (and the fake) still counts the abandoned request until it has answered it
        wait_for(lambda: not any(fake.inflight.values()), what="the fake done with it")
        assert post_json(server, "/v1/chat/completions", CHAT)[0] == 200


def test_concurrent_client_key_changes_lose_nothing_acknowledged(home, fake):
    """20 x (revoke || create), all acknowledged: every revoked key refused, every created one
    accepted, all in config.json (a read-modify-write outside the lock lost them)."""
    from concurrent.futures import ThreadPoolExecutor
    from test_iflow_proxy import manage, write_config
    add_key_account(home, KEYS[0])
    write_config(home, {"management_key": "mk-secret-123", "client_keys": [
        {"name": "old-%d" % i, "key": "ck-old-key-%04d" % i} for i in range(20)]})
    with running(make_config(home, fake, max_connections=64)) as server:
        def revoke(i):
            return manage(server, "DELETE", "client-keys/old-%d" % i)[0]

        def create(i):
            status, _h, body = manage(server, "POST", "client-keys", {"name": "new-%d" % i})
            return status, body.get("key")
        with ThreadPoolExecutor(8) as pool:
            revoked = pool.map(revoke, range(20))
            created = pool.map(create, range(20))
            revoked, created = list(revoked), list(created)
        assert revoked == [200] * 20 and [s for s, _k in created] == [201] * 20
        stored = json.load(open(server.config.config_path))["client_keys"]
        assert sorted(k["name"] for k in stored) == sorted("new-%d" % i for i in range(20))
        for i in range(20):
            old = {"Authorization": "Bearer ck-old-key-%04d" % i}
            assert request(server, "GET", "/v1/models", None, old)[0] == 401
        for _status, key in created:
            assert request(server, "GET", "/v1/models", None,
                           {"Authorization": "Bearer " + key})[0] == 200


def test_the_dashboard_stops_asking_with_a_refused_management_key(home, fake, tmp_path):
    """Its 5-second refresh with a mistyped key used to count as guesses until this machine
    was banned; now the page stops after the first 401 and says why."""
    from test_iflow_proxy import (enter_management_key, require_selenium, selenium_chrome,
                                  write_config)
    require_selenium()
    from selenium.webdriver.common.by import By
    add_key_account(home, KEYS[0], nickname="work")
    write_config(home, {"management_key": "mk-dash-123"})
    with running(make_config(home, fake)) as server:
        driver = selenium_chrome(tmp_path, 1280, 900)
        try:
            driver.get(server.url + "/")
            wait_for(lambda: "work" in driver.find_element(By.ID, "accounts").text,
                     what="accounts rendered")
            enter_management_key(driver, "mk-mistyped")
            wait_for(lambda: "refused" in driver.find_element(By.ID, "mgmtnote").text,
                     what="the page to say the key was refused")
            guesses = len(server.guard._recent)
            assert 1 <= guesses <= 2  # (the page asks for settings and keys at once)
            wait_for(lambda: "up " in driver.find_element(By.ID, "summary").text,
                     what="a refresh")
            refreshed = driver.find_element(By.ID, "summary").text
            wait_for(lambda: driver.find_element(By.ID, "summary").text != refreshed,
                     timeout=15, what="another refresh")  # (the status line ticks)
            assert len(server.guard._recent) == guesses  # no more guesses from the page
            driver.save_screenshot(str(tmp_path / "dashboard-refused.png"))
            driver.set_window_size(412, 915)  # and on a phone
            driver.execute_script("document.getElementById('mgmtnote').scrollIntoView()")
            driver.save_screenshot(str(tmp_path / "dashboard-refused-phone.png"))
        finally:
            driver.quit()


def test_leftovers_of_killed_writes_are_cleaned(home):
    """kill -9 mid-write left temporary files holding API keys, and credential files of
    removed accounts; serve and logout remove them (only old ones: a writer may be at work)."""
    import os
    entry = add_key_account(home, KEYS[0], nickname="kept")
    registry = ip.AccountRegistry(home)
    auth = registry.auth_dir
    leftovers = [os.path.join(home, ".accounts.json.0123456789ab.tmp"),
                 os.path.join(home, ".usage.json.ba9876543210.tmp"),
                 os.path.join(auth, ".iflow-x.json.00aa11bb22cc.tmp"),
                 os.path.join(auth, "iflow-removed-account.json")]
    fresh = os.path.join(home, ".config.json.ffffffffffff.tmp")
    mine = [os.path.join(home, "notes.tmp"), os.path.join(home, "config.json")]
    for path in leftovers + [fresh] + mine:
        with open(path, "w") as f:
            f.write('{"api_key": "sk-secret"}')
    old = time.time() - 3600
    for path in leftovers + mine:
        os.utime(path, (old, old))
    removed = registry.clean_leftovers()
    assert sorted(removed) == sorted(os.path.basename(p) for p in leftovers)
    assert all(os.path.exists(p) for p in [fresh] + mine)
    assert os.path.exists(registry.credential_path(entry)) and \
        registry.read()["accounts"][0]["nickname"] == "kept"


def test_the_homes_owner_gets_status_without_a_client_key(home, fake):
    """`serve --client-key K`, then `status` from the same home (no key): the owner, who can
    read the home's 0600 run.json, is let in to /status with its token, and to nothing else."""
    import os
    import subprocess
    import sys
    from test_iflow_proxy import HERE, serve_subprocess
    add_key_account(home, KEYS[0])
    proc, port = serve_subprocess(home, fake, "--client-key", "ck-only-mine")
    try:
        env = dict(os.environ, IFLOW_PROXY_HOME=home)
        out = subprocess.run([sys.executable, "iflow_proxy.py", "status"], cwd=HERE, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "127.0.0.1:%d" % port in out.stdout and "wants a client key" not in out.stderr
        token = json.load(open(os.path.join(home, "run.json")))["status_token"]
        server = type("S", (), {"server_address": ("127.0.0.1", port)})
        assert request(server, "GET", "/status", None, {"Authorization": "Bearer " + token})[0] \
            == 200
        for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST")):
            assert request(server, method, path, CHAT if method == "POST" else None, {
                "Authorization": "Bearer " + token, "Content-Type": "application/json"})[0] == 401
    finally:
        proc.terminate()
        proc.wait(30)


def test_model_globs_hold_for_the_model_actually_sent(home, fake, clock):
    """A key limited to glm-* got qwen3-coder-plus through an alias named glm-fast or a
    fallback chain, while a Claude name that maps to glm was refused."""
    add_key_account(home, KEYS[0])
    keys = (ip.client_key({"name": "bob", "key": "ck-bob-1", "models": ["glm-*"]}),)
    config = make_config(home, fake, client_keys=keys,
                         model_aliases={"glm-fast": "qwen3-coder-plus"},
                         model_fallbacks={"glm-4.6": ["qwen3-coder-plus"]},
                         claude_models={"sonnet": "glm-4.6"})
    auth = {"Authorization": "Bearer ck-bob-1", "Content-Type": "application/json"}
    with running(config, router_clock=clock) as server:
        status, _h, data = request(server, "POST", "/v1/chat/completions",
                                   dict(CHAT, model="glm-fast"), auth)
        assert status == 403 and b"qwen3-coder-plus" in data
        status, _h, data = request(server, "POST", "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}]}, dict(auth, **{
                "anthropic-version": "2023-06-01"}))
        assert status == 200, data  # the Claude name maps to glm-4.6: allowed
        fake.push(KEYS[0], ("http", 503))  # glm-4.6 fails: the chain's next model is not glm
        status, _h, data = request(server, "POST", "/v1/chat/completions", CHAT, auth)
        assert status in (502, 503), data
        sent = [r[2]["model"] for r in fake.chat_requests()]
        assert "qwen3-coder-plus" not in sent, sent


def test_a_stream_left_before_its_usage_report_is_still_counted(home, fake):
    """tokens_per_day was dodged by leaving before the last chunk (where usage comes): what was
    relayed is counted instead, the prompt estimated and the output text seen."""
    add_key_account(home, KEYS[0])
    keys = (ip.client_key({"name": "bob", "key": "ck-bob-1", "tokens_per_day": 100000}),)
    fake.responder = lambda body: {"content": "The quick brown fox jumps over the lazy dog. " * 8,
                                   "chunk": 10000}
    fake.gate = threading.Event()  # the fake stops after its first chunk: no usage yet
    with running(make_config(home, fake, client_keys=keys)) as server:
        sock = socket.create_connection(server.server_address[:2])
        body = json.dumps(dict(CHAT, stream=True)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                     b"Bearer ck-bob-1\r\nContent-Type: application/json\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (len(body), body))
        sock.settimeout(10)
        seen = b""
        while b"lazy dog" not in seen:
            piece = sock.recv(65536)
            assert piece, seen  # (the answer ended without the words)
            seen += piece
        sock.close()  # every word read, the usage report never
        wait_for(lambda: server.chat.usage.client_tokens("bob") > 0, what="usage recorded")
        fake.gate.set()
        rows = [r for r in server.chat.usage.client_rows() if r["client"] == "bob"]
        assert rows[0]["input_tokens"] > 0 and rows[0]["output_tokens"] >= 50, rows


def test_a_stream_is_recorded_before_its_client_has_the_end(home, fake):
    """A stream's usage and its account slot were settled only after its last bytes were
    written: a client (or a dashboard) looking at once missed the request it had just read
    whole.  Each of the three APIs, 15 times: counted and free the moment the client has it."""
    add_key_account(home, KEYS[0])
    asks = [("/v1/chat/completions", dict(CHAT, stream=True), b"data: [DONE]"),
            ("/v1/messages", {"model": "claude-sonnet-4", "max_tokens": 50, "stream": True,
                              "messages": [{"role": "user", "content": "hi"}]}, b"message_stop"),
            ("/v1/responses", {"model": "glm-4.6", "input": "hi", "stream": True},
             b"response.completed")]
    with running(make_config(home, fake, max_concurrency=0)) as server:
        account = server.chat.router.all_accounts()[0]
        for i in range(45):
            path, body, end = asks[i % 3]
            status, _h, data = request(server, "POST", path, body, {
                "Content-Type": "application/json", "anthropic-version": "2023-06-01"})
            assert status == 200 and end in data.rstrip().split(b"\n\n")[-1], data[-200:]
            assert sum(r["requests"] for r in server.chat.usage.day_rows()) == i + 1, path
            assert server.chat.router.in_flight(account) == 0


def test_requests_sent_at_once_cannot_overshoot_a_token_budget(home, fake):
    """Checked before and counted after, 8 requests sent together all got in under a budget
    that fits two: each one's prompt is now reserved when it is let in (and released once its
    usage is recorded), so the ones past the budget are refused at once."""
    add_key_account(home, KEYS[0])
    keys = (ip.client_key({"name": "bob", "key": "ck-bob-1", "tokens_per_day": 1000}),)
    body = dict(CHAT, messages=[{"role": "user", "content": "word " * 1500}])  # ~400 tokens
    fake.hold = threading.Event()
    auth = {"Authorization": "Bearer ck-bob-1", "Content-Type": "application/json"}
    with running(make_config(home, fake, client_keys=keys, max_concurrency=0)) as server:
        results, threads = [], []
        for _ in range(8):
            thread = threading.Thread(target=lambda: results.append(
                request(server, "POST", "/v1/chat/completions", body, auth)[0]), daemon=True)
            thread.start()
            threads.append(thread)
        wait_for(lambda: len(results) + len(fake.chat_requests()) >= 8,
                 what="every request let in or refused")
        admitted = len(fake.chat_requests())
        fake.hold.set()
        for thread in threads:
            thread.join(30)
        assert 1 <= admitted <= 2 and results.count(429) == 8 - admitted, (admitted, results)
        # each reservation is released once its usage is recorded (the fake reports 16
        # tokens a request): the budget is free again for a request that fits
        wait_for(lambda: request(server, "POST", "/v1/chat/completions", body, auth)[0] == 200,
                 what="reservations released")


def test_a_client_key_sees_only_its_own_usage_in_status(home, fake):
    add_key_account(home, KEYS[0])
    keys = tuple(ip.client_key({"name": n, "key": "ck-%s-123456" % n}) for n in ("alice", "bob"))
    with running(make_config(home, fake, client_keys=keys)) as server:
        for name in ("alice", "bob"):
            auth = {"Authorization": "Bearer ck-%s-123456" % name,
                    "Content-Type": "application/json"}
            assert request(server, "POST", "/v1/chat/completions", CHAT, auth)[0] == 200
        seen = json.loads(request(server, "GET", "/status", None,
                                  {"Authorization": "Bearer ck-alice-123456"})[2])
        assert [r["client"] for r in seen["clients_today"]] == ["alice"]
        owner = json.loads(request(server, "GET", "/status", None, {
            "Authorization": "Bearer " + server.status_token})[2])
        assert sorted(r["client"] for r in owner["clients_today"]) == ["alice", "bob"]


def test_client_usage_survives_a_crash_between_saves(tmp_path):
    """usage.json is saved now and then: what a client key used since is in usage.journal,
    replayed at start (and only once: a save folds it in and empties it)."""
    path = str(tmp_path / "usage.json")
    book = ip.UsageBook(path)
    book.record("acct", "glm-4.6", 200, {"prompt_tokens": 40, "completion_tokens": 2}, 5, "bob")
    book.save()
    book.record("acct", "glm-4.6", 200, {"prompt_tokens": 30, "completion_tokens": 1}, 5, "bob")
    # (no save: the process is killed here)
    again = ip.UsageBook(path)
    assert again.client_tokens("bob") == 73
    again.save()
    assert open(again.journal_path).read() == ""
    assert ip.UsageBook(path).client_tokens("bob") == 73  # not counted twice
    with open(again.journal_path, "a") as f:
        f.write('{"n": 99, "d": "%s", "c": "bob", "m": "x", "i": 5, "o"' % again.today())
    assert ip.UsageBook(path).client_tokens("bob") == 73  # a line cut by the kill: skipped


def serve_process(home, fake):
    """(process, server address object) of `iflow_proxy.py serve` on this home, once it is up."""
    import os
    import subprocess
    import sys
    from test_iflow_proxy import HERE
    env = dict(os.environ, IFLOW_PROXY_HOME=home, IFLOW_API_BASE=fake.url + "/v1")
    run = os.path.join(home, "run.json")
    if os.path.exists(run):
        os.unlink(run)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "serve"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(run) and json.load(open(run)).get("url"),
             what="the proxy up")
    port = int(json.load(open(run))["url"].rsplit(":", 1)[1])
    return proc, type("S", (), {"server_address": ("127.0.0.1", port)})()


def test_kill_9_does_not_reset_a_token_budget(home, fake, tmp_path):
    import os
    import signal
    from test_iflow_proxy import write_config
    add_key_account(home, KEYS[0])
    write_config(home, {"client_keys": [{"name": "bob", "key": "ck-bob-123456",
                                         "tokens_per_day": 32}], "port": 0})
    auth = {"Authorization": "Bearer ck-bob-123456", "Content-Type": "application/json"}

    def serve():
        return serve_process(home, fake)

    proc, server = serve()
    try:
        for _ in range(2):  # the fake counts 16 tokens a request: the budget is spent
            assert request(server, "POST", "/v1/chat/completions", CHAT, auth)[0] == 200
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    proc, server = serve()
    try:
        status, _h, data = request(server, "POST", "/v1/chat/completions", CHAT, auth)
        assert status == 429 and b"used its 32 tokens" in data, data
    finally:
        proc.terminate()
        proc.wait(10)


def test_random_kills_during_key_changes_and_streams(home, fake):
    """kill -9 at random moments while client keys are created and revoked and a client key
    streams answers (issue 27 items 1, 3, 7, 8): after each kill config.json is whole (0600)
    and holds every acknowledged creation and no acknowledged revocation, the client key's
    tokens of every finished answer are still counted, and the next start removes the
    temporary files the kill left."""
    import os
    import random
    import stat
    from test_iflow_proxy import manage, write_config
    rng = random.Random(27)
    add_key_account(home, KEYS[0])
    write_config(home, {"management_key": "mk-secret-123", "port": 0, "client_keys": [
        {"name": "bob", "key": "ck-bob-123456", "tokens_per_day": 10 ** 7}]})
    bob = {"Authorization": "Bearer ck-bob-123456", "Content-Type": "application/json"}
    created, revoked, answered = {}, set(), [0]
    asked_to_revoke = set()  # (a revocation the kill cut off may or may not have been written)
    registry = ip.AccountRegistry(home)
    leftover = re.compile(r"\..+\.[0-9a-f]{12}\.tmp\Z")

    def temp_files():
        return [os.path.join(d, n) for d in (home, registry.auth_dir) for n in os.listdir(d)
                if leftover.match(n)]
    for round_ in range(5):
        proc, server = serve_process(home, fake)
        assert temp_files() == []  # the last kill's leftovers (aged below) are gone
        done, stop = [0], threading.Event()

        def create():
            n = 0
            while not stop.is_set():
                n += 1
                name = "k-%d-%d" % (round_, n)
                try:
                    status, _h, body = manage(server, "POST", "client-keys", {"name": name})
                except (OSError, http.client.HTTPException):
                    return
                if status == 201:
                    created[name] = body["key"]
                    done[0] += 1

        def revoke():
            for name in [n for n in list(created) if n not in revoked]:
                if stop.is_set():
                    return
                asked_to_revoke.add(name)
                try:
                    status = manage(server, "DELETE", "client-keys/" + name)[0]
                except (OSError, http.client.HTTPException):
                    return
                if status == 200:
                    revoked.add(name)
                    done[0] += 1

        def stream():
            while not stop.is_set():
                try:
                    status, _h, data = request(server, "POST", "/v1/chat/completions",
                                               dict(CHAT, stream=True), bob)
                except (OSError, http.client.HTTPException):  # (killed mid-answer: cut)
                    return
                if status == 200 and data.rstrip().endswith(b"data: [DONE]"):
                    answered[0] += 1
                    done[0] += 1
        workers = [threading.Thread(target=f) for f in (create, revoke, stream, stream)]
        for worker in workers:
            worker.start()
        target = rng.randint(3, 25)
        try:
            wait_for(lambda: done[0] >= target, what="%d acknowledged changes" % target)
        finally:
            proc.kill()  # kill -9, in the middle of whatever the workers are doing
            proc.wait(10)
            stop.set()
            for worker in workers:
                worker.join(30)
        path = os.path.join(home, "config.json")
        stored = {k["name"] for k in json.load(open(path))["client_keys"]}
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert set(created) - asked_to_revoke <= stored and not stored & revoked, round_
        assert ip.UsageBook(os.path.join(home, "usage.json")).client_tokens("bob") >= \
            16 * answered[0]  # (the fake's answer is 16 tokens)
        old = time.time() - 3600
        for path in temp_files():  # as if the kill was long ago: the next start removes it
            os.utime(path, (old, old))
    proc, server = serve_process(home, fake)
    try:
        assert temp_files() == []
        for name, key in created.items():
            auth = {"Authorization": "Bearer " + key}
            if name in revoked or name not in asked_to_revoke:
                assert request(server, "GET", "/v1/models", None, auth)[0] == (
                    401 if name in revoked else 200), name
        assert revoked and answered[0] >= 5
    finally:
        proc.terminate()
        proc.wait(10)


# --- answers no provider should send ------------------------------------------------------------

class ScriptedUpstream(FakeServer):
    """Answers every POST with its ``answer`` (content type, bytes) as it is."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.answer = ("application/json", b"{}")
        self.url = "http://127.0.0.1:%d" % self.server_address[1]
        self.serve_in_thread()


class ScriptedHandler(QuietHandler):

    def do_GET(self):
        self.send_bytes("application/json", b'{"object": "list", "data": [{"id": "m1"}]}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_bytes(*self.server.answer)

    def send_bytes(self, content_type, body):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


OPENAI_ANSWER = {
    "id": "c1", "object": "chat.completion", "created": 1, "model": "m1", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "hi", "reasoning_content": "r", "tool_calls": [{
                "id": "t1", "type": "function", "function": {"name": "f",
                                                             "arguments": '{"a": 1}'}}]}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {
        "cached_tokens": 1}, "completion_tokens_details": {"reasoning_tokens": 1}}}
ANTHROPIC_ANSWER = {
    "id": "msg1", "type": "message", "role": "assistant", "model": "m1", "content": [
        {"type": "thinking", "thinking": "r", "signature": "s"}, {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
    "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 3,
                                         "cache_read_input_tokens": 1}}


def openai_events():
    def chunk(delta, finish=None, **extra):
        return dict({"id": "c1", "object": "chat.completion.chunk", "model": "m1", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}, **extra)
    return [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "r"}),
            chunk({"content": "hi"}), chunk({"tool_calls": [{"index": 0, "id": "t1", "type":
                                                             "function", "function": {
                                                                 "name": "f", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
            chunk({}, "tool_calls", usage={"prompt_tokens": 5, "completion_tokens": 3})]


def anthropic_events():
    def block(index, start, *deltas):
        return [{"type": "content_block_start", "index": index, "content_block": start}] + [
            {"type": "content_block_delta", "index": index, "delta": d} for d in deltas] + [
            {"type": "content_block_stop", "index": index}]
    return [{"type": "message_start", "message": {
        "id": "msg1", "type": "message", "role": "assistant", "model": "m1", "content": [],
        "usage": {"input_tokens": 5, "output_tokens": 0}}}] + \
        block(0, {"type": "thinking", "thinking": ""}, {"type": "thinking_delta",
                                                       "thinking": "r"},
              {"type": "signature_delta", "signature": "s"}) + \
        block(1, {"type": "text", "text": ""}, {"type": "text_delta", "text": "hi"}) + \
        block(2, {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
              {"type": "input_json_delta", "partial_json": '{"a": 1}'}) + \
        [{"type": "message_delta", "delta": {"stop_reason": "tool_use"},
          "usage": {"output_tokens": 3}}, {"type": "message_stop"}]


RESPONSES_ANSWER = {
    "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m1",
    "output": [{"type": "reasoning", "id": "rs_1", "summary": [
                   {"type": "summary_text", "text": "r"}]},
               {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
               {"type": "function_call", "id": "fc_1", "call_id": "t1", "name": "f",
                "arguments": '{"a": 1}', "status": "completed"}],
    "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8,
              "input_tokens_details": {"cached_tokens": 1},
              "output_tokens_details": {"reasoning_tokens": 1}}}


def responses_events():
    created = dict(RESPONSES_ANSWER, status="in_progress", output=[], usage=None)
    item = RESPONSES_ANSWER["output"]
    return [{"type": "response.created", "sequence_number": 0, "response": created},
            {"type": "response.output_item.added", "output_index": 1, "item": dict(
                item[1], content=[], status="in_progress")},
            {"type": "response.output_text.delta", "output_index": 1, "content_index": 0,
             "item_id": "msg_1", "delta": "hi"},
            {"type": "response.output_item.done", "output_index": 1, "item": item[1]},
            {"type": "response.function_call_arguments.delta", "output_index": 2,
             "item_id": "fc_1", "delta": '{"a": 1}'},
            {"type": "response.completed", "response": RESPONSES_ANSWER}]


def sse_bytes(events, anthropic):
    out = b"".join((b"event: %s\n" % e["type"].encode() if anthropic and isinstance(e, dict)
                    and isinstance(e.get("type"), str) else b"") +
                   b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"" if anthropic else b"data: [DONE]\n\n")


def weird_answers(rng, protocol, stream, count):
    """``count`` answers of ``protocol``, each with one field (or a whole stream event) set
    to a weird value."""
    if not stream:
        valid = {"openai": OPENAI_ANSWER, "anthropic": ANTHROPIC_ANSWER,
                 "responses": RESPONSES_ANSWER}[protocol]
        cases = [("application/json", json.dumps(body).encode())
                 for _path, body in mutations(rng, valid)]
    else:
        events = {"openai": openai_events, "anthropic": anthropic_events,
                  "responses": responses_events}[protocol]()
        cases = []
        for i, event in enumerate(events):
            for _path, weird in list(mutations(rng, event)) + [([], w) for w in WEIRD_VALUES]:
                cases.append(("text/event-stream", sse_bytes(
                    events[:i] + [weird] + events[i + 1:], protocol != "openai")))
    rng.shuffle(cases)
    return cases[:count]


CLIENT_ASKS = [("/v1/chat/completions", {"model": "m1", "messages": [
                    {"role": "user", "content": "hi"}], "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {}}}]}, {}),
               ("/v1/messages", {"model": "m1", "max_tokens": 50, "messages": [
                   {"role": "user", "content": "hi"}], "tools": [
                   {"name": "f", "input_schema": {"type": "object"}}]},
                {"anthropic-version": "2023-06-01"}),
               ("/v1/responses", {"model": "m1", "input": "hi", "tools": [
                   {"type": "function", "name": "f", "parameters": {}}]}, {})]


def add_scripted_account(home, protocol, url):
    """An account of ``protocol`` on the scripted upstream at ``url`` ("responses": one of
    OpenRouter's, whose Responses API a Responses client's request goes to as it is); the
    client requests (path, body, headers) that reach it."""
    key = KEYS[0] if protocol != "anthropic" else "sk-anthropic-1111"
    if protocol == "responses":
        add_provider_account(home, key, "openrouter", "openai", url + "/v1")
        return CLIENT_ASKS[2:]
    add_provider_account(home, key, "", protocol, url + ("/v1" if protocol == "openai" else ""))
    return CLIENT_ASKS


def ask(server, path, body, headers):
    """(status, body bytes) of one POST, read to its end (a stream left open times out)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=20)
    try:
        conn.request("POST", path, json.dumps(body), dict(headers, **{
            "Content-Type": "application/json"}))
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "responses"])
def test_answers_of_every_wrong_shape_are_errors_never_crashes_or_hangs(home, protocol, clock,
                                                                        caplog):
    """Each field of an upstream's answer (JSON, or one stream event) set to a weird value,
    read by a client of each API: an answer, or a clear error (a 502, or the stream's error
    event): never an internal error, and never a stream left open (a crash mid-stream once
    left the client waiting for ever).  "responses": an OpenRouter account, whose Responses
    API a Responses client's request goes to as it is."""
    import random
    rng = random.Random(20261203)
    upstream = ScriptedUpstream()
    try:
        clients = add_scripted_account(home, protocol, upstream.url)
        config = ip.load_config(home, {}, {}).replace(port=0, max_concurrency=0)
        with caplog.at_level("ERROR", logger="iflow_proxy"), \
                running(config, router_clock=clock) as server:
            for stream in (False, True):
                for answer in weird_answers(rng, protocol, stream, 35):
                    upstream.answer = answer
                    for path, body, headers in clients:
                        clock.advance(86400)  # (a malformed answer cools the account)
                        status, data = ask(server, path, dict(body, stream=stream), headers)
                        assert status in (200, 502), (path, answer, data[:300])
                        assert b"internal error" not in data, (path, answer, data[:300])
        assert not [r for r in caplog.records if r.exc_info], caplog.text[-2000:]
    finally:
        upstream.stop()


class RawUpstream:
    """Answers each POST with the bytes in ``answer`` (status line and all), then closes; a GET
    gets a model list."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.answer = b""
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(10)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536) or b"\r\n\r\n"
                head, _, body = data.partition(b"\r\n\r\n")
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                size = int(found.group(1)) if found else 0
                while len(body) < size:
                    body += conn.recv(65536) or b"x" * size
                models = b'{"object": "list", "data": [{"id": "m1"}]}'
                conn.sendall(self.answer if head.startswith(b"POST") else
                             b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(models), models))
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self):
        self.sock.close()


def garbled(rng, data):
    """``data`` with a few byte-level changes: cuts, framing tokens, random bytes, repeats."""
    tokens = [b"\r\n", b"\n", b"\r", b" ", b":", b"\x00", b"\xff", b"-1", b"99999999999999999999",
              b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
              b"Content-Encoding: gzip\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"data: ",
              b"\n\n", b"[DONE]", b"event: error\n", b"{", b"}", b"\"", b"HTTP/1.1 429 Slow\r\n",
              b"Retry-After: 99999999999\r\n"]
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        choice, at = rng.random(), rng.randrange(len(data) + 1)
        if choice < 0.25:
            del data[at:at + rng.randint(1, 30)]
        elif choice < 0.55:
            data[at:at] = rng.choice(tokens)
        elif choice < 0.7 and at < len(data):
            data[at] = rng.randrange(256)
        elif choice < 0.85:
            del data[at:]
        else:
            start = rng.randrange(len(data))
            data[at:at] = data[start:start + rng.randint(1, 60)]
    return bytes(data)


def http_answer(rng, content_type, body):
    """A 200 answer framed by Content-Length or (at random) chunked in random pieces."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n" % content_type.encode()
    if rng.random() < 0.5:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    pieces, at = [], 0
    while at < len(body):
        piece = body[at:at + rng.randint(1, 300)]
        pieces.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        at += len(piece)
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(pieces) + b"0\r\n\r\n"


ENDS = {"/v1/chat/completions": (b"data: [DONE]", b'"error"'),
        "/v1/messages": (b"message_stop", b"event: error"),
        "/v1/responses": (b"response.completed", b"response.failed", b"response.incomplete")}


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "responses"])
def test_answers_garbled_on_the_wire_are_errors_never_crashes_or_cut_answers(home, protocol,
                                                                             clock, caplog):
    """Byte-level damage to a valid answer (its status line, headers, framing or body): the
    client gets a whole answer (JSON that parses as UTF-8; a stream that ends with its end
    event), or a clear error (a 502, or the stream's error event), and nothing else (a JSON
    answer whose bytes were not UTF-8 was once relayed as it came)."""
    import random
    rng = random.Random(20261203)
    upstream = RawUpstream()
    answers = {"openai": (OPENAI_ANSWER, openai_events), "anthropic": (
        ANTHROPIC_ANSWER, anthropic_events), "responses": (RESPONSES_ANSWER, responses_events)}
    whole, events = answers[protocol]
    try:
        clients = add_scripted_account(home, protocol, upstream.url)
        config = ip.load_config(home, {}, {}).replace(port=0, max_concurrency=0,
                                                      first_byte_timeout=5, idle_timeout=5)
        with caplog.at_level("ERROR", logger="iflow_proxy"), \
                running(config, router_clock=clock) as server:
            for _ in range(150):
                stream = rng.random() < 0.5
                body = sse_bytes(events(), protocol != "openai") if stream else \
                    json.dumps(whole).encode()
                upstream.answer = garbled(rng, http_answer(
                    rng, "text/event-stream" if stream else "application/json", body))
                path, asked, headers = rng.choice(clients)
                clock.advance(86400)  # (a malformed answer cools the account)
                status, data = ask(server, path, dict(asked, stream=stream), headers)
                case = (path, upstream.answer, data[-300:])
                assert status in (200, 502) and b"internal error" not in data, case
                if status == 200 and not stream:
                    json.loads(data.decode("utf-8"))
                elif status == 200:
                    last = data.rstrip().split(b"\n\n")[-1]
                    assert any(end in last for end in ENDS[path]), case
        assert not [r for r in caplog.records if r.exc_info], caplog.text[-2000:]
    finally:
        upstream.stop()


def test_a_native_response_that_cannot_be_continued_is_a_502_naming_it(home, clock):
    """A Responses upstream's output items become the next turn's input (previous_response_id):
    one that can't be read as an input item is a malformed answer, never a stored response
    that breaks the client's next turn; usage details of the wrong type are dropped."""
    upstream = ScriptedUpstream()
    good = json.loads(json.dumps(RESPONSES_ANSWER))
    good["usage"]["input_tokens_details"] = [1]  # (was an AttributeError: a 500)
    bad = dict(good, output=[{"content": "no type, no role"}])
    try:
        add_provider_account(home, KEYS[0], "openrouter", "openai", upstream.url + "/v1")
        with running(ip.load_config(home, {}, {}).replace(port=0), router_clock=clock) as server:
            upstream.answer = ("application/json", json.dumps(bad).encode())
            status, _h, body = post_json(server, "/v1/responses", {"model": "m1", "input": "hi"})
            assert status == 502 and "output[0] needs a 'type'" in body["error"]["message"]
            clock.advance(3600)  # (a malformed answer cools the account)
            upstream.answer = ("text/event-stream", sse_bytes(
                responses_events()[:-1] + [{"type": "response.completed", "response": bad}], True))
            status, _h, data = request(server, "POST", "/v1/responses", {
                "model": "m1", "input": "hi", "stream": True})
            assert status in (200, 502) and b"output[0] needs a 'type'" in data  # (the events
            # may all come in the first read, before any byte went to the client: then a 502)
            clock.advance(3600)
            upstream.answer = ("application/json", json.dumps(good).encode())
            status, _h, body = post_json(server, "/v1/responses", {"model": "m1", "input": "hi"})
            assert status == 200 and body["id"] == "resp_1"
            status, _h, _body = post_json(server, "/v1/responses", {
                "model": "m1", "input": "more", "previous_response_id": "resp_1"})
            assert status == 200
    finally:
        upstream.stop()


def test_usage_is_cleaned_and_object_arguments_become_json_text(home):
    """Counts the translations can't add up are dropped; a tool call's arguments sent as an
    object (Ollama's native form) reach an Anthropic client as the tool_use's input."""
    assert ip.clean_usage({"prompt_tokens": "5", "completion_tokens": 3, "total_tokens": -1,
                           "prompt_tokens_details": 7, "completion_tokens_details": {
                               "reasoning_tokens": 2, "x": [1]}}) == {
        "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 2}}
    assert ip.clean_usage([1]) is None
    upstream = ScriptedUpstream()
    answer = json.loads(json.dumps(OPENAI_ANSWER))
    answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = {"a": 1}
    upstream.answer = ("application/json", json.dumps(answer).encode())
    try:
        add_provider_account(home, KEYS[0], "", "openai", upstream.url + "/v1")
        with running(ip.load_config(home, {}, {}).replace(port=0)) as server:
            status, _h, message = post_json(server, "/v1/messages", {
                "model": "m1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
                {"anthropic-version": "2023-06-01"})
        assert status == 200 and message["content"][-1]["input"] == {"a": 1}, message
        assert message["usage"]["output_tokens"] == 3
    finally:
        upstream.stop()
