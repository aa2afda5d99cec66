"""
signed.py: tickets signed by a throw-away engine PKI (test/signing.py,
openssl), verified or refused, with a fake wall clock.
"""

import base64
import json
import math
import time
import types

import pytest

import signing
from ovirt_imageio import clock
from ovirt_imageio import errors
from ovirt_imageio import signed

TICKET_ID = "signed-ticket-secret"
DAEMON = "https://host.test:54322"
DAY = 86400


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return signing.EnginePKI(tmp_path_factory.mktemp("engine-pki"))


@pytest.fixture
def now():
    return clock.FakeClock(start=math.floor(time.time()))


def section(pki, **overrides):
    values = {"signed_tickets": True, "engine_cert_file": pki.cert_file,
              "engine_ca_cert_file": pki.ca_file, "verify_certificate": True,
              "allowed_skew_seconds": 0}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def verifier(pki, now, **overrides):
    return signed.Verifier.from_config(section(pki, **overrides), clock=now)


def sign(pki, now, **kw):
    kw.setdefault("start", now.now())
    return signing.sign(pki, TICKET_ID, DAEMON, **kw)


def refused(v, token):
    with pytest.raises(signed.InvalidTicket) as e:
        v.verify(token)
    message = str(e.value)
    assert TICKET_ID not in message
    assert token not in message
    return message


# Accepted.

@pytest.mark.parametrize("digest", ["sha1", "sha256"])
def test_verify(pki, now, digest):
    v = verifier(pki, now)
    got = v.verify(sign(pki, now, digest=digest, lifetime=300))
    assert got.ticket_id == TICKET_ID
    assert got.daemon_url == DAEMON
    assert got.url == f"{DAEMON}/images/{TICKET_ID}"
    assert got.transfer_id == "tr-signed"
    # validTo has whole seconds.
    assert int(now.now()) + 299 <= got.expires <= now.now() + 300
    assert TICKET_ID not in repr(got)


def test_verify_bytes_with_line_breaks(pki, now):
    token = sign(pki, now)
    wrapped = "\n".join(token[i:i + 76] for i in range(0, len(token), 76))
    assert verifier(pki, now).verify(wrapped.encode()).ticket_id == TICKET_ID


def test_embedded_certificate_checked_by_ca(pki, now):
    v = verifier(pki, now, engine_cert_file="")
    assert v.verify(sign(pki, now)).ticket_id == TICKET_ID


def test_pinned_certificate_without_ca(pki, now):
    v = verifier(pki, now, verify_certificate=False, engine_ca_cert_file="")
    assert v.verify(sign(pki, now)).ticket_id == TICKET_ID
    # Another key still fails: the pinned certificate verifies.
    message = refused(v, sign(pki, now, key_file=pki.other_key_file,
                              cert_file=pki.other_cert_file))
    assert "signature does not verify" in message


def test_ticket_id_quoted_in_url(pki, now):
    token = signing.sign(pki, "a/b c", DAEMON + "/", start=now.now())
    assert verifier(pki, now).verify(token).url == \
        f"{DAEMON}/images/a%2Fb%20c"


def test_missing_transfer_id(pki, now):
    token = sign(pki, now, transfer_id=None)
    assert verifier(pki, now).verify(token).transfer_id is None


# The certificate.

def test_embedded_certificate_of_another_ca(pki, now):
    v = verifier(pki, now, engine_cert_file="")
    message = refused(v, sign(pki, now, key_file=pki.other_key_file,
                              cert_file=pki.other_cert_file))
    assert "not issued by the engine CA" in message


def test_embedded_certificate_with_the_ca_name(pki, now):
    v = verifier(pki, now, engine_cert_file="")
    message = refused(v, sign(pki, now, key_file=pki.impostor_key_file,
                              cert_file=pki.impostor_file))
    assert "not signed by the engine CA" in message


def test_configured_certificate_wins_over_embedded(pki, now):
    # Signed by another key, embedding its certificate: the configured
    # engine certificate does not verify it.
    v = verifier(pki, now)
    message = refused(v, sign(pki, now, key_file=pki.other_key_file,
                              cert_file=pki.other_cert_file))
    assert "signature does not verify" in message


def test_expired_certificate(pki, now):
    v = verifier(pki, now, engine_cert_file=pki.short_cert_file)
    assert v.verify(sign(pki, now)).ticket_id == TICKET_ID
    now.advance(2 * DAY)
    message = refused(v, sign(pki, now))
    assert "certificate expired at" in message


def test_embedded_expired_certificate(pki, now):
    v = verifier(pki, now, engine_cert_file="")
    now.advance(2 * DAY)
    message = refused(v, sign(pki, now, cert_file=pki.short_cert_file))
    assert "certificate expired at" in message


def test_certificate_not_yet_valid(pki, now):
    v = verifier(pki, now)
    now.advance(-DAY)
    message = refused(v, sign(pki, now))
    assert "certificate not valid before" in message


def test_no_embedded_certificate(pki, now):
    v = verifier(pki, now, engine_cert_file="")
    env = json.loads(base64.b64decode(sign(pki, now)))
    del env["certificate"]
    assert "no certificate" in refused(v, signing.encode(env))


# The envelope and its signature.

@pytest.mark.parametrize("field,value", [
    ("data", None),
    ("validTo", None),
    ("salt", "AAAAAAAAAAA="),
    ("digest", "sha256"),
], ids=["data", "validTo", "salt", "digest"])
def test_tampered(pki, now, field, value):
    env = json.loads(base64.b64decode(sign(pki, now)))
    if field == "data":
        data = json.loads(env["data"])
        data["transfer-ticket"] = "another-ticket"
        env["data"] = json.dumps(data)
    elif field == "validTo":
        env["validTo"] = signing.date(now.now() + DAY)
    else:
        env[field] = value
    message = refused(verifier(pki, now), signing.encode(env))
    assert "signature does not verify" in message


def test_tampered_signature(pki, now):
    env = json.loads(base64.b64decode(sign(pki, now)))
    sig = bytearray(base64.b64decode(env["signature"]))
    sig[10] ^= 1
    env["signature"] = base64.b64encode(bytes(sig)).decode()
    assert "signature does not verify" in refused(
        verifier(pki, now), signing.encode(env))


def test_sha1_failure_names_crypto_policy(pki, now):
    env = json.loads(base64.b64decode(sign(pki, now, digest="sha1")))
    env["salt"] = "AAAAAAAAAAA="
    assert "crypto policy" in refused(verifier(pki, now),
                                      signing.encode(env))


@pytest.mark.parametrize("fields,missing", [
    (("salt",), "data, validFrom, validTo"),
    (("salt", "data"), "validFrom, validTo"),
    (("data", "validFrom"), "validTo"),
], ids=["salt-only", "no-dates", "no-validTo"])
def test_signed_fields_required(pki, now, fields, missing):
    message = refused(verifier(pki, now), sign(pki, now, fields=fields))
    assert f"must include data, validFrom and validTo, missing {missing}" \
        in message


def test_signed_field_missing_from_envelope(pki, now):
    env = json.loads(base64.b64decode(sign(pki, now)))
    env["signedFields"] += ",nonesuch"
    assert "'nonesuch' is not a string field" in refused(
        verifier(pki, now), signing.encode(env))


def test_unsupported_digest(pki, now):
    env = json.loads(base64.b64decode(sign(pki, now)))
    env["digest"] = "md5"
    assert "unsupported digest 'md5'" in refused(
        verifier(pki, now), signing.encode(env))


@pytest.mark.parametrize("token,reason", [
    ("not base64!", "not base64"),
    (base64.b64encode(b"not json").decode(), "not a JSON envelope"),
    (base64.b64encode(b"[1, 2]").decode(), "not a JSON envelope"),
    (base64.b64encode(b"{}").decode(), "no signedFields"),
    ("\u00e9t\u00e9", "not base64"),
    ("A" * (signed.MAX_TOKEN + 4), "longer than"),
], ids=["base64", "json", "list", "empty", "unicode", "huge"])
def test_malformed(pki, now, token, reason):
    assert reason in refused(verifier(pki, now), token)


@pytest.mark.parametrize("change,reason", [
    ({"imaged-uri": "nbd:unix:/sock"}, "http or https URL"),
    ({"imaged-uri": "https://host:99999"}, "invalid 'imaged-uri'"),
    ({"imaged-uri": "https://host/?a=b"}, "without query"),
    ({"transfer-ticket": ""}, "no valid 'transfer-ticket'"),
    ({"transfer-ticket": "a\r\nb"}, "no valid 'transfer-ticket'"),
    ({"exp": "soon"}, "no number 'exp'"),
    ({"nbf": True}, "no number 'nbf'"),
], ids=["scheme", "port", "query", "empty-id", "crlf-id", "exp", "nbf"])
def test_invalid_payload(pki, now, change, reason):
    data = json.loads(signing.payload(TICKET_ID, DAEMON, now.now(),
                                      now.now() + 300))
    data.update(change)
    env = signing.envelope(pki.key_file, pki.cert_file, json.dumps(data),
                           now.now(), now.now() + 300)
    assert reason in refused(verifier(pki, now), signing.encode(env))


# Time.

def test_expired(pki, now):
    v = verifier(pki, now)
    token = sign(pki, now, lifetime=60)
    v.verify(token)
    now.advance(61)
    assert "expired at" in refused(v, token)


def test_not_yet_valid(pki, now):
    token = sign(pki, now, start=now.now() + 30)
    assert "not valid before" in refused(verifier(pki, now), token)


def test_payload_expired_before_envelope(pki, now):
    # exp is checked on its own: a payload ending before validTo ends the
    # ticket then.
    token = sign(pki, now, lifetime=300, exp=now.now() + 10)
    v = verifier(pki, now)
    assert v.verify(token).expires == pytest.approx(now.now() + 10, abs=1)
    now.advance(11)
    assert "(exp)" in refused(v, token)


def test_payload_not_yet_valid(pki, now):
    token = sign(pki, now, nbf=now.now() + 30)
    assert "(nbf)" in refused(verifier(pki, now), token)


def test_skew_tolerates_start(pki, now):
    token = sign(pki, now, start=now.now() + 30)
    assert verifier(pki, now, allowed_skew_seconds=60).verify(
        token).ticket_id == TICKET_ID
    refused(verifier(pki, now, allowed_skew_seconds=10), token)


def test_skew_tolerates_end(pki, now):
    token = sign(pki, now, lifetime=60)
    v = verifier(pki, now, allowed_skew_seconds=30)
    now.advance(80)
    got = v.verify(token)
    # The grant ends with the tolerance.
    assert got.expires > now.now()
    now.advance(20)
    assert "expired at" in refused(v, token)


# Configuration.

def test_config_requires_a_certificate(pki, now):
    with pytest.raises(errors.Error) as e:
        verifier(pki, now, engine_cert_file="", engine_ca_cert_file="")
    assert "needs the engine's certificate" in str(e.value)


def test_config_verify_needs_ca(pki, now):
    with pytest.raises(errors.Error) as e:
        verifier(pki, now, engine_ca_cert_file="")
    assert "verify_certificate = true needs engine_ca_cert_file" in str(
        e.value)


def test_config_no_verify_needs_cert(pki, now):
    with pytest.raises(errors.Error) as e:
        verifier(pki, now, engine_cert_file="", verify_certificate=False)
    assert "verify_certificate = false needs engine_cert_file" in str(
        e.value)


def test_config_cert_not_from_ca(pki, now):
    with pytest.raises(errors.Error) as e:
        verifier(pki, now, engine_cert_file=pki.other_cert_file)
    assert "is not certified by engine_ca_cert_file" in str(e.value)


def test_config_missing_file(pki, now, tmp_path):
    missing = str(tmp_path / "nonesuch.pem")
    with pytest.raises(errors.Error) as e:
        verifier(pki, now, engine_ca_cert_file=missing)
    assert f"engine_ca_cert_file {missing!r}: [Errno 2]" in str(e.value)


def test_config_not_pem(pki, now, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(errors.Error) as e:
        verifier(pki, now, engine_cert_file=str(bad))
    assert "not a PEM certificate" in str(e.value)
