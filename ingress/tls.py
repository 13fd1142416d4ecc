"""TLS termination: one SSLContext per certificate, chosen by SNI from the current route table.

The route table (pure) maps host patterns to certificates from `kubernetes.io/tls` Secrets; this shell
turns each distinct certificate into an SSLContext once, and the listener's SNI callback switches the
handshake to it (exact name, then a one-label wildcard, else the default certificate).
"""
from __future__ import annotations

import logging
import os
import ssl
import tempfile
from pathlib import Path

from netplane import netns
from netplane.ingress.routes import RouteTable, TlsCertificate

log = logging.getLogger("ingress")


def context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """An server SSLContext from PEM bytes (ssl can only load files: write them to a private
    directory for the moment of loading)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory(prefix="netplane-ingress-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def self_signed(common_name: str = "netplane-ingress-default") -> tuple[bytes, bytes]:
    """A throwaway self-signed certificate for names no Secret covers (openssl CLI)."""
    with tempfile.TemporaryDirectory(prefix="netplane-ingress-") as tmp:
        cert, key = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        netns.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                   "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(cert)])
        return cert.read_bytes(), key.read_bytes()


class CertificateStore:
    """SSLContexts for the certificates of the current table; the listener's context is `default`."""

    def __init__(self, default_cert: tuple[bytes, bytes]):
        self.default = context_from_pem(*default_cert)
        self.default.sni_callback = self._sni
        self.table: RouteTable | None = None
        # Keyed by the certificate value itself (bytes hash once and cache it), so an unchanged
        # Secret keeps its context across table swaps.
        self._contexts: dict[TlsCertificate, ssl.SSLContext] = {}

    def update(self, table: RouteTable) -> list[str]:
        """Make contexts for the table's certificates (reusing unchanged ones); returns problems."""
        problems, fresh = [], {}
        for cert in set(table.certificates.values()):
            ctx = self._contexts.get(cert)
            if ctx is None:
                try:
                    ctx = context_from_pem(cert.cert_pem, cert.key_pem)
                except (ssl.SSLError, OSError) as err:
                    problems.append(f"secret {cert.secret}: certificate or key does not load: {err}")
                    continue
            fresh[cert] = ctx
        self._contexts = fresh
        self.table = table
        return problems

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext):
        if server_name and self.table is not None:
            cert = self.table.certificate_for(server_name)
            ctx = self._contexts.get(cert) if cert is not None else None
            if ctx is not None:
                sslobj.context = ctx
        return None
