import pytest

from ovirt_imageio.nbd import url

VALID = [
    # qemu legacy syntax, as vdsm sends it.
    ("nbd:unix:/run/vdsm/nbd/x.sock",
     url.Address(socket="/run/vdsm/nbd/x.sock")),
    ("nbd:unix:/run/vdsm/backup/x:exportname=sda",
     url.Address(socket="/run/vdsm/backup/x", export="sda")),
    ("nbd:unix:/sock:exportname=",
     url.Address(socket="/sock", export="")),
    ("nbd:unix:/sock:exportname=a:exportname=b",
     url.Address(socket="/sock", export="a:exportname=b")),
    ("nbd:localhost:10809",
     url.Address(host="localhost", port=10809)),
    ("nbd:10.0.0.1:2000:exportname=sda",
     url.Address(host="10.0.0.1", port=2000, export="sda")),
    ("nbd:[::1]:10809",
     url.Address(host="::1", port=10809)),
    ("nbd:[fe80::1]:65535:exportname=x",
     url.Address(host="fe80::1", port=65535, export="x")),
    # NBD URIs.
    ("nbd://example.com",
     url.Address(host="example.com", port=10809)),
    ("nbd://example.com/",
     url.Address(host="example.com", port=10809, export="")),
    ("nbd://example.com:2000/sda",
     url.Address(host="example.com", port=2000, export="sda")),
    ("nbd://[::1]/sda",
     url.Address(host="::1", port=10809, export="sda")),
    ("nbd://[::1]:2000/a%20b/c",
     url.Address(host="::1", port=2000, export="a b/c")),
    ("nbd+unix:///?socket=/tmp/x.sock",
     url.Address(socket="/tmp/x.sock")),
    ("nbd+unix:///sda?socket=/tmp/x.sock",
     url.Address(socket="/tmp/x.sock", export="sda")),
    ("nbd+unix://?socket=/tmp/x.sock",
     url.Address(socket="/tmp/x.sock")),
]


@pytest.mark.parametrize("text,address", VALID, ids=[v[0] for v in VALID])
def test_parse(text, address):
    assert url.parse(text) == address


@pytest.mark.parametrize("text,address", VALID, ids=[v[0] for v in VALID])
def test_str_round_trip(text, address):
    assert url.parse(str(address)) == address


INVALID = [
    # (url, words the message must contain)
    ("", "Unsupported NBD URL"),
    ("file:///var/tmp/disk.img", "Unsupported NBD URL"),
    ("http://host/x", "Unsupported NBD URL"),
    ("nbds://host/x", "TLS"),
    ("nbds+unix:///x?socket=/s", "TLS"),
    ("nbd:unix:", "socket path is missing"),
    ("nbd:unix::exportname=x", "socket path is missing"),
    ("nbd:unix:relative/x.sock", "socket path must be absolute"),
    ("nbd:unix:/" + "x" * 200, "socket path is longer"),
    ("nbd:localhost", "expecting nbd:unix:/path or nbd:HOST:PORT"),
    ("nbd:localhost:", "port is missing"),
    ("nbd::10809", "host is missing"),
    ("nbd:localhost:port", "not a number"),
    ("nbd:localhost:0", "port must be 1-65535"),
    ("nbd:localhost:65536", "port must be 1-65535"),
    ("nbd:localhost:-1", "not a number"),
    ("nbd:::1:10809", "IPv6 address must be in brackets"),
    ("nbd:[::1]", "port is missing"),
    ("nbd:[::1:10809", "bad IPv6 address"),
    ("nbd:unix:/s:exportname=" + "x" * 4097, "export name is longer"),
    ("nbd://", "host is missing"),
    ("nbd:///sda", "host is missing"),
    ("nbd://host:abc/x", "Invalid NBD URL"),
    ("nbd://host:70000/x", "Invalid NBD URL"),
    ("nbd://host:0/x", "port must be 1-65535"),
    ("nbd://host:/x", "port is empty"),
    ("nbd://[::1/x", "Invalid NBD URL"),
    ("nbd://user@host/x", "user info is not allowed"),
    ("nbd://host/x#frag", "fragment is not allowed"),
    ("nbd://host/x?socket=/s", "unsupported parameters: socket"),
    ("nbd://host/%ff", "export name is not UTF-8"),
    ("nbd+unix:///sda", "socket parameter is missing"),
    ("nbd+unix://host/sda?socket=/s", "must not have a host"),
    ("nbd+unix:///sda?socket=s", "socket path must be absolute"),
    ("nbd+unix:///sda?socket=/a&socket=/b", "socket parameter is repeated"),
    ("nbd+unix:///sda?socket=/a&tls=on", "unsupported parameters: tls"),
    ("nbd+unix:///sda?socket", "bad query"),
    ("nbd+vsock:///sda", "Unsupported NBD URL"),
]


@pytest.mark.parametrize(
    "text,words", INVALID, ids=[v[0][:40] for v in INVALID])
def test_parse_invalid(text, words):
    with pytest.raises(ValueError) as e:
        url.parse(text)
    assert words in str(e.value)


def test_parse_not_a_string():
    with pytest.raises(ValueError) as e:
        url.parse(None)
    assert "must be a string" in str(e.value)


def test_address_needs_socket_or_host_port():
    with pytest.raises(ValueError):
        url.Address()
    with pytest.raises(ValueError):
        url.Address(host="h")
    with pytest.raises(ValueError):
        url.Address(socket="/s", host="h", port=1)


def test_address_is_frozen():
    address = url.Address(socket="/s")
    with pytest.raises(AttributeError):
        address.socket = "/other"


def test_address_is_unix():
    assert url.Address(socket="/s").is_unix
    assert not url.Address(host="h", port=1).is_unix
