"""The federation's certificate authority: CA, coordinator certificate, startup kits, revocation.

Every party of a federation authenticates with an X.509 certificate issued by the
federation's own CA (ECDSA P-256, SHA-256 signatures), over mutual TLS.

Identity inside a certificate
-----------------------------
An identity certificate names who holds it twice:

* the machine-readable form, which is authoritative: one Subject Alternative Name of
  type URI, ``confide://<federation>/<role>/<identity>``, e.g.
  ``confide://cardio-2025/site/hospital-a``;
* the human-readable subject ``CN=<identity>, OU=<role>, O=<federation>``, which is what
  ``openssl x509 -subject`` shows and what :func:`load_identity` falls back to for a
  certificate without the URI.

Federation and identity names follow one rule, :data:`NAME_RULE`
(``^[a-z0-9][a-z0-9-]{0,62}$``: a DNS label), so the URI needs no escaping and the
names are safe as file and folder names. Roles are ``site``, ``auditor`` and ``admin``;
the coordinator's certificate carries ``confide://<federation>/coordinator/coordinator``.

Layout of a PKI folder (``confide pki init --dir DIR``)::

    DIR/ca.crt               the federation CA certificate (public; goes into every kit)
    DIR/ca.key               the CA private key, 0600: keep DIR offline, back it up
    DIR/registry.json        every certificate issued: serial, identity, role, dates, status
    DIR/crl.pem              the signed X.509 CRL (empty until the first revocation)
    DIR/coordinator/         everything the coordinator needs, self-contained:
        coordinator.crt      serverAuth certificate; SANs localhost, 127.0.0.1, ::1, the hosts
        coordinator.key      0600
        ca.crt, crl.pem      to verify clients and to refuse revoked ones
        coordinator.json     federation, address, host names
    DIR/kits/<identity>/     the startup kits written by ``issue`` (see :func:`issue`)
    DIR/.lock                serialises concurrent `confide pki` runs (flock)

Serial numbers are random 159-bit integers; files and the CLI show them as lowercase hex
(JSON numbers lose precision beyond 2**53 in most languages other than Python).

Revocation is enforced by the coordinator, not by TLS: gRPC has no CRL hook, so the
coordinator checks each peer's serial against a :class:`RevocationList` at join and on
every call (:func:`authenticate_peer`), and the list reloads itself when the file changes.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.errors import ConfigError
from confide.privacy.crypto._files import (
    exposed_key_problem,
    locked,
    make_private_dir,
    write_atomic,
    write_json,
)
from confide.privacy.crypto.errors import (
    AlreadyRevokedError,
    CAExistsError,
    CANotFoundError,
    CertificateInvalidError,
    CertificateNotFoundError,
    CertificateRevokedError,
    IdentityExistsError,
    InvalidNameError,
    KeyPermissionsError,
    KitError,
    NotAConfideIdentityError,
    PeerNotAllowedError,
    PKIError,
    RevocationListError,
)

if TYPE_CHECKING:
    import grpc
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPublicKeyTypes,
        PrivateKeyTypes,
    )

Role = Literal["site", "auditor", "admin", "coordinator"]
Status = Literal["valid", "revoked"]

NAME_RULE = "^[a-z0-9][a-z0-9-]{0,62}$"
ROLES: tuple[str, ...] = ("site", "auditor", "admin")
COORDINATOR: Literal["coordinator"] = "coordinator"
URI_SCHEME = "confide"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_VALID_DAYS = 825
DEFAULT_CA_VALID_DAYS = 3650
# Sites run on hospital machines whose clocks drift; a certificate valid from "now" would
# be refused for a few minutes by a peer whose clock is behind.
CLOCK_SKEW = timedelta(minutes=5)
ALWAYS_IN_COORDINATOR_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
REGISTRY = "registry.json"
CRL = "crl.pem"
COORDINATOR_DIR = "coordinator"
COORDINATOR_CERT = "coordinator.crt"
COORDINATOR_KEY = "coordinator.key"
COORDINATOR_JSON = "coordinator.json"
KITS_DIR = "kits"
KIT_JSON = "kit.json"
KIT_README = "README.md"
REGISTRY_FORMAT = 1
KIT_FORMAT = 1

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_URI_RE = re.compile(rf"{URI_SCHEME}://([^/]*)/([^/]*)/([^/]*)")
_ADDRESS_RE = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d+)|(?P<host>[^:\[\]\s]+):(?P<port>\d+)")
_REASONS: dict[str, x509.ReasonFlags] = {
    f.name: f for f in x509.ReasonFlags if f is not x509.ReasonFlags.remove_from_crl
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Identity:
    """Who a certificate belongs to, as read from the certificate itself."""

    federation: str
    role: Role
    identity: str
    serial: int
    fingerprint: str  # SHA-256 of the DER certificate, lowercase hex
    not_after: datetime

    @property
    def uri(self) -> str:
        return identity_uri(self.federation, self.role, self.identity)


@dataclass(frozen=True)
class CertRecord:
    """One issued certificate as the registry remembers it."""

    serial: int
    identity: str
    role: Role
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    fingerprint: str
    status: Status = "valid"
    revoked_at: datetime | None = None
    reason: str | None = None

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    def status_at(self, when: datetime | None = None) -> str:
        """``valid``, ``revoked`` or ``expired`` (a valid record past its ``not_after``)."""
        if self.status == "valid" and (when or _now()) > self.not_after:
            return "expired"
        return self.status

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial_hex,
            "identity": self.identity,
            "role": self.role,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "issued_at": _iso(self.issued_at),
            "fingerprint_sha256": self.fingerprint,
            "status": self.status,
            "revoked_at": _iso(self.revoked_at) if self.revoked_at else None,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CertRecord:
        status = d.get("status", "valid")
        if status not in ("valid", "revoked"):
            raise ValueError(f"status {status!r} is neither 'valid' nor 'revoked'")
        role = d["role"]
        if role not in (*ROLES, COORDINATOR):
            raise ValueError(f"role {role!r} is unknown")
        return cls(
            serial=parse_serial(str(d["serial"])),
            identity=str(d["identity"]),
            role=cast(Role, role),
            not_before=_parse_time(d["not_before"]),
            not_after=_parse_time(d["not_after"]),
            issued_at=_parse_time(d["issued_at"]),
            fingerprint=str(d["fingerprint_sha256"]),
            status=cast(Status, status),
            revoked_at=_parse_time(d["revoked_at"]) if d.get("revoked_at") else None,
            reason=d.get("reason"),
        )


@dataclass(frozen=True)
class CAInfo:
    """What :func:`init_ca` made, and where."""

    pki_dir: Path
    federation: str
    ca_certificate: Path
    ca_fingerprint: str
    ca_not_after: datetime
    coordinator_dir: Path
    coordinator_address: str
    coordinator_sans: tuple[str, ...]  # host names and IPs the coordinator certificate names


@dataclass(frozen=True)
class Kit:
    """A site's (or auditor's, or admin's) startup kit, checked by :func:`load_kit`."""

    path: Path
    certificate: Path
    private_key: Path
    ca_certificate: Path
    federation: str
    identity: str
    role: Role
    coordinator_address: str
    serial: int
    fingerprint: str
    not_after: datetime
    created: datetime

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC credentials for a mutual-TLS channel to the coordinator."""
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_certificate.read_bytes(),
            private_key=self.private_key.read_bytes(),
            certificate_chain=self.certificate.read_bytes(),
        )


@dataclass(frozen=True)
class CoordinatorFiles:
    """The coordinator's folder (``<pki>/coordinator``), checked by :func:`load_coordinator`."""

    path: Path
    certificate: Path
    private_key: Path
    ca_certificate: Path
    crl: Path
    federation: str
    address: str
    hosts: tuple[str, ...]

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials that *require* a client certificate from the federation CA."""
        import grpc

        return grpc.ssl_server_credentials(
            [(self.private_key.read_bytes(), self.certificate.read_bytes())],
            root_certificates=self.ca_certificate.read_bytes(),
            require_client_auth=True,
        )

    def revocation_list(self) -> RevocationList:
        return RevocationList.load(self.crl, self.ca_certificate)


@dataclass
class _Registry:
    federation: str
    coordinator_address: str
    coordinator_sans: list[str]
    ca_fingerprint: str
    crl_number: int
    certificates: list[CertRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "federation": self.federation,
            "coordinator_address": self.coordinator_address,
            "coordinator_sans": self.coordinator_sans,
            "ca_fingerprint_sha256": self.ca_fingerprint,
            "crl_number": self.crl_number,
            "certificates": [c.to_json() for c in self.certificates],
        }


# --------------------------------------------------------------------------- validation


def validate_name(value: str, what: str = "identity") -> str:
    """Return ``value`` if it follows :data:`NAME_RULE`, else raise :class:`InvalidNameError`."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidNameError(
            f"{what} name {value!r} breaks the rule {NAME_RULE}: lowercase letters, digits "
            "and '-', starting with a letter or digit, at most 63 characters. "
            "Fix: use a name like 'hospital-a'"
        )
    return value


def validate_role(role: str) -> Role:
    """Return ``role`` if it is one an identity certificate may carry."""
    if role not in ROLES:
        raise InvalidNameError(
            f"role {role!r} is not one of {', '.join(ROLES)}. Fix: use one of {', '.join(ROLES)}"
        )
    return cast(Role, role)


def identity_uri(federation: str, role: str, identity: str) -> str:
    """The SAN URI that names an identity: ``confide://<federation>/<role>/<identity>``."""
    return f"{URI_SCHEME}://{federation}/{role}/{identity}"


def format_serial(serial: int) -> str:
    """A serial number as shown in files and by the CLI: lowercase hex, no prefix."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """Parse a serial as shown by :func:`format_serial` (``0x`` and ``:`` separators allowed)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise InvalidNameError(
            f"serial {text!r} is not a hexadecimal number. "
            "Fix: copy the serial as `confide pki list` shows it"
        ) from None
    if value <= 0:
        raise InvalidNameError(f"serial {text!r} must be positive. Fix: copy it from the list")
    return value


def split_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[IPv6]:PORT``) into its host and port, validating both."""
    m = _ADDRESS_RE.fullmatch(address.strip()) if isinstance(address, str) else None
    fix = "write it as HOST:PORT, e.g. coordinator.example.org:50051, 10.0.0.5:50051 or [::1]:50051"
    if m is None:
        raise ConfigError("coordinator address", f"{address!r} is not HOST:PORT", fix)
    host = m.group("v6") or m.group("host")
    port = int(m.group("p6") or m.group("port"))
    if not 1 <= port <= 65535:
        raise ConfigError("coordinator address", f"port {port} is outside 1-65535", fix)
    if m.group("v6") is not None and not isinstance(_ip(host), ipaddress.IPv6Address):
        raise ConfigError("coordinator address", f"[{host}] is not an IPv6 address", fix)
    return _host_san_value(host), port


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host_san_value(host: str) -> str:
    """Canonical text of a host for the SAN list: a compressed IP or a lowercase DNS name."""
    ip = _ip(host)
    if ip is not None:
        return str(ip)
    name = host.strip().lower().rstrip(".")
    if len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"host {host!r} is neither an IP address nor a DNS name (labels of a-z, 0-9 and "
            "'-', not starting or ending with '-', separated by dots). "
            "Fix: pass the name the sites will dial, e.g. coordinator.example.org"
        )
    return name


def _general_name(host: str) -> x509.GeneralName:
    ip = _ip(host)
    return x509.IPAddress(ip) if ip is not None else x509.DNSName(host)


def _check_days(valid_days: int, what: str) -> None:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise ConfigError(
            what, f"{valid_days!r} is not a whole number of days >= 1", "use e.g. 825"
        )


def _reason(reason: str) -> x509.ReasonFlags:
    key = reason.strip().lower().replace("-", "_")
    by_value = {f.value.lower(): f for f in _REASONS.values()}
    flag = _REASONS.get(key) or by_value.get(key.replace("_", ""))
    if flag is None:
        raise InvalidNameError(
            f"revocation reason {reason!r} is unknown. Fix: use one of {', '.join(_REASONS)}"
        )
    return flag


# --------------------------------------------------------------------------- x509 helpers


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS8: the site agent and the coordinator start unattended (systemd, a
    # container) and have nowhere safer than the disk to keep a passphrase; the file's 0600
    # mode and the folder's 0700 are the protection.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _parse_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise CertificateInvalidError(
            f"{what} is not a readable X.509 certificate ({e}). "
            "Fix: pass the PEM file written by `confide pki`"
        ) from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KitError(f"{path}: {what} is missing. Fix: {_KIT_FIX}") from None
    except OSError as e:
        raise KitError(f"{path}: cannot read {what} ({e.strerror}). Fix: {_KIT_FIX}") from None


_KIT_FIX = (
    "copy the whole folder written by `confide pki issue` (or `pki init` for the coordinator), "
    "or issue a new one with `confide pki issue --force`"
)


def _issuer_public_key(ca: x509.Certificate) -> CertificateIssuerPublicKeyTypes:
    return cast("CertificateIssuerPublicKeyTypes", ca.public_key())


def _name(federation: str, role: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _build_ca(
    key: ec.EllipticCurvePrivateKey, federation: str, now: datetime, days: int
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, "Confide federation CA"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public: ec.EllipticCurvePublicKey,
    *,
    federation: str,
    role: str,
    identity: str,
    hosts: Sequence[str],
    server: bool,
    now: datetime,
    days: int,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [_general_name(h) for h in hosts]
    sans.append(x509.UniformResourceIdentifier(identity_uri(federation, role, identity)))
    # A leaf never outlives the CA that vouches for it.
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    return (
        x509.CertificateBuilder()
        .subject_name(_name(federation, role, identity))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    records: Iterable[CertRecord],
    number: int,
    now: datetime,
) -> bytes:
    # nextUpdate is set to the CA's expiry: the CRL is a file the coordinator reads from its
    # own disk, so freshness comes from the file changing, not from a publication schedule.
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(max(ca_cert.not_valid_after_utc, now + timedelta(days=1)))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for r in records:
        if r.status != "revoked":
            continue
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(r.revoked_at or now)
        )
        if r.reason and r.reason != "unspecified":  # RFC 5280: omit the unspecified reason
            entry = entry.add_extension(x509.CRLReason(_reason(r.reason)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def _record(cert: x509.Certificate, identity: str, role: Role, now: datetime) -> CertRecord:
    return CertRecord(
        serial=cert.serial_number,
        identity=identity,
        role=role,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        issued_at=now,
        fingerprint=_fingerprint(cert),
    )


# --------------------------------------------------------------------------- PKI folder


def _ca_fix(pki_dir: Path) -> str:
    return (
        f"run `confide pki init --dir {pki_dir} --federation NAME` first, "
        "or pass the folder where you ran it"
    )


def _require_pki_dir(pki_dir: Path) -> None:
    if not pki_dir.is_dir():
        raise CANotFoundError(f"{pki_dir}: no such PKI folder. Fix: {_ca_fix(pki_dir)}")


def _same_public_key(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    mine: bytes = key.public_key().public_bytes(pem, spki)
    return mine == cert.public_key().public_bytes(pem, spki)


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = pki_dir / CA_CERT, pki_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise CANotFoundError(
                f"no certificate authority in {pki_dir} (missing {p.name}). Fix: {_ca_fix(pki_dir)}"
            )
    cert = _parse_cert(cert_path.read_bytes(), str(cert_path))
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(
            f"{key_path}: not an unencrypted PEM private key ({e}). "
            "Fix: restore ca.key from your backup"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path}: not an ECDSA key. Fix: restore ca.key from your backup")
    if not _same_public_key(key, cert):
        raise PKIError(
            f"{key_path} does not belong to {cert_path}. Fix: restore both from the same backup"
        )
    return cert, key


def _load_registry(pki_dir: Path) -> _Registry:
    path = pki_dir / REGISTRY
    if not path.is_file():
        raise CANotFoundError(f"{path} is missing. Fix: {_ca_fix(pki_dir)}")
    try:
        d = json.loads(path.read_text())
        return _Registry(
            federation=validate_name(d["federation"], "federation"),
            coordinator_address=str(d["coordinator_address"]),
            coordinator_sans=[str(h) for h in d["coordinator_sans"]],
            ca_fingerprint=str(d["ca_fingerprint_sha256"]),
            crl_number=int(d["crl_number"]),
            certificates=[CertRecord.from_json(c) for c in d["certificates"]],
        )
    except (ValueError, KeyError, TypeError) as e:
        raise PKIError(
            f"{path} is not a valid Confide registry ({type(e).__name__}: {e}). "
            "Fix: restore it from your backup of the PKI folder"
        ) from None


def _publish_crl(pki_dir: Path, crl_pem: bytes) -> None:
    # CRL first, registry after: if we crash in between, the CRL already refuses the
    # certificate and running the same revoke again rewrites both.
    write_atomic(pki_dir / CRL, crl_pem)
    coordinator = pki_dir / COORDINATOR_DIR
    if coordinator.is_dir():
        write_atomic(coordinator / CRL, crl_pem)


def init_ca(
    pki_dir: Path,
    federation: str,
    *,
    coordinator_hosts: Sequence[str] = (),
    coordinator_address: str = DEFAULT_ADDRESS,
    valid_days: int = DEFAULT_VALID_DAYS,
    ca_valid_days: int = DEFAULT_CA_VALID_DAYS,
    force: bool = False,
) -> CAInfo:
    """Create a federation CA and the coordinator's certificate in ``pki_dir``.

    The coordinator certificate names ``localhost``, ``127.0.0.1``, ``::1``, every host in
    ``coordinator_hosts`` and the host of ``coordinator_address`` (IPs as IP SANs, names as
    DNS SANs). ``valid_days`` is the coordinator certificate's lifetime, ``ca_valid_days``
    the CA's. An existing CA is never overwritten unless ``force`` is set; forcing makes a
    new CA, which invalidates every kit issued by the old one.
    """
    pki_dir = Path(pki_dir)
    validate_name(federation, "federation")
    address_host, _ = split_address(coordinator_address)
    _check_days(valid_days, "valid_days")
    _check_days(ca_valid_days, "ca_valid_days")
    sans = _coordinator_sans([*coordinator_hosts, address_host])

    make_private_dir(pki_dir)
    with locked(pki_dir):
        existing = [n for n in (CA_CERT, CA_KEY, REGISTRY) if (pki_dir / n).exists()]
        if existing and not force:
            raise CAExistsError(
                f"{pki_dir} already holds a certificate authority ({', '.join(existing)}). "
                "Fix: use another folder, or pass --force to replace it (every kit issued by "
                "the old CA stops working)"
            )
        now = _now()
        ca_key = _new_key()
        ca_cert = _build_ca(ca_key, federation, now, ca_valid_days)
        crl_pem = _build_crl(ca_cert, ca_key, [], 1, now)
        write_atomic(pki_dir / CA_KEY, _key_pem(ca_key), private=True)
        write_atomic(pki_dir / CA_CERT, _cert_pem(ca_cert))
        co_record = _write_coordinator(
            pki_dir, ca_cert, ca_key, federation, coordinator_address, sans, valid_days, now
        )
        _publish_crl(pki_dir, crl_pem)
        # The registry is written last: its presence marks a complete CA.
        registry = _Registry(
            federation=federation,
            coordinator_address=coordinator_address,
            coordinator_sans=sans,
            ca_fingerprint=_fingerprint(ca_cert),
            crl_number=1,
            certificates=[co_record],
        )
        write_json(pki_dir / REGISTRY, registry.to_json())
    return _ca_info(pki_dir, ca_cert, registry)


def _ca_info(pki_dir: Path, ca_cert: x509.Certificate, registry: _Registry) -> CAInfo:
    return CAInfo(
        pki_dir=pki_dir,
        federation=registry.federation,
        ca_certificate=pki_dir / CA_CERT,
        ca_fingerprint=registry.ca_fingerprint,
        ca_not_after=ca_cert.not_valid_after_utc,
        coordinator_dir=pki_dir / COORDINATOR_DIR,
        coordinator_address=registry.coordinator_address,
        coordinator_sans=tuple(registry.coordinator_sans),
    )


def _coordinator_sans(hosts: Iterable[str]) -> list[str]:
    sans: list[str] = []
    for h in (*ALWAYS_IN_COORDINATOR_SANS, *hosts):
        value = _host_san_value(h)
        if value not in sans:
            sans.append(value)
    return sans


def _write_coordinator(
    pki_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    federation: str,
    address: str,
    sans: Sequence[str],
    valid_days: int,
    now: datetime,
) -> CertRecord:
    key = _new_key()
    cert = _build_leaf(
        ca_cert,
        ca_key,
        key.public_key(),
        federation=federation,
        role=COORDINATOR,
        identity=COORDINATOR,
        hosts=sans,
        server=True,
        now=now,
        days=valid_days,
    )
    coordinator = pki_dir / COORDINATOR_DIR
    make_private_dir(coordinator)
    write_atomic(coordinator / COORDINATOR_KEY, _key_pem(key), private=True)
    write_atomic(coordinator / COORDINATOR_CERT, _cert_pem(cert))
    write_atomic(coordinator / CA_CERT, _cert_pem(ca_cert))
    write_json(
        coordinator / COORDINATOR_JSON,
        {
            "format": REGISTRY_FORMAT,
            "federation": federation,
            "address": address,
            "hosts": list(sans),
            "serial": format_serial(cert.serial_number),
            "fingerprint_sha256": _fingerprint(cert),
            "not_after": _iso(cert.not_valid_after_utc),
        },
    )
    return _record(cert, COORDINATOR, COORDINATOR, now)


def reissue_coordinator(
    pki_dir: Path,
    *,
    coordinator_hosts: Sequence[str] = (),
    coordinator_address: str | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
) -> CAInfo:
    """Give the coordinator a new certificate (and key) from the same CA; kits stay valid.

    For a coordinator certificate near expiry, or a coordinator reachable under a new name:
    ``coordinator_hosts`` are added to the names it had, ``coordinator_address`` (if given)
    becomes the default address of kits issued from now on. The old certificate is marked
    superseded. Restart the coordinator (or copy ``coordinator/`` to it) afterwards.
    """
    pki_dir = Path(pki_dir)
    _check_days(valid_days, "valid_days")
    _require_pki_dir(pki_dir)
    with locked(pki_dir):
        ca_cert, ca_key = _load_ca(pki_dir)
        registry = _load_registry(pki_dir)
        address = coordinator_address or registry.coordinator_address
        address_host, _ = split_address(address)
        sans = _coordinator_sans([*registry.coordinator_sans, *coordinator_hosts, address_host])
        now = _now()
        record = _write_coordinator(
            pki_dir, ca_cert, ca_key, registry.federation, address, sans, valid_days, now
        )
        registry.certificates = [
            replace(r, status="revoked", revoked_at=now, reason="superseded")
            if r.role == COORDINATOR and r.status == "valid"
            else r
            for r in registry.certificates
        ]
        registry.certificates.append(record)
        registry.coordinator_address = address
        registry.coordinator_sans = sans
        registry.crl_number += 1
        _publish_crl(
            pki_dir, _build_crl(ca_cert, ca_key, registry.certificates, registry.crl_number, now)
        )
        write_json(pki_dir / REGISTRY, registry.to_json())
    return _ca_info(pki_dir, ca_cert, registry)


def issue(
    pki_dir: Path,
    identity: str,
    role: str,
    out_dir: Path | None = None,
    *,
    coordinator_address: str | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
    force: bool = False,
) -> Path:
    """Issue a certificate for ``identity`` in ``role`` and write its startup kit; return the kit.

    The kit folder (default ``<pki_dir>/kits/<identity>/``, created 0700) holds
    ``<identity>.crt``, ``<identity>.key`` (unencrypted PKCS8 PEM, mode 0600),
    ``ca.crt``, ``kit.json`` and a ``README.md`` for the operator. The key is unencrypted
    because the site agent starts unattended; whoever can read the folder can act as this
    identity, so ship it over a secure channel and keep it readable by the service account
    only.

    An identity with a valid, unexpired certificate is refused unless ``force``; forcing
    revokes the old certificate (reason ``superseded``) as it issues the new one.
    """
    pki_dir = Path(pki_dir)
    validate_name(identity, "identity")
    if identity == COORDINATOR:
        raise InvalidNameError(
            "identity name 'coordinator' is reserved for the coordinator's certificate. "
            "Fix: pick another name"
        )
    checked_role = validate_role(role)
    _check_days(valid_days, "valid_days")
    kit_dir = Path(out_dir) if out_dir is not None else pki_dir / KITS_DIR / identity
    _require_pki_dir(pki_dir)
    with locked(pki_dir):
        ca_cert, ca_key = _load_ca(pki_dir)
        registry = _load_registry(pki_dir)
        address = coordinator_address or registry.coordinator_address
        host, _ = split_address(address)
        if host not in registry.coordinator_sans:
            raise ConfigError(
                "coordinator address",
                f"host {host!r} is not in the coordinator certificate "
                f"(it names {', '.join(registry.coordinator_sans)}), so sites would refuse it",
                "use one of those names, or add it to the coordinator certificate with "
                f"`confide pki coordinator --dir {pki_dir} --host {host}`",
            )
        now = _now()
        current = [
            r
            for r in registry.certificates
            if r.identity == identity and r.status_at(now) == "valid"
        ]
        if current and not force:
            c = current[-1]
            raise IdentityExistsError(
                f"{identity!r} already has a valid {c.role} certificate (serial "
                f"{c.serial_hex}, until {c.not_after.date()}). Fix: pass --force to issue a "
                f"new one and revoke the old, or run `confide pki revoke --identity {identity}` "
                "first"
            )
        _check_kit_dir(kit_dir, identity)
        if out_dir is None:
            make_private_dir(pki_dir / KITS_DIR)  # it gathers private keys

        key = _new_key()
        cert = _build_leaf(
            ca_cert,
            ca_key,
            key.public_key(),
            federation=registry.federation,
            role=checked_role,
            identity=identity,
            hosts=(),
            server=False,
            now=now,
            days=valid_days,
        )
        record = _record(cert, identity, checked_role, now)
        _write_kit(kit_dir, record, registry.federation, address, _cert_pem(cert), key, ca_cert)

        if current:
            superseded = {r.serial for r in current}
            registry.certificates = [
                replace(r, status="revoked", revoked_at=now, reason="superseded")
                if r.serial in superseded
                else r
                for r in registry.certificates
            ]
            registry.crl_number += 1
            _publish_crl(
                pki_dir,
                _build_crl(ca_cert, ca_key, registry.certificates, registry.crl_number, now),
            )
        registry.certificates.append(record)
        write_json(pki_dir / REGISTRY, registry.to_json())
    return kit_dir


def _check_kit_dir(kit_dir: Path, identity: str) -> None:
    if kit_dir.exists() and not kit_dir.is_dir():
        raise KitError(f"{kit_dir} is a file, not a folder. Fix: pass another --out folder")
    if not kit_dir.is_dir() or not any(kit_dir.iterdir()):
        return
    # Re-issuing into the identity's own kit folder replaces its files; anything else would
    # scatter a private key among unrelated files.
    try:
        same = json.loads((kit_dir / KIT_JSON).read_text()).get("identity") == identity
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise KitError(
            f"{kit_dir} is not empty and is not {identity!r}'s kit. "
            "Fix: pass an empty or new folder with --out"
        )


def _write_kit(
    kit_dir: Path,
    record: CertRecord,
    federation: str,
    address: str,
    cert_pem: bytes,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    make_private_dir(kit_dir)
    name = record.identity
    files = {
        "certificate": f"{name}.crt",
        "private_key": f"{name}.key",
        "ca_certificate": CA_CERT,
    }
    write_atomic(kit_dir / files["private_key"], _key_pem(key), private=True)
    write_atomic(kit_dir / files["certificate"], cert_pem)
    write_atomic(kit_dir / files["ca_certificate"], _cert_pem(ca_cert))
    meta = {
        "format": KIT_FORMAT,
        "federation": federation,
        "identity": name,
        "role": record.role,
        "uri": identity_uri(federation, record.role, name),
        "coordinator_address": address,
        "serial": record.serial_hex,
        "fingerprint_sha256": record.fingerprint,
        "ca_fingerprint_sha256": _fingerprint(ca_cert),
        "not_after": _iso(record.not_after),
        "created": _iso(record.issued_at),
        "files": files,
    }
    write_json(kit_dir / KIT_JSON, meta)
    write_atomic(kit_dir / KIT_README, _kit_readme(meta).encode())


def _kit_readme(meta: Mapping[str, Any]) -> str:
    name, role, files = meta["identity"], meta["role"], meta["files"]
    start = {
        "site": f"    confide site start --kit ./{name} --config site.toml",
        "auditor": f"    confide audit report --kit ./{name}",
        "admin": f"    confide <command> --kit ./{name}   (admin commands of the coordinator)",
    }[role]
    return f"""# Confide startup kit: {name} ({role}) in federation {meta["federation"]}

This folder lets **{name}** join the federation **{meta["federation"]}** as a **{role}**.
It connects out to the coordinator at `{meta["coordinator_address"]}` over mutual TLS:
both sides prove who they are with certificates from the federation's CA.

| file | what it is | secret? |
|---|---|---|
| `{files["certificate"]}` | this identity's certificate (valid until {meta["not_after"]}) | no |
| `{files["private_key"]}` | this identity's private key (PKCS8 PEM, unencrypted, 0600) | **yes** |
| `{files["ca_certificate"]}` | the federation CA certificate: the only CA this kit trusts | no |
| `kit.json` | federation, identity, role, coordinator address, serial, fingerprints | no |
| `README.md` | this file | no |

## Keep the key secret

Whoever can read `{files["private_key"]}` can act as {name} in the federation. The key is
not encrypted with a passphrase because the agent starts unattended, so the file
permissions are the protection:

- keep the folder on the machine that runs the agent, owned by the account that runs it;
- keep the key file at mode 0600 (`chmod 600 {files["private_key"]}`), the folder at 0700;
  Confide refuses to start with a key that other users can read;
- never e-mail the kit or commit it to a repository; move it over a secure channel.

If the key may have leaked, ask the federation administrator to revoke this certificate
(`confide pki revoke --identity {name}`) and to issue a new kit.

## Check what you received

Confirm these fingerprints with the federation administrator over another channel
(phone, signed e-mail) before you start:

- certificate SHA-256: `{meta["fingerprint_sha256"]}`
- CA SHA-256: `{meta["ca_fingerprint_sha256"]}`

## Start

{start}

(`./{name}` is this folder.) Only outgoing connections to `{meta["coordinator_address"]}`
are needed; nothing listens on this machine.
"""


def list_certificates(pki_dir: Path) -> list[CertRecord]:
    """Every certificate the CA issued, oldest first (the coordinator's included)."""
    return sorted(_load_registry(Path(pki_dir)).certificates, key=lambda r: r.issued_at)


def revoke(pki_dir: Path, identity_or_serial: str | int, reason: str = "unspecified") -> CertRecord:
    """Revoke a certificate, by identity name or serial, and publish the new CRL.

    An ``int`` is a serial; a ``str`` is an identity name if the registry has one, else a
    hex serial. Revoking an identity revokes every certificate of it still marked valid and
    returns the newest. The signed CRL is written to ``<pki_dir>/crl.pem`` and
    ``<pki_dir>/coordinator/crl.pem``; a running coordinator picks it up without restart.
    """
    pki_dir = Path(pki_dir)
    flag = _reason(reason)
    _require_pki_dir(pki_dir)
    with locked(pki_dir):
        ca_cert, ca_key = _load_ca(pki_dir)
        registry = _load_registry(pki_dir)
        targets = _find(registry, identity_or_serial)
        live = [r for r in targets if r.status == "valid"]
        if not live:
            last = targets[-1]
            raise AlreadyRevokedError(
                f"{last.identity!r} (serial {last.serial_hex}) was revoked already on "
                f"{last.revoked_at.date() if last.revoked_at else '?'}. "
                f"Fix: nothing to do; `confide pki list --dir {pki_dir}` shows the status"
            )
        now = _now()
        chosen = {r.serial for r in live}
        registry.certificates = [
            replace(r, status="revoked", revoked_at=now, reason=flag.name)
            if r.serial in chosen
            else r
            for r in registry.certificates
        ]
        registry.crl_number += 1
        _publish_crl(
            pki_dir, _build_crl(ca_cert, ca_key, registry.certificates, registry.crl_number, now)
        )
        write_json(pki_dir / REGISTRY, registry.to_json())
    newest = max(live, key=lambda r: r.issued_at)
    return replace(newest, status="revoked", revoked_at=now, reason=flag.name)


def _find(registry: _Registry, key: str | int) -> list[CertRecord]:
    fix = "see `confide pki list` for the identities and serials"
    if isinstance(key, str):
        by_name = [r for r in registry.certificates if r.identity == key]
        if by_name:
            return by_name
        try:
            serial = parse_serial(key)
        except InvalidNameError:
            raise CertificateNotFoundError(
                f"no certificate for identity {key!r}. Fix: {fix}"
            ) from None
    else:
        serial = key
    by_serial = [r for r in registry.certificates if r.serial == serial]
    if not by_serial:
        shown = key if isinstance(key, str) else format_serial(key)
        raise CertificateNotFoundError(
            f"no certificate with identity or serial {shown!r}. Fix: {fix}"
        )
    return by_serial


# --------------------------------------------------------------------------- reading certificates


def load_identity(cert_pem: bytes) -> Identity:
    """Who a certificate (PEM or DER) belongs to: its ``confide://`` URI, else its subject."""
    cert = _parse_cert(cert_pem, "certificate")
    subject = cert.subject.rfc4514_string()
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise NotAConfideIdentityError(
                f"{subject} is a CA certificate, not an identity. "
                "Fix: pass the identity's own certificate"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{URI_SCHEME}://")
        ]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) > 1:
        raise NotAConfideIdentityError(
            f"{subject} carries {len(uris)} Confide identities ({', '.join(uris)}); "
            "one is allowed. Fix: issue it again with `confide pki issue`"
        )
    if uris:
        m = _URI_RE.fullmatch(uris[0])
        if m is None:
            raise NotAConfideIdentityError(
                f"{uris[0]!r} is not confide://<federation>/<role>/<identity>. "
                "Fix: issue the certificate with `confide pki issue`"
            )
        federation, role, name = m.groups()
    else:

        def attr(oid: x509.ObjectIdentifier) -> str:
            values = cert.subject.get_attributes_for_oid(oid)
            return str(values[0].value) if len(values) == 1 else ""

        federation = attr(NameOID.ORGANIZATION_NAME)
        role = attr(NameOID.ORGANIZATIONAL_UNIT_NAME)
        name = attr(NameOID.COMMON_NAME)
    try:
        validate_name(federation, "federation")
        validate_name(name, "identity")
        if role != COORDINATOR:
            validate_role(role)
    except InvalidNameError as e:
        raise NotAConfideIdentityError(
            f"{subject} carries no Confide identity ({e}). "
            "Fix: use a certificate issued by `confide pki issue`"
        ) from None
    return Identity(
        federation=federation,
        role=cast(Role, role),
        identity=name,
        serial=cert.serial_number,
        fingerprint=_fingerprint(cert),
        not_after=cert.not_valid_after_utc,
    )


def verify_chain(cert_pem: bytes, ca_pem: bytes, *, at: datetime | None = None) -> None:
    """Check that the CA signed ``cert_pem`` and that both are valid at ``at`` (default: now)."""
    cert = _parse_cert(cert_pem, "certificate")
    ca = _parse_cert(ca_pem, "CA certificate")
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        detail = str(e) or "the signature does not verify"
        raise CertificateInvalidError(
            f"{subject} was not issued by the CA {ca.subject.rfc4514_string()} ({detail}). "
            "Fix: use the ca.crt of the same federation (the one in the startup kit)"
        ) from None
    when = at or datetime.now(timezone.utc)
    for c, what in ((ca, "the CA certificate"), (cert, f"certificate {subject}")):
        if when < c.not_valid_before_utc:
            raise CertificateInvalidError(
                f"{what} is not valid before {_iso(c.not_valid_before_utc)}. "
                "Fix: check this machine's clock (NTP)"
            )
        if when > c.not_valid_after_utc:
            raise CertificateInvalidError(
                f"{what} expired on {_iso(c.not_valid_after_utc)}. Fix: issue a new one with "
                "`confide pki issue --force` (or a new CA with `confide pki init`)"
            )


# --------------------------------------------------------------------------- revocation


class RevocationList:
    """The federation's CRL as the coordinator holds it: verified, reloaded when it changes.

    Thread-safe: gRPC handlers call :meth:`is_revoked` from many threads while one of them
    reloads. A reload that fails (unreadable file, bad signature) raises and keeps the
    previous list; the next call retries, and the caller should refuse the peer meanwhile.
    """

    def __init__(
        self,
        path: Path,
        ca_cert: x509.Certificate,
        serials: frozenset[int],
        number: int | None,
        last_update: datetime,
        stamp: tuple[int, int, int],
    ) -> None:
        self.path = path
        self._ca = ca_cert
        self._serials = serials
        self._number = number
        self._last_update = last_update
        self._stamp = stamp
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, ca: bytes | str | Path) -> RevocationList:
        """Read the CRL at ``path`` and check it is signed by ``ca`` (PEM bytes or a path)."""
        path = Path(path)
        ca_pem = ca if isinstance(ca, bytes) else Path(ca).read_bytes()
        ca_cert = _parse_cert(ca_pem, "CA certificate")
        stamp = _stamp(path)
        serials, number, last_update = _read_crl(path, ca_cert)
        return cls(path, ca_cert, serials, number, last_update, stamp)

    @property
    def revoked_serials(self) -> frozenset[int]:
        return self._serials

    @property
    def crl_number(self) -> int | None:
        return self._number

    @property
    def last_update(self) -> datetime:
        return self._last_update

    def is_revoked(self, serial: int) -> bool:
        return serial in self._serials

    def check(self, identity: Identity) -> None:
        """Raise :class:`CertificateRevokedError` if ``identity``'s certificate is revoked."""
        if self.is_revoked(identity.serial):
            raise CertificateRevokedError(
                f"{identity.uri} (serial {format_serial(identity.serial)}) is revoked. "
                "Fix: ask the federation administrator for a new kit (`confide pki issue`)"
            )

    def reload_if_changed(self) -> bool:
        """Re-read the CRL if its file changed (mtime, size or inode); return whether it did."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            serials, number, last_update = _read_crl(self.path, self._ca)
            if number is not None and self._number is not None and number < self._number:
                # An older CRL copied over a newer one would un-revoke certificates.
                raise RevocationListError(
                    f"{self.path}: CRL number {number} is older than the loaded {self._number}. "
                    "Fix: copy the newest crl.pem from the PKI folder"
                )
            self._serials, self._number, self._last_update = serials, number, last_update
            self._stamp = stamp
            return True


def _stamp(path: Path) -> tuple[int, int, int]:
    # The inode catches an atomic replace within the filesystem's mtime granularity.
    try:
        st = path.stat()
    except OSError as e:
        raise RevocationListError(
            f"{path}: cannot read the revocation list ({e.strerror}). "
            "Fix: copy crl.pem from the PKI folder next to the coordinator certificate"
        ) from None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read_crl(path: Path, ca: x509.Certificate) -> tuple[frozenset[int], int | None, datetime]:
    fix = "copy crl.pem from the PKI folder of this federation (`confide pki revoke` writes it)"
    try:
        data = path.read_bytes()
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_crl(data)
        )
    except OSError as e:
        raise RevocationListError(f"{path}: cannot read ({e.strerror}). Fix: {fix}") from None
    except ValueError as e:
        raise RevocationListError(f"{path}: not an X.509 CRL ({e}). Fix: {fix}") from None
    if crl.issuer != ca.subject or not crl.is_signature_valid(_issuer_public_key(ca)):
        raise RevocationListError(
            f"{path}: not signed by the federation CA {ca.subject.rfc4514_string()}. Fix: {fix}"
        )
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return frozenset(r.serial_number for r in crl), number, crl.last_update_utc


# --------------------------------------------------------------------------- kits and peers


def _read_meta(path: Path) -> dict[str, Any]:
    raw = _read(path, "the kit description")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise KitError(f"{path}: not valid JSON ({e}). Fix: {_KIT_FIX}") from None
    if not isinstance(meta, dict):
        raise KitError(f"{path}: not a JSON object. Fix: {_KIT_FIX}")
    return meta


def _field(meta: Mapping[str, Any], key: str, path: Path) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value:
        raise KitError(f"{path}: field {key!r} is missing or not text. Fix: {_KIT_FIX}")
    return value


def _kit_file(directory: Path, meta: Mapping[str, Any], key: str, default: str, path: Path) -> Path:
    files = meta.get("files")
    name = files.get(key, default) if isinstance(files, dict) else default
    # A kit names its files; a name must stay inside the kit folder (no "..", no path,
    # no NUL byte, which would end in a ValueError when opened).
    if (
        not isinstance(name, str)
        or Path(name).name != name
        or name in ("", ".", "..")
        or "\x00" in name
    ):
        raise KitError(f"{path}: files.{key} must be a plain file name. Fix: {_KIT_FIX}")
    return directory / name


def _check_key(key_path: Path, cert: x509.Certificate) -> None:
    problem = exposed_key_problem(key_path)
    if problem:
        raise KeyPermissionsError(problem)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise KitError(
            f"{key_path}: not an unencrypted PEM private key ({e}). Fix: {_KIT_FIX}"
        ) from None
    if not _same_public_key(key, cert):
        raise KitError(f"{key_path} does not belong to the kit's certificate. Fix: {_KIT_FIX}")


def load_kit(kit_dir: Path) -> Kit:
    """Open and check a startup kit: files present, key private and matching, chain valid."""
    kit_dir = Path(kit_dir)
    if not kit_dir.is_dir():
        raise KitError(
            f"{kit_dir}: no such startup kit folder. Fix: pass the folder written by "
            "`confide pki issue` (its kit.json is inside)"
        )
    meta_path = kit_dir / KIT_JSON
    meta = _read_meta(meta_path)
    federation = _field(meta, "federation", meta_path)
    name = _field(meta, "identity", meta_path)
    role = _field(meta, "role", meta_path)
    address = _field(meta, "coordinator_address", meta_path)
    split_address(address)
    cert_path = _kit_file(kit_dir, meta, "certificate", f"{name}.crt", meta_path)
    key_path = _kit_file(kit_dir, meta, "private_key", f"{name}.key", meta_path)
    ca_path = _kit_file(kit_dir, meta, "ca_certificate", CA_CERT, meta_path)
    cert_pem = _read(cert_path, "the certificate")
    ca_pem = _read(ca_path, "the CA certificate")
    _read(key_path, "the private key")
    cert = _parse_cert(cert_pem, str(cert_path))
    _check_key(key_path, cert)
    verify_chain(cert_pem, ca_pem)
    ident = load_identity(cert_pem)
    if (ident.federation, ident.role, ident.identity) != (federation, role, name):
        raise KitError(
            f"{meta_path} says {identity_uri(federation, role, name)} but {cert_path} is "
            f"{ident.uri}. Fix: {_KIT_FIX}"
        )
    try:
        created = _parse_time(meta.get("created") or _iso(cert.not_valid_before_utc))
    except ValueError:
        raise KitError(f"{meta_path}: 'created' is not an ISO date. Fix: {_KIT_FIX}") from None
    return Kit(
        path=kit_dir,
        certificate=cert_path,
        private_key=key_path,
        ca_certificate=ca_path,
        federation=federation,
        identity=name,
        role=ident.role,
        coordinator_address=address,
        serial=ident.serial,
        fingerprint=ident.fingerprint,
        not_after=ident.not_after,
        created=created,
    )


def load_coordinator(coordinator_dir: Path) -> CoordinatorFiles:
    """Open and check the coordinator's folder (``<pki>/coordinator``) written by ``init``."""
    d = Path(coordinator_dir)
    if not d.is_dir():
        raise KitError(
            f"{d}: no such coordinator folder. Fix: pass the coordinator/ folder that "
            "`confide pki init` wrote"
        )
    meta_path = d / COORDINATOR_JSON
    meta = _read_meta(meta_path)
    federation = _field(meta, "federation", meta_path)
    address = _field(meta, "address", meta_path)
    hosts = meta.get("hosts", [])
    cert_path, key_path, ca_path, crl_path = (
        d / COORDINATOR_CERT,
        d / COORDINATOR_KEY,
        d / CA_CERT,
        d / CRL,
    )
    cert_pem = _read(cert_path, "the coordinator certificate")
    ca_pem = _read(ca_path, "the CA certificate")
    _read(key_path, "the coordinator private key")
    _read(crl_path, "the revocation list")
    _check_key(key_path, _parse_cert(cert_pem, str(cert_path)))
    verify_chain(cert_pem, ca_pem)
    return CoordinatorFiles(
        path=d,
        certificate=cert_path,
        private_key=key_path,
        ca_certificate=ca_path,
        crl=crl_path,
        federation=federation,
        address=address,
        hosts=tuple(str(h) for h in hosts) if isinstance(hosts, list) else (),
    )


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
    """The identity in a gRPC peer's certificate (``context.auth_context()`` of a handler)."""
    certs = auth_context.get("x509_pem_cert") or []
    if not certs:
        raise NotAConfideIdentityError(
            "the peer presented no client certificate. Fix: connect with a startup kit "
            "(mutual TLS), see `confide pki issue`"
        )
    return _cached_identity(bytes(certs[0]))


# A certificate's identity depends on its bytes only (Identity is frozen), so the
# coordinator parses each peer certificate once, not on every call; revocation and
# role checks still run on every call.
_cached_identity = functools.lru_cache(maxsize=4096)(load_identity)


def authenticate_peer(
    auth_context: Mapping[str, Sequence[bytes]],
    revocations: RevocationList | None,
    *,
    federation: str | None = None,
    roles: Collection[str] | None = None,
) -> Identity:
    """What the coordinator runs at join and on every call: who is it, and may it call?

    TLS has already checked the chain against the federation CA; this reads the identity,
    reloads the CRL if its file changed, refuses revoked certificates, other federations and
    roles outside ``roles`` (default: site, auditor, admin; never the coordinator's own).
    """
    allowed = ROLES if roles is None else roles
    ident = peer_identity(auth_context)
    if federation is not None and ident.federation != federation:
        raise PeerNotAllowedError(
            f"{ident.uri} belongs to federation {ident.federation!r}, not {federation!r}. "
            "Fix: use a kit issued by this federation's PKI"
        )
    if ident.role not in allowed:
        raise PeerNotAllowedError(
            f"{ident.uri}: role {ident.role!r} may not make this call (allowed: "
            f"{', '.join(sorted(allowed))}). Fix: use a kit with one of those roles"
        )
    if revocations is not None:
        revocations.reload_if_changed()
        revocations.check(ident)
    return ident
