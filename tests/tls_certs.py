"""Certificates made by the tests for DICOM TLS: a CA, the node's certificate (localhost,
127.0.0.1), a client certificate from the same CA, and a client certificate from a CA the
node does not trust. PEM files; RSA 2048 (accepted by dcmtk's default BCP 195 profile)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA's certificate, trusted by the node and the clients
    server: Pair
    client: Pair  # signed by ca
    stranger: Pair  # signed by a CA nobody trusts

    def client_context(self, pair: Pair | None = None) -> ssl.SSLContext:
        """What a sender uses: trusts the CA, checks the node's name, presents `pair` if given."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if pair is not None:
            context.load_cert_chain(str(pair.cert), str(pair.key))
        return context


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicom-fhir-scp tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False
                 ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key=None) -> Pair:
    cert_path = folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    if key is not None:
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return Pair(cert_path, key_path)


def make_certificates(folder: Path) -> Certificates:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_ca_key = _key(), _key()
    ca = _certificate("Test CA", ca_key, "Test CA", ca_key, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    ca_path = _write(folder, "ca", ca).cert
    return Certificates(
        ca=ca_path,
        server=_write(folder, "server", _certificate("localhost", server_key, "Test CA", ca_key, server=True),
                      server_key),
        client=_write(folder, "client", _certificate("MODALITY", client_key, "Test CA", ca_key), client_key),
        stranger=_write(folder, "stranger", _certificate("MODALITY", stranger_key, "Other CA", other_ca_key),
                        stranger_key),
    )
