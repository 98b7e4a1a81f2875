"""
Self-signed certificates for the test servers: one builder for every server that speaks TLS
on 127.0.0.1 (Dovecot, Prosody, a stub homeserver, the loopback upstream).

The certificate is its own CA (so a client can be pointed at it as a CA file) and names
127.0.0.1 and any DNS names given; no system trusts it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SelfSigned:
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write C{cert.pem} and C{key.pem} (mode 0600) into C{directory}; returns both paths."""
        cert_path, key_path = directory / "cert.pem", directory / "key.pem"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def self_signed(common_name: str = "127.0.0.1", dns_names: tuple[str, ...] = (),
                days: int = 30, traditional_key: bool = False) -> SelfSigned:
    """
    A fresh EC certificate for C{common_name}, C{dns_names} and 127.0.0.1.
    C{traditional_key} writes the key in OpenSSL's traditional format (Prosody's LuaSec
    wants it) instead of PKCS#8.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.DNSName(n) for n in dns_names]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_format = (serialization.PrivateFormat.TraditionalOpenSSL if traditional_key
                  else serialization.PrivateFormat.PKCS8)
    return SelfSigned(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, key_format,
                          serialization.NoEncryption()))
