"""The federation PKI: real certificates, real CRLs, and real mutual TLS over loopback gRPC."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.errors import ConfideError, ConfigError
from confide.privacy.crypto import (
    NAME_RULE,
    AlreadyRevokedError,
    CAExistsError,
    CertificateInvalidError,
    CertificateNotFoundError,
    CertificateRevokedError,
    IdentityExistsError,
    InvalidNameError,
    KeyPermissionsError,
    KitError,
    NotAConfideIdentityError,
    PeerNotAllowedError,
    RevocationList,
    RevocationListError,
    authenticate_peer,
    init_ca,
    issue,
    list_certificates,
    load_coordinator,
    load_identity,
    load_kit,
    reissue_coordinator,
    revoke,
    verify_chain,
)
from confide.privacy.crypto.pki_cli import add_pki_parser

FED = "cardio-2025"
TIMEOUT = 5.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_ca(d, FED, coordinator_hosts=["coord.example.org", "10.0.0.5"])
    return d


# --------------------------------------------------------------------------- init


def test_init_writes_ca_and_coordinator_with_private_keys_0600(pki_dir: Path) -> None:
    for name in ("ca.crt", "ca.key", "registry.json", "crl.pem"):
        assert (pki_dir / name).is_file(), name
    co = pki_dir / "coordinator"
    for name in ("coordinator.crt", "coordinator.key", "ca.crt", "crl.pem", "coordinator.json"):
        assert (co / name).is_file(), name
    assert _mode(pki_dir / "ca.key") == 0o600
    assert _mode(co / "coordinator.key") == 0o600
    assert _mode(pki_dir) == 0o700
    assert _mode(pki_dir / "ca.crt") == 0o644

    ca = _cert(pki_dir / "ca.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"


def test_coordinator_certificate_names_loopback_and_configured_hosts(pki_dir: Path) -> None:
    co_pem = (pki_dir / "coordinator" / "coordinator.crt").read_bytes()
    co = x509.load_pem_x509_certificate(co_pem)
    san = co.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    eku = co.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not co.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verify_chain(co_pem, (pki_dir / "ca.crt").read_bytes())
    ident = load_identity(co_pem)
    assert (ident.federation, ident.role, ident.identity) == (FED, "coordinator", "coordinator")
    assert load_coordinator(pki_dir / "coordinator").federation == FED


def test_init_refuses_to_overwrite_a_ca_unless_forced(pki_dir: Path) -> None:
    before = (pki_dir / "ca.crt").read_bytes()
    with pytest.raises(CAExistsError, match=r"another folder.*--force"):
        init_ca(pki_dir, FED)
    assert (pki_dir / "ca.crt").read_bytes() == before
    init_ca(pki_dir, FED, force=True)
    assert (pki_dir / "ca.crt").read_bytes() != before


# --------------------------------------------------------------------------- issue


def test_issue_writes_a_complete_kit_whose_identity_round_trips(pki_dir: Path) -> None:
    kit_dir = issue(pki_dir, "hospital-a", "site")
    assert kit_dir == pki_dir / "kits" / "hospital-a"
    assert sorted(p.name for p in kit_dir.iterdir()) == [
        "README.md",
        "ca.crt",
        "hospital-a.crt",
        "hospital-a.key",
        "kit.json",
    ]
    assert _mode(kit_dir / "hospital-a.key") == 0o600
    assert _mode(kit_dir) == 0o700
    assert _mode(kit_dir.parent) == 0o700
    assert (kit_dir / "hospital-a.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    meta = json.loads((kit_dir / "kit.json").read_text())
    assert meta["federation"] == FED
    assert meta["identity"] == "hospital-a"
    assert meta["role"] == "site"
    assert meta["coordinator_address"] == "127.0.0.1:50051"
    assert {"serial", "fingerprint_sha256", "not_after", "created"} <= meta.keys()
    readme = (kit_dir / "README.md").read_text()
    assert "confide site start --kit ./hospital-a --config site.toml" in readme
    assert "chmod 600" in readme

    cert_pem = (kit_dir / "hospital-a.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"confide://{FED}/site/hospital-a"
    ]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "site"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    ident = load_identity(cert_pem)
    assert (ident.federation, ident.role, ident.identity) == (FED, "site", "hospital-a")
    assert ident.serial == cert.serial_number == int(meta["serial"], 16)
    assert ident.fingerprint == meta["fingerprint_sha256"]

    kit = load_kit(kit_dir)
    assert (kit.identity, kit.role, kit.serial) == ("hospital-a", "site", ident.serial)
    assert kit.coordinator_address == "127.0.0.1:50051"


def test_auditor_and_admin_kits_carry_their_role(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "alice"
    assert issue(pki_dir, "alice", "auditor", out) == out
    assert load_kit(out).role == "auditor"
    assert load_kit(issue(pki_dir, "ops", "admin")).role == "admin"
    records = {(r.identity, r.role) for r in list_certificates(pki_dir)}
    assert records == {("coordinator", "coordinator"), ("alice", "auditor"), ("ops", "admin")}


@pytest.mark.parametrize("name", ["Hospital-A", "-a", "a_b", "", "x" * 64, "a/b", "a.b", "é"])
def test_bad_identity_names_are_rejected_naming_the_rule(pki_dir: Path, name: str) -> None:
    with pytest.raises(InvalidNameError) as e:
        issue(pki_dir, name, "site")
    assert NAME_RULE in str(e.value)
    assert "Fix:" in str(e.value)


@pytest.mark.parametrize("role", ["researcher", "Site", "coordinator", ""])
def test_bad_roles_are_rejected_naming_the_allowed_ones(pki_dir: Path, role: str) -> None:
    with pytest.raises(InvalidNameError, match="site, auditor, admin"):
        issue(pki_dir, "hospital-a", role)


def test_coordinator_identity_name_is_reserved(pki_dir: Path) -> None:
    with pytest.raises(InvalidNameError, match="reserved"):
        issue(pki_dir, "coordinator", "site")


def test_bad_federation_name_and_host_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError, match="federation name"):
        init_ca(tmp_path / "a", "Cardio Study")
    with pytest.raises(InvalidNameError, match="host"):
        init_ca(tmp_path / "b", FED, coordinator_hosts=["bad_host!"])
    with pytest.raises(ConfigError, match="HOST:PORT"):
        init_ca(tmp_path / "c", FED, coordinator_address="coord.example.org")


def test_kit_address_must_be_named_by_the_coordinator_certificate(pki_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not in the coordinator certificate"):
        issue(pki_dir, "hospital-a", "site", coordinator_address="other.example.org:50051")
    kit = load_kit(issue(pki_dir, "hospital-a", "site", coordinator_address="10.0.0.5:443"))
    assert kit.coordinator_address == "10.0.0.5:443"


def test_reissued_coordinator_certificate_adds_names_and_keeps_kits(pki_dir: Path) -> None:
    kit = load_kit(issue(pki_dir, "hospital-a", "site"))
    old = load_identity((pki_dir / "coordinator" / "coordinator.crt").read_bytes())
    info = reissue_coordinator(pki_dir, coordinator_hosts=["coord2.example.org"])
    assert "coord2.example.org" in info.coordinator_sans
    assert "coord.example.org" in info.coordinator_sans  # names it had are kept
    files = load_coordinator(pki_dir / "coordinator")
    assert "coord2.example.org" in files.hosts
    new = load_identity(files.certificate.read_bytes())
    assert new.serial != old.serial
    status = {r.serial: r.status for r in list_certificates(pki_dir)}
    assert (status[old.serial], status[new.serial]) == ("revoked", "valid")
    load_kit(kit.path)  # same CA: existing kits are untouched
    assert (
        load_kit(
            issue(pki_dir, "hospital-b", "site", coordinator_address="coord2.example.org:50051")
        ).coordinator_address
        == "coord2.example.org:50051"
    )


def test_reissue_is_refused_without_force_and_supersedes_with_it(pki_dir: Path) -> None:
    first = load_kit(issue(pki_dir, "hospital-a", "site"))
    with pytest.raises(IdentityExistsError, match="--force"):
        issue(pki_dir, "hospital-a", "site")
    second = load_kit(issue(pki_dir, "hospital-a", "site", force=True))
    assert second.serial != first.serial
    status = {r.serial: (r.status, r.reason) for r in list_certificates(pki_dir)}
    assert status[first.serial] == ("revoked", "superseded")
    assert status[second.serial] == ("valid", None)
    crl = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    assert crl.is_revoked(first.serial) and not crl.is_revoked(second.serial)


def test_issue_refuses_a_non_empty_foreign_folder(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a kit")
    with pytest.raises(KitError, match="not empty"):
        issue(pki_dir, "hospital-a", "site", out)


# --------------------------------------------------------------------------- identity, chain


def _self_signed(subject: x509.Name, *, san: list[x509.GeneralName] | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_load_identity_falls_back_to_the_subject() -> None:
    pem = _self_signed(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, FED),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "auditor"),
                x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
            ]
        )
    )
    ident = load_identity(pem)
    assert (ident.federation, ident.role, ident.identity) == (FED, "auditor", "alice")


def test_certificates_without_a_confide_identity_are_refused(pki_dir: Path) -> None:
    web = _self_signed(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.org")]),
        san=[x509.DNSName("www.example.org")],
    )
    with pytest.raises(NotAConfideIdentityError, match="no Confide identity"):
        load_identity(web)
    with pytest.raises(NotAConfideIdentityError, match="CA certificate"):
        load_identity((pki_dir / "ca.crt").read_bytes())


def test_verify_chain_refuses_another_ca_and_expired_certificates(
    pki_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    init_ca(other, "other-fed")
    cert_pem = (issue(pki_dir, "hospital-a", "site") / "hospital-a.crt").read_bytes()
    ca_pem = (pki_dir / "ca.crt").read_bytes()
    verify_chain(cert_pem, ca_pem)
    with pytest.raises(CertificateInvalidError, match="not issued by"):
        verify_chain(cert_pem, (other / "ca.crt").read_bytes())
    with pytest.raises(CertificateInvalidError, match="expired"):
        verify_chain(cert_pem, ca_pem, at=datetime.now(timezone.utc) + timedelta(days=900))
    with pytest.raises(CertificateInvalidError, match="clock"):
        verify_chain(cert_pem, ca_pem, at=datetime.now(timezone.utc) - timedelta(days=1))


# --------------------------------------------------------------------------- kits


def test_load_kit_names_the_missing_file_and_the_fix(pki_dir: Path) -> None:
    kit_dir = issue(pki_dir, "hospital-a", "site")
    (kit_dir / "ca.crt").unlink()
    with pytest.raises(KitError, match=r"ca\.crt.*missing.*Fix:"):
        load_kit(kit_dir)
    with pytest.raises(KitError, match="no such startup kit folder"):
        load_kit(kit_dir.parent / "nobody")


def test_load_kit_refuses_invalid_kit_json(pki_dir: Path) -> None:
    kit_dir = issue(pki_dir, "hospital-a", "site")
    (kit_dir / "kit.json").write_text("{not json")
    with pytest.raises(KitError, match=r"kit\.json: not valid JSON"):
        load_kit(kit_dir)


def test_load_kit_refuses_a_key_others_can_read(pki_dir: Path) -> None:
    kit_dir = issue(pki_dir, "hospital-a", "site")
    key = kit_dir / "hospital-a.key"
    os.chmod(key, 0o644)
    with pytest.raises(KeyPermissionsError) as e:
        load_kit(kit_dir)
    assert f"chmod 600 {key}" in str(e.value)
    os.chmod(key, 0o400)  # stricter than 0600 is fine
    load_kit(kit_dir)


def test_load_kit_refuses_a_key_of_another_certificate(pki_dir: Path) -> None:
    a = issue(pki_dir, "hospital-a", "site")
    b = issue(pki_dir, "hospital-b", "site")
    (a / "hospital-a.key").write_bytes((b / "hospital-b.key").read_bytes())
    with pytest.raises(KitError, match="does not belong"):
        load_kit(a)


# --------------------------------------------------------------------------- revocation


def test_revoke_updates_the_list_and_a_running_revocation_list(pki_dir: Path) -> None:
    a = load_kit(issue(pki_dir, "hospital-a", "site"))
    b = load_kit(issue(pki_dir, "hospital-b", "site"))
    crl = RevocationList.load(pki_dir / "coordinator" / "crl.pem", pki_dir / "ca.crt")
    assert not crl.is_revoked(a.serial)
    assert crl.reload_if_changed() is False

    record = revoke(pki_dir, "hospital-a", reason="key-compromise")
    assert (record.identity, record.status, record.reason) == (
        "hospital-a",
        "revoked",
        "key_compromise",
    )
    assert crl.reload_if_changed() is True
    assert crl.is_revoked(a.serial) and not crl.is_revoked(b.serial)
    fresh = RevocationList.load(pki_dir / "crl.pem", (pki_dir / "ca.crt").read_bytes())
    assert fresh.revoked_serials == {a.serial}

    revoke(pki_dir, b.serial)  # by serial too
    assert crl.reload_if_changed() and crl.is_revoked(b.serial)
    status = {r.identity: r.status for r in list_certificates(pki_dir)}
    assert status == {"coordinator": "valid", "hospital-a": "revoked", "hospital-b": "revoked"}

    with pytest.raises(AlreadyRevokedError):
        revoke(pki_dir, "hospital-a")
    with pytest.raises(CertificateNotFoundError, match="confide pki list"):
        revoke(pki_dir, "nobody")
    with pytest.raises(InvalidNameError, match="key_compromise"):
        revoke(pki_dir, "hospital-b", reason="bored")
    # A revoked identity may be issued again without --force.
    assert load_kit(issue(pki_dir, "hospital-a", "site")).serial != a.serial


def test_a_crl_signed_by_another_ca_is_rejected(pki_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, FED)  # same federation name, different key: still a stranger
    with pytest.raises(RevocationListError, match="not signed by the federation CA"):
        RevocationList.load(other / "crl.pem", pki_dir / "ca.crt")

    # Copied over a running list, it is refused and the old list stays in force.
    serial = load_kit(issue(pki_dir, "hospital-a", "site")).serial
    revoke(pki_dir, "hospital-a")
    crl = RevocationList.load(pki_dir / "crl.pem", pki_dir / "ca.crt")
    (pki_dir / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(RevocationListError):
        crl.reload_if_changed()
    assert crl.is_revoked(serial)


# --------------------------------------------------------------------------- mutual TLS


Channel = Callable[[grpc.ChannelCredentials], bytes]


@pytest.fixture
def coordinator(pki_dir: Path) -> Iterator[Channel]:
    """A tiny gRPC server with the coordinator's credentials; yields a `call(credentials)`."""
    files = load_coordinator(pki_dir / "coordinator")
    revocations = files.revocation_list()

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            ident = authenticate_peer(context.auth_context(), revocations, federation=FED)
        except CertificateRevokedError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except (NotAConfideIdentityError, PeerNotAllowedError) as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        return request + b" " + ident.uri.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("confide.test.Echo", {"Who": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", files.server_credentials())
    assert port > 0
    server.start()

    def call(credentials: grpc.ChannelCredentials) -> bytes:
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
            reply: bytes = channel.unary_unary("/confide.test.Echo/Who")(b"hello", timeout=TIMEOUT)
            return reply

    try:
        yield call
    finally:
        server.stop(None)


def test_a_site_kit_connects_and_the_coordinator_sees_its_identity(
    pki_dir: Path, coordinator: Channel
) -> None:
    kit = load_kit(issue(pki_dir, "hospital-a", "site"))
    assert (
        coordinator(kit.channel_credentials()) == f"hello confide://{FED}/site/hospital-a".encode()
    )


def test_a_client_without_a_certificate_is_refused(pki_dir: Path, coordinator: Channel) -> None:
    ca = (pki_dir / "ca.crt").read_bytes()
    with pytest.raises(grpc.RpcError) as e:
        coordinator(grpc.ssl_channel_credentials(root_certificates=ca))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_a_certificate_from_another_ca_is_refused(
    pki_dir: Path, tmp_path: Path, coordinator: Channel
) -> None:
    other = tmp_path / "other"
    init_ca(other, FED)
    stranger = load_kit(issue(other, "hospital-a", "site"))
    ca = (pki_dir / "ca.crt").read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=stranger.private_key.read_bytes(),
        certificate_chain=stranger.certificate.read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as e:
        coordinator(credentials)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_coordinator_certificate_cannot_act_as_a_client(
    pki_dir: Path, coordinator: Channel
) -> None:
    co = pki_dir / "coordinator"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(co / "ca.crt").read_bytes(),
        private_key=(co / "coordinator.key").read_bytes(),
        certificate_chain=(co / "coordinator.crt").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as e:
        coordinator(credentials)
    # TLS itself refuses it: its extended key usage is serverAuth only.
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_revoked_kit_is_refused_by_a_running_coordinator(
    pki_dir: Path, coordinator: Channel
) -> None:
    kit = load_kit(issue(pki_dir, "hospital-a", "site"))
    assert coordinator(kit.channel_credentials()).endswith(b"/site/hospital-a")
    revoke(pki_dir, "hospital-a", reason="key_compromise")
    with pytest.raises(grpc.RpcError) as e:
        coordinator(kit.channel_credentials())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (e.value.details() or "")


# --------------------------------------------------------------------------- CLI


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="confide")
    add_pki_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    try:
        code = int(args.func(args))
    except ConfideError as e:  # what confide.cli.main does
        print(f"confide: error: {e}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_init_issue_list_revoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = str(tmp_path / "pki")
    code, out, _ = _cli(
        capsys, "pki", "init", "--dir", d, "--federation", FED, "--host", "coord.example.org"
    )
    assert code == 0 and "coordinator folder" in out and "coord.example.org" in out
    code, out, _ = _cli(
        capsys, "pki", "issue", "--dir", d, "--identity", "hospital-a", "--role", "site"
    )
    assert code == 0 and str(Path(d) / "kits" / "hospital-a") in out
    code, out, _ = _cli(capsys, "pki", "list", "--dir", d)
    assert code == 0 and "hospital-a" in out and "valid" in out
    serial_shown = load_kit(Path(d) / "kits" / "hospital-a").serial
    assert format(serial_shown, "x") in out  # whole, on one line, ready for --serial
    code, out, _ = _cli(capsys, "pki", "coordinator", "--dir", d, "--host", "10.1.2.3")
    assert code == 0 and "10.1.2.3" in out
    code, out, _ = _cli(capsys, "pki", "list", "--dir", d, "--json")
    rows = {r["identity"]: r for r in json.loads(out)}
    serial = rows["hospital-a"]["serial"]
    code, out, _ = _cli(
        capsys, "pki", "revoke", "--dir", d, "--serial", serial, "--reason", "superseded"
    )
    assert code == 0 and "revoked hospital-a" in out and "crl.pem" in out
    _, out, _ = _cli(capsys, "pki", "list", "--dir", d, "--json")
    assert {r["identity"]: r["status"] for r in json.loads(out)}["hospital-a"] == "revoked"


def test_cli_errors_are_one_line_with_the_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = str(tmp_path / "pki")
    code, _, err = _cli(capsys, "pki", "issue", "--dir", d, "--identity", "a", "--role", "site")
    assert code == 2 and "confide pki init" in err and len(err.strip().splitlines()) == 1
    _cli(capsys, "pki", "init", "--dir", d, "--federation", FED)
    code, _, err = _cli(capsys, "pki", "init", "--dir", d, "--federation", FED)
    assert code == 2 and "--force" in err
    code, _, err = _cli(capsys, "pki", "issue", "--dir", d, "--identity", "A", "--role", "site")
    assert code == 2 and NAME_RULE in err
    code, _, err = _cli(
        capsys, "pki", "init", "--dir", d, "--federation", FED, "--valid-days", "x", "--force"
    )
    assert code == 2 and "--valid-days" in err
