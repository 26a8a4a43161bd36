"""Data at rest: sealed checkpoints and model files, durable SQLite, private keys, full disks."""

from __future__ import annotations

import ast
import base64
import errno
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from federation_helpers import (
    Federation,
    make_federation,
    offset_app,
    running_coordinator,
    wait_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.cli import main
from confide.client.agent import SiteAgent, validate_site_config
from confide.errors import ConfigError
from confide.privacy.audit import AuditLog
from confide.privacy.crypto import (
    SealError,
    SealKey,
    create_key_file,
    is_sealed,
    load_kit,
    seal,
    unseal,
)
from confide.privacy.dp import PrivacyLedger
from confide.rpc import TrafficMeter
from confide.server import coordinator as coordinator_module
from confide.server.coordinator import EXIT_STATE_UNWRITABLE, Coordinator
from confide.server.store import (
    CheckpointWriteError,
    Store,
    UnsealedCheckpointError,
    load_model_file,
)

ROOT = Path(__file__).resolve().parents[1]
PASSPHRASE = "correct horse battery staple"
FAST = {"log2_n": 10}  # scrypt at n = 2**10 for tests; production blobs say 2**15 in the header


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def file_key(tmp_path_factory: pytest.TempPathFactory) -> SealKey:
    return create_key_file(tmp_path_factory.mktemp("keys") / "seal.key")


@pytest.fixture(scope="module")
def sealed_blob(file_key: SealKey) -> bytes:
    return seal(b"weights of round 3" * 3, file_key, purpose="confide test")


# --- sealing ----------------------------------------------------------------------------------


def test_a_key_file_is_created_0600_in_a_0700_folder_and_round_trips(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "keys" / "seal.key")
    assert _mode(tmp_path / "keys" / "seal.key") == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    assert (tmp_path / "keys" / "seal.key").stat().st_size == 32
    data = os.urandom(1000)
    blob = seal(data, key, purpose="confide checkpoint round-00001.sealed")
    assert is_sealed(blob) and data not in blob
    again = SealKey.from_file(tmp_path / "keys" / "seal.key")  # as after a restart
    assert unseal(blob, again, purpose="confide checkpoint round-00001.sealed") == data
    assert again.key_id == key.key_id and key.key_id in repr(key)
    # Two seals of the same data differ (a fresh nonce each time).
    assert seal(data, key, purpose="p") != seal(data, key, purpose="p")
    with pytest.raises(SealError, match="exists already"):
        create_key_file(tmp_path / "keys" / "seal.key")


def test_a_passphrase_key_states_its_scrypt_parameters_and_opens_under_another_salt() -> None:
    default = SealKey.from_passphrase(PASSPHRASE)
    blob = seal(b"model", default, purpose="p")
    assert blob[18:36] == bytes([16]) + default._salt + bytes([15])  # salt, log2 n = 15 ...
    assert blob[36:44] == (8).to_bytes(4, "big") + (1).to_bytes(4, "big")  # ... r = 8, p = 1
    # The coordinator after a restart draws a new salt; the blob's own salt opens it.
    restarted = SealKey.from_passphrase(PASSPHRASE, **FAST)
    assert unseal(blob, restarted, purpose="p") == b"model"
    assert unseal(seal(b"x", restarted, purpose="q"), default, purpose="q") == b"x"
    assert PASSPHRASE not in repr(default)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_flipped_byte_of_a_sealed_blob_is_refused(
    sealed_blob: bytes, file_key: SealKey, data: st.DataObject
) -> None:
    pos = data.draw(st.integers(0, len(sealed_blob) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(sealed_blob)
    bad[pos] ^= mask
    with pytest.raises(SealError):
        unseal(bytes(bad), file_key, purpose="confide test")


def test_every_position_of_a_passphrase_blob_is_authenticated() -> None:
    key = SealKey.from_passphrase(PASSPHRASE, **FAST)
    blob = seal(b"0123456789", key, purpose="p")
    for pos in range(len(blob)):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= mask
            with pytest.raises(SealError):
                unseal(bytes(bad), key, purpose="p")


def test_a_truncated_blob_is_refused_at_every_length(sealed_blob: bytes, file_key: SealKey) -> None:
    for n in range(len(sealed_blob)):
        with pytest.raises(SealError):
            unseal(sealed_blob[:n], file_key, purpose="confide test")
    with pytest.raises(SealError):
        unseal(sealed_blob + b"\0", file_key, purpose="confide test")


def test_a_wrong_key_or_purpose_is_refused_with_the_file_named(
    tmp_path: Path, sealed_blob: bytes, file_key: SealKey
) -> None:
    where = tmp_path / "round-00003.sealed"
    other = create_key_file(tmp_path / "other.key")
    with pytest.raises(SealError, match="sealed with another key") as e:
        unseal(sealed_blob, other, purpose="confide test", where=where)
    assert str(where) in str(e.value)
    with pytest.raises(SealError, match="another purpose") as e:
        unseal(sealed_blob, file_key, purpose="confide model export", where=where)
    assert str(where) in str(e.value)
    with pytest.raises(SealError, match="sealed with a key file"):
        unseal(sealed_blob, SealKey.from_passphrase(PASSPHRASE, **FAST), purpose="confide test")
    wrong = SealKey.from_passphrase("incorrect horse battery", **FAST)
    with pytest.raises(SealError, match="another passphrase"):
        unseal(
            seal(b"x", SealKey.from_passphrase(PASSPHRASE, **FAST), purpose="p"), wrong, purpose="p"
        )
    with pytest.raises(SealError, match="not sealed"):
        unseal(b"PK\x03\x04 a plain npz", file_key, purpose="confide test")


def test_an_unusable_key_file_or_passphrase_is_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seal.key"
    create_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(SealError, match=f"chmod 600 {path}"):
        SealKey.from_file(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(SealError, match="holds 16 bytes, not 32"):
        SealKey.from_file(short)
    with pytest.raises(SealError, match="seal-key --out"):
        SealKey.from_file(tmp_path / "missing.key")
    with pytest.raises(SealError, match="fewer than 12"):
        SealKey.from_passphrase("hunter2")
    monkeypatch.delenv("CONFIDE_TEST_SEAL", raising=False)
    with pytest.raises(SealError, match=r"\$CONFIDE_TEST_SEAL, but it is not set"):
        SealKey.from_env("CONFIDE_TEST_SEAL")
    monkeypatch.setenv("CONFIDE_TEST_SEAL", PASSPHRASE)
    assert SealKey.from_env("CONFIDE_TEST_SEAL").kdf == "scrypt"
    with pytest.raises(TypeError):
        SealKey(b"\0" * 32)


def test_the_config_takes_a_key_file_or_a_passphrase_variable_never_both(tmp_path: Path) -> None:
    fed = make_federation(tmp_path)
    create_key_file(tmp_path / "seal.key")
    fed.doc["server"]["seal_key_file"] = "seal.key"  # relative to federation.toml
    assert fed.config().seal_key() is not None
    fed.doc["server"]["seal_passphrase_env"] = "CONFIDE_SEAL"
    with pytest.raises(ConfigError, match="choose one"):
        fed.config()
    del fed.doc["server"]["seal_key_file"]
    fed.doc["server"]["seal_passphrase_env"] = "not a variable name!"
    with pytest.raises(ConfigError, match="environment variable"):
        fed.config()
    del fed.doc["server"]["seal_passphrase_env"]
    assert fed.config().seal_key() is None  # the default: plaintext checkpoints


# --- checkpoints in the store -----------------------------------------------------------------


def _weights(seed: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=32).astype(np.float32)]


def test_sealed_checkpoints_hold_no_plaintext_and_load_verified(
    tmp_path: Path, file_key: SealKey
) -> None:
    w = _weights(1)
    moments = {"m": _weights(2), "v": _weights(3)}
    with Store(tmp_path, file_key) as store:
        path = store.save_checkpoint(1, ["w", "b"], w, moments)
        assert path.name == "round-00001.sealed"
        assert sorted(p.name for p in store.models_dir.iterdir()) == [
            "round-00001.sealed",
            "round-00001.strategy.sealed",
        ]
        for f in store.models_dir.iterdir():
            blob = f.read_bytes()
            assert is_sealed(blob) and _mode(f) == 0o600
            for a in [*w, *moments["m"], *moments["v"]]:
                assert a.tobytes()[:64] not in blob
        got = store.latest_checkpoint()
    assert got is not None and got.names == ["w", "b"]
    assert all(np.array_equal(a, b) for a, b in zip(got.weights, w, strict=True))
    assert all(
        np.array_equal(a, b) for a, b in zip(got.strategy_state["v"], moments["v"], strict=True)
    )
    with Store(tmp_path) as store, pytest.raises(Exception, match="no seal key is configured"):
        store.latest_checkpoint()


def test_a_checkpoint_renamed_to_another_round_fails_authentication(
    tmp_path: Path, file_key: SealKey
) -> None:
    with Store(tmp_path, file_key) as store:
        store.save_checkpoint(1, ["w", "b"], _weights(1))
        store.save_checkpoint(2, ["w", "b"], _weights(2))
        one, two = store.models_dir / "round-00001.sealed", store.models_dir / "round-00002.sealed"
        two.write_bytes(one.read_bytes())
        with pytest.raises(SealError, match=r"round-00002\.sealed"):
            store.latest_checkpoint()


def test_plaintext_checkpoints_are_refused_once_sealing_is_on_until_migrated(
    tmp_path: Path, file_key: SealKey
) -> None:
    with Store(tmp_path) as store:
        store.save_checkpoint(0, ["w", "b"], _weights(0))
        store.save_checkpoint(1, ["w", "b"], _weights(1), {"m": _weights(2)})
    with Store(tmp_path, file_key) as store:
        with pytest.raises(UnsealedCheckpointError, match="seal-checkpoints"):
            store.latest_checkpoint()
        sealed = store.seal_checkpoints()
        assert [p.name for p in sealed] == [
            "round-00000.sealed",
            "round-00001.sealed",
            "round-00001.strategy.sealed",
        ]
        assert not list(store.models_dir.glob("*.npz"))
        got = store.latest_checkpoint()
        assert got is not None and np.array_equal(got.weights[0], _weights(1)[0])
        assert store.seal_checkpoints() == []  # idempotent


def test_an_export_is_sealed_unless_asked_for_plaintext(
    tmp_path: Path, file_key: SealKey, capsys: pytest.CaptureFixture[str]
) -> None:
    with Store(tmp_path / "state", file_key) as store:
        store.save_checkpoint(4, ["w", "b"], _weights(4))
        out, rnd, sealed = store.export_model(tmp_path / "out" / "model.npz")
        assert (rnd, sealed) == (4, True) and _mode(out) == 0o600
        names, arrays = load_model_file(out, file_key)
        assert names == ["w", "b"] and np.array_equal(arrays[1], _weights(4)[1])
        with pytest.raises(SealError, match="is sealed"):
            load_model_file(out)
        plain, _, sealed = store.export_model(tmp_path / "plain.npz", plaintext=True)
        assert not sealed and load_model_file(plain)[0] == ["w", "b"]


def _full_disk_after_half(monkeypatch: pytest.MonkeyPatch, marker: str) -> list[str]:
    """Make os.write to any file whose path holds ``marker`` write half its data, then fail
    with ENOSPC, as a disk filling up mid-file does. Returns the paths it failed."""
    real_write = os.write
    failed: list[str] = []

    def write(fd: int, data: Any) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if marker not in target:
            return real_write(fd, data)
        if target in failed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        failed.append(target)
        return real_write(fd, bytes(data[: max(1, len(data) // 2)]))

    monkeypatch.setattr(os, "write", write)
    return failed


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="maps a file descriptor to its path via /proc"
)


@needs_proc
def test_a_full_disk_mid_checkpoint_leaves_the_previous_one_intact(
    tmp_path: Path, file_key: SealKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(tmp_path, file_key) as store:
        store.save_checkpoint(1, ["w", "b"], _weights(1), {"m": _weights(11)})
        before = sorted(p.name for p in store.models_dir.iterdir())
        failed = _full_disk_after_half(monkeypatch, "/models/.round-00002.strategy")
        with pytest.raises(CheckpointWriteError) as e:
            store.save_checkpoint(2, ["w", "b"], _weights(2), {"m": _weights(12)})
        monkeypatch.undo()
        assert failed, "the strategy file was never written"
        msg = str(e.value)
        assert "no space left on the device" in msg and "round-00002.strategy.sealed" in msg
        assert "Fix: free space on the disk holding" in msg and "round 1 is intact" in msg
        # No half-written temp file, and not the complete model file of round 2 either.
        assert sorted(p.name for p in store.models_dir.iterdir()) == before
        got = store.latest_checkpoint()
        assert got is not None and got.round == 1
        assert np.array_equal(got.weights[0], _weights(1)[0])


# --- a real coordinator -----------------------------------------------------------------------


def _run_federation(fed: Federation, timeout: float = 180) -> list[int]:
    with running_coordinator(fed) as (_coordinator, codes):
        agents = [
            fed.agent(name, i, 2, app=offset_app()) for i, name in enumerate(("site-1", "site-2"))
        ]
        for agent in agents:
            fed.start_agent(agent, max_attempts=3)
        wait_for(lambda: codes, timeout, "the coordinator to end")
        for agent in agents:
            agent.stop()
        for t in fed.threads:
            t.join(timeout=20)
    return codes


@pytest.mark.slow
def test_a_sealed_federation_resumes_and_refuses_a_flipped_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_federation(tmp_path)
    key = create_key_file(tmp_path / "keys" / "seal.key")
    fed.doc["server"]["seal_key_file"] = "keys/seal.key"
    assert _run_federation(fed) == [0], fed.errors
    models = tmp_path / "state" / "models"
    assert sorted(p.name for p in models.iterdir()) == [f"round-0000{r}.sealed" for r in range(3)]
    with Store(tmp_path / "state", key) as store:
        checkpoint = store.latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == 2
    for f in models.iterdir():
        blob = f.read_bytes()
        assert is_sealed(blob) and b"__names__" not in blob
        for w in checkpoint.weights:
            if w.nbytes >= 16:
                assert w.tobytes()[:64] not in blob
    # A restarted coordinator unseals the latest checkpoint and resumes after it.
    restarted = Coordinator(fed.config())
    try:
        assert restarted.next_round == 3
        assert all(
            np.array_equal(a, b) for a, b in zip(restarted.weights, checkpoint.weights, strict=True)
        )
    finally:
        restarted.shutdown()
    latest = models / "round-00002.sealed"
    blob = bytearray(latest.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    latest.write_bytes(bytes(blob))
    with pytest.raises(SealError, match="failed authentication") as e:
        Coordinator(fed.config())
    assert str(latest) in str(e.value)
    # The command line says the same in one line, with no traceback.
    code = main(["coordinator", "export", "--config", str(fed.toml), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and str(latest) in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


@needs_proc
@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_stops_the_coordinator_resumably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = make_federation(tmp_path)
    _full_disk_after_half(monkeypatch, "/models/.round-00002")
    assert _run_federation(fed) == [EXIT_STATE_UNWRITABLE], fed.errors
    monkeypatch.undo()
    models = tmp_path / "state" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["round-00000.npz", "round-00001.npz"]
    with Store(tmp_path / "state") as store:
        rounds = {(r.round, r.attempt): r for r in store.rounds()}
        failed = rounds[(2, 1)]
        assert failed.status == "failed" and sorted(failed.succeeded) == ["site-1", "site-2"]
        assert "no space left on the device" in failed.failures["checkpoint"]
        assert "round-00002.npz" in failed.failures["checkpoint"]
        (event,) = store.events("checkpoint_failed")
        assert event["round"] == 2 and "Fix: free space" in event["error"]
        checkpoint = store.latest_checkpoint()  # verifies its digest
        assert checkpoint is not None and checkpoint.round == 1
    restarted = Coordinator(fed.config())
    try:
        assert restarted.next_round == 2
    finally:
        restarted.shutdown()


class _RecordingMeter(TrafficMeter):
    """The coordinator's traffic meter, keeping every message's bytes (both directions)."""

    seen: ClassVar[list[bytes]] = []

    def deserializer(self, method: str, parse: Any) -> Callable[[bytes], Any]:
        inner = super().deserializer(method, parse)

        def keep(data: bytes) -> Any:
            self.seen.append(bytes(data))
            return inner(data)

        return keep

    def serializer(self, method: str, serialize: Any) -> Callable[[Any], bytes]:
        inner = super().serializer(method, serialize)

        def keep(message: Any) -> bytes:
            data = inner(message)
            self.seen.append(bytes(data))
            return data

        return keep


@pytest.mark.slow
def test_the_site_secret_never_leaves_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "bank"
    site.mkdir()
    secret = bytes(b | 0x80 for b in os.urandom(32))  # no whitespace: read back unchanged
    (site / "site-secret.key").write_bytes(secret)
    (site / "site-secret.key").chmod(0o600)
    (site / "deid.toml").write_text(
        'secret_file = "site-secret.key"\n[k_anonymity]\nk = 2\nmax_suppression = 0.2\n'
        '[columns]\nID = { role = "direct", action = "pseudonym", domain = "customer" }\n'
        'AGE = { role = "quasi", generalize = "band", width = 10 }\nSEX = "quasi"\n'
        'default = "sensitive"\nX = "keep"\n'
    )
    rng = random.Random(0)
    rows = [
        f"{100000 + i},{rng.randint(20, 70)},{rng.choice([1, 2])},{rng.choice([0, 1])},"
        f"{rng.random():.3f}"
        for i in range(200)
    ]
    (site / "raw.csv").write_text("ID,AGE,SEX,default,X\n" + "\n".join(rows) + "\n")
    fed = make_federation(tmp_path, sites=("bank-a",), rounds=1, min_sites=1)
    doc = fed.site_doc(0, 1)
    doc["state_dir"] = str(site / "state")
    doc["deid"] = {
        "config": str(site / "deid.toml"),
        "input": str(site / "raw.csv"),
        "output": str(site / "private" / "clean.csv"),
    }
    agent = SiteAgent(load_kit(fed.kit("bank-a")), validate_site_config(doc), app=offset_app())
    monkeypatch.setattr(_RecordingMeter, "seen", [])
    monkeypatch.setattr(coordinator_module, "TrafficMeter", _RecordingMeter)
    with running_coordinator(fed) as (_coordinator, codes):
        fed.start_agent(agent, max_attempts=3)
        wait_for(lambda: codes, 120, "the round to finish")
        agent.stop()
        for t in fed.threads:
            t.join(timeout=20)
    assert codes == [0] and not fed.errors, fed.errors
    assert agent.deid_report["k"] >= 2  # the secret was used: IDs became pseudonyms
    assert "100000" not in (site / "private" / "clean.csv").read_text()
    forms = [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret)[:40]]
    wire = _RecordingMeter.seen
    assert len(wire) > 10 and sum(map(len, wire)) > 10_000  # the round's traffic was recorded
    stream = b"".join(wire)
    for form in forms:
        assert form not in stream
    state_files = [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
    assert any(p.name == "state.db" for p in state_files)
    for p in state_files:
        content = p.read_bytes()
        for form in forms:
            assert form not in content, p


# --- durable SQLite and private keys ----------------------------------------------------------


def test_every_sqlite_connection_is_wal_with_full_sync(tmp_path: Path) -> None:
    opened = [
        Store(tmp_path / "coordinator"),
        PrivacyLedger(tmp_path / "ledger.db", site="bank-a"),
        AuditLog(tmp_path / "audit.db"),
    ]
    try:
        for db in opened:
            assert db._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal", db
            assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 2, db  # FULL
    finally:
        for db in opened:
            db.close()
    # Those are the only writers: every other sqlite3.connect in the package is the
    # report's read-only snapshot of evidence (and reads of that private copy).
    calls: dict[str, int] = {}
    for path in sorted((ROOT / "confide").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "sqlite3"
            ):
                rel = path.relative_to(ROOT).as_posix()
                calls[rel] = calls.get(rel, 0) + 1
    assert calls == {"confide/db.py": 1, "confide/privacy/report.py": 4}


def test_private_keys_written_by_confide_pki_are_0600_in_0700_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(pki), "--federation", "fed"]) == 0
    assert main(["pki", "issue", "--dir", str(pki), "--identity", "bank-a", "--role", "site"]) == 0
    out = tmp_path / "kits" / "auditor-1"
    assert (
        main(
            [
                "pki",
                "issue",
                "--dir",
                str(pki),
                "--identity",
                "auditor-1",
                "--role",
                "auditor",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    keys = [
        pki / "ca.key",
        pki / "coordinator" / "coordinator.key",
        *pki.rglob("bank-a.key"),
        out / "auditor-1.key",
    ]
    assert len(keys) == 4
    for key in keys:
        assert key.is_file() and _mode(key) == 0o600, key
        assert _mode(key.parent) == 0o700, key.parent
    assert _mode(pki) == 0o700
    assert main(["coordinator", "seal-key", "--out", str(tmp_path / "keys" / "seal.key")]) == 0
    assert _mode(tmp_path / "keys" / "seal.key") == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    assert "written to" in capsys.readouterr().out
    assert main(["coordinator", "seal-key", "--out", str(tmp_path / "keys" / "seal.key")]) == 2
