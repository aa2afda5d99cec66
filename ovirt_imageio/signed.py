"""
Tickets signed by the engine, as the 1.x proxy took them (../shared/
CLIENTS.md section 2): verify one and say which daemon ticket it grants.

A signed ticket is base64 of a JSON envelope:

    salt          base64 of random bytes (makes each ticket unique)
    digest        "sha1" (the old engine) or "sha256"
    validFrom     UTC, yyyyMMddHHmmss
    validTo       UTC, yyyyMMddHHmmss
    data          the payload, a JSON object as a string
    signedFields  comma-separated names of the fields signed, in order
    signature     base64 of an RSA PKCS#1 v1.5 signature, with digest, of
                  the UTF-8 values of the signed fields concatenated
    certificate   PEM of the signer (used only without engine_cert_file)

and the payload: nbf, exp (epoch seconds), imaged-uri (the daemon's base
URL), transfer-ticket (the daemon's ticket id), optional transfer-id.

Verification, in order, each failure an InvalidTicket saying what failed
(never quoting the token or the ticket id): the envelope decodes; the
signed fields include data, validFrom and validTo (the old decoder took a
ticket signing only the salt, whose data anyone could change); the
signer's certificate (engine_cert_file, or the envelope's) is issued and
signed by the CA and within its dates, unless verify_certificate is off;
the signature; validFrom <= now <= validTo; then the payload's nbf and exp.
allowed_skew_seconds is a tolerance on all four: a ticket is taken that
far before its start and after its end.

X.509 and RSA are the `cryptography` package's. The chain is one level,
as the old proxy checked it: the signer's issuer is the CA's subject, the
CA's key verifies the signer's signature, and both are within their
dates. Debian 12's and EL9's cryptography (38, 36) have no X.509 chain
verifier (it came in 42), and one level is all the engine's PKI has.
This module imports `cryptography` when it is loaded: the daemon loads it
only with [proxy] signed_tickets on, and says so when it is missing.

State: a Verifier is process state, made once from the configuration and
never changed; verify() is thread safe.
"""

import base64
import binascii
import datetime
import json
import logging
import unicodedata
import urllib.parse

from cryptography import exceptions as crypto_errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa

from . import clock as _clock
from . import errors

log = logging.getLogger("signed")

# The fields whose signature makes a ticket mean anything: the payload and
# its envelope's life time.
REQUIRED_SIGNED = ("data", "validFrom", "validTo")

DIGESTS = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}

# The envelope's dates, as the engine's Java SimpleDateFormat writes them.
DATE_FORMAT = "%Y%m%d%H%M%S"

# Bytes of a token: the engine's are about 3 KiB (the certificate is most
# of it). Larger is not a ticket.
MAX_TOKEN = 64 * 1024


class InvalidTicket(errors.Error):
    """A signed ticket that does not verify; str() says what failed."""

    msg = "Invalid signed ticket: {self.reason}"


class Verified:
    """
    What a verified ticket grants: the daemon ticket ticket_id at
    daemon_url (imaged-uri) until expires (epoch seconds, the earlier of
    validTo and exp, plus the tolerance). transfer_id names it in logs.
    """

    def __init__(self, ticket_id, daemon_url, transfer_id, expires):
        self.ticket_id = ticket_id
        self.daemon_url = daemon_url
        self.transfer_id = transfer_id
        self.expires = expires

    @property
    def url(self):
        """The daemon's /images URL of the ticket, where the proxy
        relays."""
        return (f"{self.daemon_url.rstrip('/')}/images/"
                f"{urllib.parse.quote(self.ticket_id, safe='')}")

    def __repr__(self):
        # Never the ticket id: a credential.
        return f"<Verified transfer={self.transfer_id} expires={self.expires}>"


class Verifier:
    """
    Verifies signed tickets against a signer certificate and a CA.

    cert: the engine's certificate (x509.Certificate), or None to use the
        certificate in each ticket, which the CA must then certify.
    ca: the engine's CA certificate, or None (only with
        verify_certificate=False and a cert).
    skew: seconds of tolerance on the tickets' start and end.
    clock: wall clock, epoch seconds (clock.wall; tests pass a fake).
    """

    def __init__(self, cert=None, ca=None, verify_certificate=True, skew=0,
                 clock=_clock.wall):
        if cert is None and ca is None:
            raise ValueError("A signer certificate or a CA is required")
        if cert is None and not verify_certificate:
            raise ValueError("Without a signer certificate the CA must "
                             "verify the ticket's certificate")
        if verify_certificate and ca is None:
            raise ValueError("verify_certificate needs a CA")
        self.cert = cert
        self.ca = ca
        self.verify_certificate = verify_certificate
        self.skew = skew
        self.clock = clock

    @classmethod
    def from_config(cls, proxy, clock=_clock.wall):
        """
        The Verifier of a [proxy] section. Raise errors.Error naming the
        key and file if the files cannot be loaded or do not fit together
        (the daemon refuses to start).
        """
        if not proxy.engine_cert_file and not proxy.engine_ca_cert_file:
            raise errors.Error(
                "[proxy] signed_tickets = true needs the engine's "
                "certificate: set engine_cert_file (the signer) and "
                "engine_ca_cert_file (its CA)")
        cert = ca = None
        if proxy.engine_cert_file:
            cert = _load_file("engine_cert_file", proxy.engine_cert_file)
        if proxy.verify_certificate:
            if not proxy.engine_ca_cert_file:
                raise errors.Error(
                    "[proxy] verify_certificate = true needs "
                    "engine_ca_cert_file; set verify_certificate = false "
                    "to trust engine_cert_file alone")
            ca = _load_file("engine_ca_cert_file", proxy.engine_ca_cert_file)
            if cert is not None:
                try:
                    check_issued(cert, ca)
                except InvalidTicket as e:
                    raise errors.Error(
                        f"[proxy] engine_cert_file "
                        f"{proxy.engine_cert_file!r} is not certified by "
                        f"engine_ca_cert_file "
                        f"{proxy.engine_ca_cert_file!r}: {e.reason}")
        elif cert is None:
            raise errors.Error(
                "[proxy] verify_certificate = false needs engine_cert_file: "
                "a ticket's own certificate is trusted only when the CA "
                "certifies it")
        return cls(cert=cert, ca=ca,
                   verify_certificate=proxy.verify_certificate,
                   skew=proxy.allowed_skew_seconds, clock=clock)

    def verify(self, token):
        """
        Return the Verified grant of token (str or bytes), or raise
        InvalidTicket.
        """
        envelope = decode(token)
        fields = signed_fields(envelope)
        cert = self._signer(envelope)
        now = self.clock.now()
        if self.verify_certificate:
            check_issued(cert, self.ca)
            check_dates(cert, now, "certificate")
            check_dates(self.ca, now, "CA certificate")
        check_signature(cert, envelope, fields)
        expires = self._check_life(envelope, now)
        payload = parse_payload(envelope["data"])
        start = payload["nbf"]
        if now < start - self.skew:
            raise InvalidTicket(
                f"not valid before {_iso(start)} (nbf), now {_iso(now)}")
        end = payload["exp"]
        if now > end + self.skew:
            raise InvalidTicket(f"expired at {_iso(end)} (exp), now "
                                f"{_iso(now)}")
        return Verified(
            ticket_id=payload["transfer-ticket"],
            daemon_url=payload["imaged-uri"],
            transfer_id=payload["transfer-id"],
            expires=min(expires, end + self.skew))

    def _signer(self, envelope):
        if self.cert is not None:
            return self.cert
        pem = envelope.get("certificate")
        if not isinstance(pem, str) or not pem:
            raise InvalidTicket("no certificate in the ticket, and no "
                                "engine_cert_file configured")
        try:
            return x509.load_pem_x509_certificate(pem.encode("utf-8"))
        except (ValueError, UnicodeError) as e:
            raise InvalidTicket(f"cannot read the ticket's certificate: {e}")

    def _check_life(self, envelope, now):
        """Check validFrom <= now <= validTo within the tolerance; return
        the end."""
        start = _date(envelope, "validFrom")
        end = _date(envelope, "validTo")
        if now < start - self.skew:
            raise InvalidTicket(f"not valid before {_iso(start)} "
                                f"(validFrom), now {_iso(now)}")
        if now > end + self.skew:
            raise InvalidTicket(f"expired at {_iso(end)} (validTo), now "
                                f"{_iso(now)}")
        return end + self.skew


# The steps, pure functions over values.

def decode(token):
    """Return the envelope (a dict) of a token, or raise InvalidTicket."""
    if isinstance(token, str):
        try:
            token = token.encode("ascii")
        except UnicodeError:
            raise InvalidTicket("not base64")
    if len(token) > MAX_TOKEN:
        raise InvalidTicket(f"longer than {MAX_TOKEN} bytes")
    try:
        data = base64.b64decode(b"".join(token.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTicket("not base64")
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidTicket("not a JSON envelope")
    if not isinstance(envelope, dict):
        raise InvalidTicket("not a JSON envelope")
    return envelope


def signed_fields(envelope):
    """The names of the signed fields, in order; each a string field of
    the envelope, data, validFrom and validTo among them."""
    value = envelope.get("signedFields")
    if not isinstance(value, str) or not value:
        raise InvalidTicket("no signedFields")
    fields = value.split(",")
    for name in fields:
        if name in ("signature", "signedFields") or not isinstance(
                envelope.get(name), str):
            raise InvalidTicket(f"signed field {name!r} is not a string "
                                f"field of the envelope")
    missing = [name for name in REQUIRED_SIGNED if name not in fields]
    if missing:
        raise InvalidTicket(f"signedFields must include data, validFrom "
                            f"and validTo, missing {', '.join(missing)}")
    return fields


def check_signature(cert, envelope, fields):
    """Verify the envelope's signature over fields with cert's key."""
    digest = envelope.get("digest")
    if not isinstance(digest, str) or digest.lower() not in DIGESTS:
        raise InvalidTicket(f"unsupported digest {digest!r}, expecting "
                            f"sha1 or sha256")
    digest = digest.lower()
    signature = envelope.get("signature")
    if not isinstance(signature, str):
        raise InvalidTicket("no signature")
    try:
        signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTicket("signature is not base64")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidTicket("the signer's key is not RSA")
    message = b"".join(envelope[name].encode("utf-8") for name in fields)
    try:
        key.verify(signature, message, padding.PKCS1v15(), DIGESTS[digest]())
    except crypto_errors.InvalidSignature:
        hint = ""
        if digest == "sha1":
            # RHEL 9's DEFAULT crypto policy refuses SHA-1 signatures and
            # OpenSSL reports that as a bad signature.
            hint = " (sha1: a host crypto policy refusing SHA-1 fails it too)"
        raise InvalidTicket(f"signature does not verify with the engine's "
                            f"certificate{hint}")
    except crypto_errors.UnsupportedAlgorithm as e:
        raise InvalidTicket(f"digest {digest} refused by this host: {e}")


def check_issued(cert, ca):
    """The one-level chain: cert's issuer is ca's subject and ca's key
    verifies cert's signature."""
    if cert.issuer != ca.subject:
        raise InvalidTicket("certificate is not issued by the engine CA "
                            "(issuer is not the CA's subject)")
    key = ca.public_key()
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(algorithm))
        else:
            raise InvalidTicket("the CA's key is neither RSA nor EC")
    except crypto_errors.InvalidSignature:
        raise InvalidTicket("certificate is not signed by the engine CA")


def check_dates(cert, now, what):
    """cert is within its validity dates at now (epoch seconds)."""
    start, end = _validity(cert)
    if now < start:
        raise InvalidTicket(f"{what} not valid before {_iso(start)}")
    if now > end:
        raise InvalidTicket(f"{what} expired at {_iso(end)}")


def parse_payload(data):
    """The payload dict of the envelope's data: nbf and exp numbers,
    imaged-uri an http(s) URL, transfer-ticket a string; transfer-id
    filled (None when missing)."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidTicket("data is not JSON")
    if not isinstance(payload, dict):
        raise InvalidTicket("data is not a JSON object")
    for key in ("nbf", "exp"):
        value = payload.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidTicket(f"data has no number {key!r}")
    ticket_id = payload.get("transfer-ticket")
    if not isinstance(ticket_id, str) or not ticket_id or _unprintable(
            ticket_id):
        raise InvalidTicket("data has no valid 'transfer-ticket'")
    uri = payload.get("imaged-uri")
    if not isinstance(uri, str) or _unprintable(uri):
        raise InvalidTicket("data has no valid 'imaged-uri'")
    try:
        u = urllib.parse.urlsplit(uri)
        u.port
    except ValueError as e:
        raise InvalidTicket(f"invalid 'imaged-uri': {e}")
    if u.scheme not in ("http", "https") or not u.hostname or u.query \
            or u.fragment:
        raise InvalidTicket("'imaged-uri' must be an http or https URL "
                            "of the daemon, without query")
    transfer_id = payload.get("transfer-id")
    if not isinstance(transfer_id, str) or _unprintable(transfer_id):
        transfer_id = None
    return dict(payload, **{"transfer-id": transfer_id})


def _unprintable(text):
    # Control characters would inject log lines and headers.
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def _date(envelope, key):
    value = envelope[key]
    try:
        when = datetime.datetime.strptime(value, DATE_FORMAT)
    except ValueError:
        raise InvalidTicket(f"{key} is not a yyyyMMddHHmmss date")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def _validity(cert):
    """(not before, not after) in epoch seconds; cryptography >= 42 has
    aware datetimes and deprecates the naive ones."""
    start = getattr(cert, "not_valid_before_utc", None)
    end = getattr(cert, "not_valid_after_utc", None)
    if start is None:
        utc = datetime.timezone.utc
        start = cert.not_valid_before.replace(tzinfo=utc)
        end = cert.not_valid_after.replace(tzinfo=utc)
    return start.timestamp(), end.timestamp()


def _iso(seconds):
    return datetime.datetime.fromtimestamp(
        seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_file(key, path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise errors.Error(f"[proxy] {key} {path!r}: [Errno {e.errno}] "
                           f"{e.strerror}")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise errors.Error(f"[proxy] {key} {path!r}: not a PEM "
                           f"certificate: {e}")
