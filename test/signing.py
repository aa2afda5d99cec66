"""
The engine's side of signed tickets, for tests: a throw-away engine PKI
made with openssl, and tickets signed as ovirt-engine's TicketEncoder
signs them (../shared/CLIENTS.md section 2).

EnginePKI(directory) makes:
    ca_file, ca_key_file        the engine CA
    cert_file, key_file         the engine's certificate, issued by the CA
    short_cert_file             another engine certificate, valid 1 day
    other_ca_file, other_cert_file, other_key_file
                                a certificate from another CA
    impostor_file, impostor_key_file
                                a self-signed certificate whose subject
                                (and so issuer) is the engine CA's name

sign(key_file, cert_file, payload, ...) returns the token: base64 of the
JSON envelope, the signature RSA PKCS#1 v1.5 with the digest over the
signed fields' UTF-8 values in order, the signer's PEM embedded.
"""

import base64
import datetime
import json
import os
import subprocess
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding

# The order the engine's encoder happened to sign in (a Java HashMap's);
# not alphabetical, so a verifier that sorts the fields fails.
FIELDS = ("salt", "digest", "validFrom", "validTo", "data")

DIGESTS = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   capture_output=True, timeout=60)


class EnginePKI:

    def __init__(self, directory):
        d = str(directory)
        self.directory = d

        def path(name):
            return os.path.join(d, name)

        self.ca_file, self.ca_key_file = path("ca.pem"), path("ca-key.pem")
        self._self_signed("ca", "/CN=test engine CA")
        self.cert_file, self.key_file = path("engine.pem"), path(
            "engine-key.pem")
        self._issued("engine", "/CN=engine.test", "ca", days=365)
        self.short_cert_file = path("short.pem")
        self._issued("short", "/CN=engine.test", "ca", days=1,
                     key="engine-key.pem")
        self.other_ca_file = path("other-ca.pem")
        self._self_signed("other-ca", "/CN=another CA")
        self.other_cert_file, self.other_key_file = path("other.pem"), path(
            "other-key.pem")
        self._issued("other", "/CN=engine.test", "other-ca", days=365)
        # The engine CA's name, someone else's key.
        self.impostor_file, self.impostor_key_file = path(
            "impostor.pem"), path("impostor-key.pem")
        self._self_signed("impostor", "/CN=test engine CA")

    def _self_signed(self, name, subject):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                 "3650", "-subj", subject, "-keyout", f"{name}-key.pem",
                 "-out", f"{name}.pem", cwd=self.directory)

    def _issued(self, name, subject, ca, days, key=None):
        key_args = (["-key", key] if key else
                    ["-newkey", "rsa:2048", "-keyout", f"{name}-key.pem"])
        _openssl("req", "-new", "-nodes", *key_args, "-subj", subject,
                 "-out", f"{name}.csr", cwd=self.directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
                 "-CAkey", f"{ca}-key.pem", "-CAcreateserial", "-days",
                 str(days), "-out", f"{name}.pem", cwd=self.directory)

    def proxy_conf(self, **overrides):
        """The [proxy] section of a proxy trusting this PKI."""
        conf = {"signed_tickets": "true", "engine_cert_file": self.cert_file,
                "engine_ca_cert_file": self.ca_file}
        conf.update(overrides)
        return conf


def payload(ticket_id, daemon_url, nbf, exp, transfer_id="tr-signed"):
    """The engine's payload, as a string (the envelope's data)."""
    p = {"nbf": int(nbf), "iat": int(nbf), "exp": int(exp),
         "imaged-uri": daemon_url, "transfer-ticket": ticket_id}
    if transfer_id is not None:
        p["transfer-id"] = transfer_id
    return json.dumps(p)


def date(seconds):
    return datetime.datetime.fromtimestamp(
        seconds, datetime.timezone.utc).strftime("%Y%m%d%H%M%S")


def envelope(key_file, cert_file, data, valid_from, valid_to,
             digest="sha1", fields=FIELDS):
    """The signed envelope (a dict) of data."""
    env = {
        "salt": base64.b64encode(os.urandom(8)).decode(),
        "digest": digest,
        "validFrom": date(valid_from),
        "validTo": date(valid_to),
        "data": data,
    }
    with open(key_file, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    message = b"".join(env[name].encode("utf-8") for name in fields)
    signature = key.sign(message, padding.PKCS1v15(), DIGESTS[digest]())
    env["signedFields"] = ",".join(fields)
    env["signature"] = base64.b64encode(signature).decode()
    with open(cert_file) as f:
        env["certificate"] = f.read()
    return env


def encode(env):
    """The token of an envelope."""
    return base64.b64encode(json.dumps(env).encode("utf-8")).decode()


def sign(pki, ticket_id, daemon_url, start=None, lifetime=300,
         key_file=None, cert_file=None, digest="sha1", fields=FIELDS,
         transfer_id="tr-signed", nbf=None, exp=None):
    """
    A token for ticket_id at daemon_url, valid from start (default now)
    for lifetime seconds (envelope and payload alike, as the engine does),
    signed with the engine's key unless told.
    """
    start = time.time() if start is None else start
    end = start + lifetime
    data = payload(ticket_id, daemon_url,
                   start if nbf is None else nbf,
                   end if exp is None else exp, transfer_id=transfer_id)
    env = envelope(key_file or pki.key_file, cert_file or pki.cert_file,
                   data, start, end, digest=digest, fields=fields)
    return encode(env)
