"""The control API (API.md sections 2.1-2.4) over the real control socket."""

import json
import logging
import os
import stat
import threading

import pytest

import testutil


def ticket(**kw):
    d = {
        "uuid": "6f2c1f0e-1c2b-4a39-9a7e-0123456789ab",
        "size": 1 << 30,
        "ops": ["read"],
        "timeout": 300,
        "url": "nbd:unix:/run/vdsm/nbd/x.sock",
        "transfer_id": "transfer-1",
        "inactivity_timeout": 3600,
        "sparse": False,
        "dirty": False,
    }
    d.update(kw)
    return d


def text(data):
    return data.decode("utf-8")


def test_socket_mode(daemon):
    st = os.stat(daemon.cfg.control.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_put_get(daemon):
    t = ticket(filename="disk.raw")
    resp, data = daemon.api.put(t)
    assert resp.status == 200
    assert resp.getheader("content-length") == "0"
    info = daemon.api.get(t["uuid"])
    assert info == {
        "active": False,
        "canceled": False,
        "connections": 0,
        "expires": int(daemon.clock.now()) + 300,
        "idle_time": 0,
        "inactivity_timeout": 3600,
        "ops": ["read"],
        "size": 1 << 30,
        "sparse": False,
        "dirty": False,
        "timeout": 300,
        "url": "nbd:unix:/run/vdsm/nbd/x.sock",
        "uuid": t["uuid"],
        "transfer_id": "transfer-1",
        "filename": "disk.raw",
        "transferred": 0,
        # Ours, after upstream's.
        "read_bytes": 0,
        "written_bytes": 0,
        "zeroed_bytes": 0,
        "read_zero_bytes": 0,
        "failed_requests": 0,
    }


def test_put_uses_body_uuid(daemon):
    t = ticket()
    resp, _ = daemon.api.request("PUT", "/tickets/other-id", t)
    assert resp.status == 200
    assert daemon.api.get(t["uuid"])["uuid"] == t["uuid"]
    resp, _ = daemon.api.request("GET", "/tickets/other-id")
    assert resp.status == 404


def test_put_replaces(daemon):
    daemon.api.put(ticket(timeout=300))
    daemon.api.put(ticket(timeout=100))
    assert daemon.api.get(ticket()["uuid"])["timeout"] == 100


@pytest.mark.parametrize("body,message", [
    (b"{", "Ticket is not in a json format: Expecting property name "
           "enclosed in double quotes: line 1 column 2 (char 1)"),
    (b"", "Ticket is not in a json format: Expecting value: line 1 "
          "column 1 (char 0)"),
    (b"\xff\xfe", "Ticket is not in a json format: "),
    (b"[1]", "Invalid ticket: Expecting a JSON object, got list"),
    (b"[" * 60000, "Ticket is not in a json format: nested too deeply"),
    (json.dumps({"uuid": "x"}).encode(),
     "Invalid ticket: Required ticket parameter is missing: size"),
    (json.dumps(ticket(size="1")).encode(),
     "Invalid ticket: Invalid value for 'size': '1': "
     "expecting a <class 'int'> value"),
    (json.dumps(ticket(url="ftp://x/y")).encode(),
     "Invalid ticket: Invalid value for 'url': 'ftp://x/y': "
     "Unsupported url scheme: ftp"),
    (json.dumps(ticket(url="http://[1.2.3.4:33")).encode(),
     "Invalid ticket: Invalid value for 'url': 'http://[1.2.3.4:33': "
     "Invalid IPv6 URL"),
    (json.dumps(ticket(url="nbd:unix:")).encode(),
     "Invalid ticket: Invalid value for 'url': 'nbd:unix:': "),
    (json.dumps(ticket(timeout=10**400)).encode(),
     "Invalid ticket: Invalid value for 'timeout': 1000"),
    (json.dumps(ticket(inactivity_timeout=10**10)).encode(),
     "Invalid ticket: Invalid value for 'inactivity_timeout': 10000000000: "
     "expecting a value <= 2147483647"),
    (json.dumps(ticket(size=2**63)).encode(),
     "Invalid ticket: Invalid value for 'size': 9223372036854775808: "
     "expecting a value <= 9223372036854775807"),
    # Python's int() refuses more than 4300 digits (a ValueError).
    (json.dumps(ticket(size=0)).replace('"size": 0', '"size": ' + "9" * 5000)
     .encode(),
     "Ticket is not in a json format: Exceeds the limit (4300 digits)"),
    (json.dumps(ticket(filename="a\r\nSet-Cookie: x=y")).encode(),
     "Invalid ticket: Invalid value for 'filename': "
     "'a\\r\\nSet-Cookie: x=y': expecting a string without control "
     "characters"),
    (json.dumps(ticket(transfer_id="t\n1")).encode(),
     "Invalid ticket: Invalid value for 'transfer_id': 't\\n1': "
     "expecting a string without control characters"),
], ids=["truncated", "empty", "not-utf8", "list", "deep", "missing",
        "type", "scheme", "ipv6", "bad-nbd-url", "huge-timeout",
        "huge-inactivity-timeout", "huge-size", "5000-digits",
        "filename-crlf", "transfer-id-lf"])
def test_put_invalid(daemon, body, message):
    resp, data = daemon.api.request("PUT", "/tickets/x", body)
    assert resp.status == 400
    assert resp.getheader("content-type") == "text/plain; charset=UTF-8"
    assert text(data).startswith(message)
    assert text(data).endswith("\n")
    # Body consumed: the connection stays usable.
    assert resp.getheader("connection") is None
    assert len(daemon.store) == 0
    # And the daemon keeps serving.
    assert daemon.api.put(ticket())[0].status == 200


def test_put_too_large(daemon):
    # Refused before reading the body: the connection is closed.
    reply = testutil.raw_request(
        daemon.cfg.control.socket,
        b"PUT /tickets/x HTTP/1.1\r\ncontent-length: 1000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in reply
    assert reply.endswith(b"Message too large: 1000000 > 65536 bytes\n")
    assert daemon.api.put(ticket())[0].status == 200


def test_put_empty_id(daemon):
    resp, data = daemon.api.request("PUT", "/tickets/", ticket())
    assert resp.status == 400
    assert text(data) == "Ticket id is required\n"
    assert resp.getheader("connection") == "close"


def test_get_unknown(daemon):
    resp, data = daemon.api.request("GET", "/tickets/nope")
    assert resp.status == 404
    assert text(data) == "No such ticket 'nope'\n"


def test_get_empty_id(daemon):
    resp, data = daemon.api.request("GET", "/tickets/")
    assert resp.status == 400
    assert text(data) == "Ticket id is required\n"


def test_get_expired_still_reported(daemon):
    daemon.api.put(ticket(timeout=10))
    daemon.clock.advance(20)
    info = daemon.api.get(ticket()["uuid"])
    assert info["expires"] < daemon.clock.now()
    assert info["idle_time"] == 20


def test_patch_extend(daemon):
    t = ticket(timeout=10)
    daemon.api.put(t)
    daemon.clock.advance(20)
    resp, data = daemon.api.request(
        "PATCH", f"/tickets/{t['uuid']}", {"timeout": 300})
    assert resp.status == 200
    assert resp.getheader("content-length") == "0"
    info = daemon.api.get(t["uuid"])
    assert info["expires"] == int(daemon.clock.now() + 300)
    assert info["timeout"] == 10
    assert info["idle_time"] == 20  # extend is not activity


@pytest.mark.parametrize("body,status,message", [
    (b"{", 400, "Invalid patch: Expecting property name"),
    (b"[]", 400, "Invalid patch: expecting a JSON object"),
    (b"{}", 400, "Missing required value for 'timeout'"),
    (b'{"timeout": "1"}', 400, "Integer required '1'"),
    (b'{"timeout": true}', 400, "Integer required True"),
    (b'{"timeout": 1.5}', 400, "Integer required 1.5"),
    (b'{"timeout": -1}', 400, "Invalid value -1 < 0"),
    (b'{"timeout": 2147483648}', 400,
     "Invalid value 2147483648 > 2147483647"),
    (b'{"timeout": 1' + b"0" * 400 + b'}', 400, "Invalid value 1000"),
    (b'{"timeout": ' + b"9" * 5000 + b'}', 400,
     "Invalid patch: Exceeds the limit (4300 digits)"),
], ids=["json", "list", "missing", "str", "bool", "float", "negative",
        "2**31", "400-digits", "5000-digits"])
def test_patch_invalid(daemon, body, status, message):
    t = ticket()
    daemon.api.put(t)
    resp, data = daemon.api.request("PATCH", f"/tickets/{t['uuid']}", body)
    assert resp.status == status
    assert text(data).startswith(message)


def test_patch_unknown(daemon):
    resp, data = daemon.api.request("PATCH", "/tickets/nope", {"timeout": 1})
    assert resp.status == 404
    assert text(data) == "No such ticket: nope\n"


def test_patch_validation_before_lookup(daemon):
    resp, data = daemon.api.request("PATCH", "/tickets/nope", {"timeout": -1})
    assert resp.status == 400


def test_delete(daemon):
    t = ticket()
    daemon.api.put(t)
    resp, data = daemon.api.delete(t["uuid"])
    assert resp.status == 204
    assert resp.getheader("content-length") == "0"
    assert data == b""
    resp, _ = daemon.api.request("GET", f"/tickets/{t['uuid']}")
    assert resp.status == 404


def test_delete_unknown(daemon):
    resp, _ = daemon.api.delete("nope")
    assert resp.status == 204


def test_delete_all(daemon):
    for i in range(3):
        daemon.api.put(ticket(uuid=f"t{i}"))
    resp, _ = daemon.api.request("DELETE", "/tickets/")
    assert resp.status == 204
    assert len(daemon.store) == 0


def test_delete_timeout_409(make_daemon):
    daemon = make_daemon(control={"remove_timeout": "1"})
    t = ticket()
    daemon.api.put(t)
    stored = daemon.store.lookup(t["uuid"])
    with stored.operation(0):
        resp, data = daemon.api.delete(t["uuid"])
        assert resp.status == 409
        assert text(data) == "Timeout cancelling transfer transfer-1\n"
        info = daemon.api.get(t["uuid"])
        assert info["canceled"] is True
        assert info["active"] is True
    # The caller retries once the operation ended.
    resp, _ = daemon.api.delete(t["uuid"])
    assert resp.status == 204
    assert daemon.store.lookup(t["uuid"]) is None


def test_delete_waits_for_operation(make_daemon):
    daemon = make_daemon(control={"remove_timeout": "30"})
    t = ticket()
    daemon.api.put(t)
    stored = daemon.store.lookup(t["uuid"])
    op = stored.operation(0)
    result = []
    deleter = threading.Thread(
        target=lambda: result.append(daemon.api.delete(t["uuid"])[0].status))
    deleter.start()
    testutil.wait_for(lambda: stored.canceled, message="ticket canceled")
    op.__exit__(None, None, None)
    deleter.join(30)
    assert result == [204]


def test_framing(daemon):
    """Lower-case headers, HTTP/1.1 status, Content-Length, no Host."""
    reply = testutil.raw_request(
        daemon.cfg.control.socket,
        b"DELETE /tickets/x HTTP/1.1\r\nconnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 204 No Content"
    names = [line.split(":", 1)[0] for line in lines[1:]]
    assert names == [n.lower() for n in names]
    assert "server: imageio/2.5.1" in lines
    assert "content-length: 0" in lines
    assert body == b""


def test_http10_closes(daemon):
    reply = testutil.raw_request(
        daemon.cfg.control.socket,
        b"GET /tickets/x HTTP/1.0\r\n\r\nGET /tickets/y HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404 ")
    assert reply.count(b"HTTP/1.1 ") == 1


def test_pipelined(daemon):
    t = json.dumps(ticket()).encode()
    reply = testutil.raw_request(
        daemon.cfg.control.socket,
        b"PUT /tickets/a HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s"
        b"GET /tickets/%s HTTP/1.1\r\n\r\n"
        % (len(t), t, ticket()["uuid"].encode()))
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert b'"transfer_id": "transfer-1"' in reply


def test_expect_continue(daemon):
    t = json.dumps(ticket()).encode()
    reply = testutil.raw_request(
        daemon.cfg.control.socket,
        b"PUT /tickets/a HTTP/1.1\r\nexpect: 100-continue\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(t), t))
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")


@pytest.mark.parametrize("request_bytes,status,message", [
    (b"FOO /tickets/x HTTP/1.1\r\n\r\n", 405, "Invalid method 'FOO'"),
    (b"POST /tickets/x HTTP/1.1\r\n\r\n", 405,
     "Method 'POST' not defined for '/tickets/x'"),
    (b"GET /tickets HTTP/1.1\r\n\r\n", 404, "No handler for '/tickets'"),
    (b"GET /images/x HTTP/1.1\r\n\r\n", 404, "No handler for '/images/x'"),
    (b"GET /tickets/x HTTP/1.1\r\ncontent-length: abc\r\n\r\n", 400, None),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414, None),
    (b"garbage\r\n\r\n", 400, None),
], ids=["unknown-method", "not-defined", "no-slash", "images", "bad-length",
        "long-line", "garbage"])
def test_bad_requests(daemon, request_bytes, status, message):
    reply = testutil.raw_request(daemon.cfg.control.socket, request_bytes)
    assert reply.startswith(b"HTTP/1.1 %d " % status)
    if message:
        assert reply.endswith(message.encode() + b"\n")
    # Still serving.
    assert daemon.api.put(ticket())[0].status == 200


def test_profile_absent(daemon):
    resp, data = daemon.api.request("GET", "/profile/")
    assert resp.status == 404
    assert text(data) == "yappi is not installed\n"


def test_tcp_control(make_daemon):
    daemon = make_daemon(control={"transport": "TCP", "port": "0"})
    host, port = daemon.control.server.address()[:2]
    assert host in ("127.0.0.1", "::1")
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=10)
    # The engine's Java client sends no Host header.
    conn.putrequest("PUT", "/tickets/x", skip_host=True)
    body = json.dumps(ticket()).encode()
    conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.request("GET", f"/tickets/{ticket()['uuid']}")
    resp = conn.getresponse()
    assert json.loads(resp.read())["uuid"] == ticket()["uuid"]
    conn.close()


def test_ticket_id_not_logged(daemon, caplog):
    caplog.set_level(logging.DEBUG)
    t = ticket()
    daemon.api.put(t)
    daemon.api.get(t["uuid"])
    daemon.api.request("PATCH", f"/tickets/{t['uuid']}", {"timeout": 5})
    daemon.api.request("GET", "/tickets/unknown-secret-id")
    daemon.api.request("GET", "/images/unknown-secret-id")
    daemon.api.delete(t["uuid"])
    assert "transfer-1" in caplog.text
    assert t["uuid"] not in caplog.text
    assert "unknown-secret-id" not in caplog.text
