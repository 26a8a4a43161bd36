"""The audit log: a clean log verifies; every kind of tampering is found at its seq."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.errors import ConfideError
from confide.privacy.audit import (
    GENESIS_HASH,
    TABLE,
    AuditChainBroken,
    AuditInputError,
    AuditKey,
    AuditKeyError,
    AuditKeyPermissionsError,
    AuditLog,
    entry_hash,
    hash_input,
    key_id_of,
    load_public_key,
    trust_store,
    verify_entries,
)

COLS = "seq, time_us, actor, kind, payload, prev_hash, hash, key_id, signature"


@pytest.fixture
def coord_key(tmp_path: Path) -> AuditKey:
    return AuditKey.generate(tmp_path / "keys" / "coordinator.key")


@pytest.fixture
def site_key(tmp_path: Path) -> AuditKey:
    return AuditKey.generate(tmp_path / "keys" / "hospital-a.key")


@pytest.fixture
def trusted(coord_key: AuditKey, site_key: AuditKey) -> dict[str, Any]:
    return dict(trust_store(coord_key, site_key.public_key_pem))


@pytest.fixture
def log(tmp_path: Path, coord_key: AuditKey, site_key: AuditKey) -> Iterator[AuditLog]:
    """20 entries: the coordinator's and a site's, interleaved."""
    with AuditLog(tmp_path / "audit.db") as a:
        for i in range(1, 21):
            if i % 3 == 0:
                a.append("site:hospital-a", "dp_event", {"round": i, "epsilon": 0.1 * i}, site_key)
            else:
                a.append(
                    "coordinator", "round_started", {"round": i, "sites": ["a", "b"]}, coord_key
                )
        yield a


def raw_db(log: AuditLog) -> sqlite3.Connection:
    """What an attacker with write access to the file does: drop the guards, edit rows."""
    db = sqlite3.connect(log.path, isolation_level=None)
    db.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_update")
    db.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_delete")
    return db


def rows(db: sqlite3.Connection) -> list[list[Any]]:
    return [list(r) for r in db.execute(f"SELECT {COLS} FROM {TABLE} ORDER BY seq")]


def rewrite(db: sqlite3.Connection, new_rows: list[list[Any]]) -> None:
    db.execute("BEGIN")
    db.execute(f"DELETE FROM {TABLE}")
    db.executemany(f"INSERT INTO {TABLE} ({COLS}) VALUES (?,?,?,?,?,?,?,?,?)", new_rows)
    db.execute("COMMIT")


def rehash(r: list[Any]) -> str:
    return entry_hash(
        seq=r[0],
        time_us=r[1],
        actor=r[2],
        kind=r[3],
        payload_json=r[4],
        prev_hash=r[5],
        key_id=r[7],
    )


def rechain(rs: list[list[Any]], start: int = 0) -> None:
    """Recompute hashes and prev links from index ``start`` on, as an attacker can."""
    for i in range(start, len(rs)):
        rs[i][5] = rs[i - 1][6] if i else GENESIS_HASH
        rs[i][6] = rehash(rs[i])


def checks_at(report: Any) -> set[tuple[int, str]]:
    return {(p.seq, p.check) for p in report.problems}


# --------------------------------------------------------------------------- clean log


def test_clean_log_of_two_signers_verifies(log: AuditLog, trusted: dict[str, Any]) -> None:
    report = log.verify_or_raise(trusted)
    assert report.ok and report.entries_checked == 20 and not report.problems
    assert sorted(report.signers.values()) == [6, 14]
    assert report.head == log.head() == log.entries()[-1].hash
    assert [e.seq for e in log.entries()] == list(range(1, 21))
    assert log.entries()[0].prev_hash == GENESIS_HASH
    assert "OK" in report.summary()
    # reopening the file keeps the chain going
    path = log.path
    log.close()
    with AuditLog(path) as again:
        e = again.append(
            "coordinator",
            "round_started",
            {"round": 21},
            AuditKey.load(path.parent / "keys" / "coordinator.key"),
        )
        assert e.seq == 21 and again.verify(trusted).ok


def test_the_documented_encoding_is_what_is_hashed_and_signed(
    log: AuditLog, coord_key: AuditKey
) -> None:
    e = log.entries()[0]
    expected = (
        '{"actor":"coordinator","format":"confide-audit-1","key_id":"'
        + e.key_id
        + '","kind":"round_started","payload":"{\\"round\\":1,\\"sites\\":[\\"a\\",\\"b\\"]}",'
        + '"prev_hash":"'
        + "0" * 64
        + '","seq":1,"time_us":'
        + str(e.time_us)
        + "}"
    ).encode()
    fields = {k: getattr(e, k) for k in ("seq", "time_us", "actor", "kind", "prev_hash")}
    assert hash_input(payload_json=e.payload_json, key_id=e.key_id, **fields) == expected
    assert e.hash == hashlib.sha256(expected).hexdigest()
    coord_key.public_key.verify(bytes.fromhex(e.signature), bytes.fromhex(e.hash))
    raw = coord_key.public_key.public_bytes_raw()
    assert e.key_id == coord_key.key_id == hashlib.sha256(raw).hexdigest()
    assert e.payload == {"round": 1, "sites": ["a", "b"]}


def test_payload_is_canonical_and_non_ascii_survives(tmp_path: Path, coord_key: AuditKey) -> None:
    with AuditLog(tmp_path / "a.db") as a:
        e = a.append(
            "site:hôpital-é", "deid_report", {"z": 1, "a": "Zürich\n", "m": 1.0}, coord_key
        )
        assert e.payload_json == '{"a":"Zürich\\n","m":1.0,"z":1}'
        assert a.verify(trust_store(coord_key)).ok
        for bad in ([1, 2], {"x": float("nan")}, {"x": object()}, {1: "non-text key"}):
            with pytest.raises(AuditInputError, match="Fix:"):
                a.append("coordinator", "dp_event", bad, coord_key)  # type: ignore[arg-type]
        with pytest.raises(AuditInputError, match="actor"):
            a.append("", "dp_event", {}, coord_key)
        assert len(a) == 1


# --------------------------------------------------------------------------- edits


def test_edited_payload_is_detected_at_its_seq(log: AuditLog, trusted: dict[str, Any]) -> None:
    db = raw_db(log)
    db.execute(f"UPDATE {TABLE} SET payload = ? WHERE seq = 9", ('{"epsilon":0.01,"round":9}',))
    report = log.verify(trusted)
    assert not report.ok
    assert checks_at(report) == {(9, "hash"), (9, "signature")}
    with pytest.raises(AuditChainBroken, match=r"seq 9: .*edited.*Fix:") as err:
        log.verify_or_raise(trusted)
    assert err.value.report.first_bad_seq() == 9
    assert isinstance(err.value, ConfideError)


def test_edit_with_recomputed_chain_is_caught_by_the_signature(
    log: AuditLog, trusted: dict[str, Any]
) -> None:
    db = raw_db(log)
    rs = rows(db)
    rs[6][4] = '{"round":7,"sites":["a"]}'  # seq 7: drop a site from the round
    rechain(rs, start=6)
    rewrite(db, rs)
    report = log.verify(trusted)
    # the chain itself is consistent now; only the signatures give the edit away
    assert {c for _, c in checks_at(report)} == {"signature"}
    assert report.first_bad_seq() == 7
    assert {s for s, _ in checks_at(report)} == set(range(7, 21))
    assert report.head == log.head()


def test_edited_time_actor_or_kind_is_detected(log: AuditLog, trusted: dict[str, Any]) -> None:
    db = raw_db(log)
    db.execute(f"UPDATE {TABLE} SET time_us = time_us + 1 WHERE seq = 2")
    db.execute(f"UPDATE {TABLE} SET actor = 'coordinator' WHERE seq = 3")
    db.execute(f"UPDATE {TABLE} SET kind = 'budget_refused' WHERE seq = 4")
    report = log.verify(trusted)
    assert {s for s, c in checks_at(report) if c == "hash"} == {2, 3, 4}


# --------------------------------------------------------------------------- deletions


def test_deleted_middle_entry_is_detected(log: AuditLog, trusted: dict[str, Any]) -> None:
    raw_db(log).execute(f"DELETE FROM {TABLE} WHERE seq = 10")
    report = log.verify(trusted)
    assert (11, "seq") in checks_at(report) and (11, "prev_hash") in checks_at(report)
    assert report.first_bad_seq() == 11
    assert "deleted" in str(report.problems[0])


def test_deleted_tail_is_detected_only_against_a_published_head(
    log: AuditLog, trusted: dict[str, Any]
) -> None:
    published = log.head()  # e.g. the site mailed this hash to the auditor
    assert log.verify(trusted, expected_head=published).ok
    raw_db(log).execute(f"DELETE FROM {TABLE} WHERE seq > 17")
    # documented limit: a truncated chain is still a valid chain
    assert log.verify(trusted).ok
    report = log.verify(trusted, expected_head=published)
    assert checks_at(report) == {(18, "head")}
    assert "removed from the end" in report.problems[0].message
    # a head published earlier than the truncation point still matches
    assert log.verify(trusted, expected_head=log.entries()[9].hash).ok


def test_head_published_then_more_entries_appended_still_verifies(
    log: AuditLog, trusted: dict[str, Any], coord_key: AuditKey
) -> None:
    published = log.head()
    log.append("coordinator", "round_started", {"round": 21}, coord_key)
    assert log.verify(trusted, expected_head=published).ok
    assert AuditLog(log.path).verify(trusted, expected_head=GENESIS_HASH).ok


# --------------------------------------------------------------------------- reordering


def test_swapped_rows_are_detected(log: AuditLog, trusted: dict[str, Any]) -> None:
    db = raw_db(log)
    rs = rows(db)
    rs[4][1:], rs[5][1:] = rs[5][1:], rs[4][1:]  # contents of seq 5 and 6 swapped, seqs kept
    rewrite(db, rs)
    report = log.verify(trusted)
    assert {5, 6} <= {s for s, c in checks_at(report) if c == "hash"}
    assert (5, "prev_hash") in checks_at(report)


def test_swapped_seqs_are_detected(log: AuditLog, trusted: dict[str, Any]) -> None:
    db = raw_db(log)
    db.execute(f"UPDATE {TABLE} SET seq = -1 WHERE seq = 12")
    db.execute(f"UPDATE {TABLE} SET seq = 12 WHERE seq = 13")
    db.execute(f"UPDATE {TABLE} SET seq = 13 WHERE seq = -1")
    report = log.verify(trusted)
    assert {(12, "prev_hash"), (12, "hash"), (13, "hash")} <= checks_at(report)


# --------------------------------------------------------------------------- insertions


def _forged_row(prev: list[Any], key: AuditKey, seq: int) -> list[Any]:
    row = [
        seq,
        prev[1] + 1,
        "coordinator",
        "budget_refused",
        '{"site":"b"}',
        prev[6],
        "",
        key.key_id,
        "",
    ]
    row[6] = rehash(row)
    row[8] = key.sign(bytes.fromhex(row[6])).hex()
    return row


def test_inserted_entry_signed_by_an_unknown_key_is_detected(
    log: AuditLog, trusted: dict[str, Any], tmp_path: Path
) -> None:
    intruder = AuditKey.generate(tmp_path / "intruder.key")
    db = raw_db(log)
    rs = rows(db)
    forged = _forged_row(rs[7], intruder, 9)
    rs = [*rs[:8], forged, *rs[8:]]
    for i in range(9, len(rs)):
        rs[i][0] = i + 1  # shift the seqs after it
    rechain(rs, start=9)  # and recompute every later hash: only the signatures can't follow
    rewrite(db, rs)
    report = log.verify(trusted)
    assert (9, "signer") in checks_at(report)
    assert "not in the trust store" in str(report.problems[0])
    assert {s for s, c in checks_at(report) if c == "signature"} == set(range(10, 22))


def test_inserted_entry_signed_with_a_trusted_key_breaks_the_chain(
    log: AuditLog, trusted: dict[str, Any], coord_key: AuditKey
) -> None:
    db = raw_db(log)
    rs = rows(db)
    forged = _forged_row(rs[7], coord_key, 9)  # a stolen key: a perfectly signed entry ...
    rs = [*rs[:8], forged, *rs[8:]]
    for i in range(9, len(rs)):
        rs[i][0] = i + 1
    rewrite(db, rs)
    report = log.verify(trusted)
    # ... but the entry after it was chained to (and signed over) the original seq 9
    assert not any(s == 9 for s, _ in checks_at(report))
    assert {(10, "prev_hash"), (10, "hash"), (10, "signature")} <= checks_at(report)


def test_inserted_entry_without_renumbering_is_detected(
    log: AuditLog, trusted: dict[str, Any], coord_key: AuditKey
) -> None:
    entries = log.export()
    forged = dict(entries[4])
    entries.insert(5, forged)  # a duplicated (replayed) entry
    report = verify_entries(entries, trusted)
    assert {(5, "seq"), (5, "prev_hash")} <= checks_at(report)


# --------------------------------------------------------------------------- signers, keys


def test_unknown_signer_is_detected(log: AuditLog, coord_key: AuditKey) -> None:
    report = log.verify(trust_store(coord_key))  # the auditor lacks the site's key
    assert {s for s, c in checks_at(report) if c == "signer"} == {3, 6, 9, 12, 15, 18}


def test_a_site_key_cannot_write_as_the_coordinator(
    log: AuditLog, trusted: dict[str, Any], coord_key: AuditKey, site_key: AuditKey
) -> None:
    actors = {coord_key.key_id: {"coordinator"}, site_key.key_id: {"site:hospital-a"}}
    assert log.verify(trusted, actors=actors).ok
    log.append("coordinator", "budget_refused", {"site": "hospital-b"}, site_key)
    report = log.verify(trusted, actors=actors)
    assert checks_at(report) == {(21, "signer")}


def test_trust_store_must_be_keyed_by_key_id(coord_key: AuditKey, site_key: AuditKey) -> None:
    with pytest.raises(AuditKeyError, match="Fix:"):
        verify_entries([], {coord_key.key_id: site_key.public_key_pem})
    assert key_id_of(load_public_key(coord_key.public_key_pem)) == coord_key.key_id


def test_key_file_is_private_and_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k" / "coordinator.key"
    key = AuditKey.generate(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert not list(path.parent.glob(".*.tmp"))
    assert AuditKey.load(path).key_id == key.key_id
    assert AuditKey.load_or_generate(path).key_id == key.key_id
    with pytest.raises(AuditKeyError, match="already exists"):
        AuditKey.generate(path)
    os.chmod(path, 0o644)
    with pytest.raises(AuditKeyPermissionsError) as err:
        AuditKey.load(path)
    assert f"chmod 600 {path}" in str(err.value) and "0644" in str(err.value)
    assert isinstance(err.value, PermissionError)
    os.chmod(path, 0o400)  # stricter is fine
    AuditKey.load(path)


def test_non_ed25519_or_missing_key_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AuditKeyError, match=r"no such audit key file.*Fix:"):
        AuditKey.load(tmp_path / "nope.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(AuditKeyError, match="not an unencrypted PEM"):
        AuditKey.load(garbage)
    pub = tmp_path / "pub.pem"
    AuditKey(Ed25519PrivateKey.generate()).write_public_key(pub)
    with pytest.raises(AuditKeyError):
        load_public_key(b"junk")


def test_the_api_is_append_only(log: AuditLog, coord_key: AuditKey) -> None:
    public = {n for n in dir(AuditLog) if not n.startswith("_")}
    assert public == {"append", "close", "entries", "export", "head", "verify", "verify_or_raise"}
    # the file refuses edits through SQLite too, unless the attacker drops the triggers
    db = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute(f"UPDATE {TABLE} SET kind = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute(f"DELETE FROM {TABLE} WHERE seq = 1")
    db.close()


# --------------------------------------------------------------------------- export


def test_export_round_trip_verifies_and_edits_are_detected(
    log: AuditLog, trusted: dict[str, Any], tmp_path: Path, coord_key: AuditKey, site_key: AuditKey
) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(log.export(), ensure_ascii=False, indent=2))
    entries = json.loads(path.read_text())
    # the auditor's trust store: the published PEM files, nothing else
    pems = {k.key_id: k.public_key_pem for k in (coord_key, site_key)}
    assert verify_entries(entries, pems, expected_head=log.head()).ok

    # the payload kept only as an object (no payload_json) still verifies
    slim = [{k: v for k, v in e.items() if k not in ("payload_json", "time_us")} for e in entries]
    assert verify_entries(slim, pems).ok

    edited = json.loads(path.read_text())
    edited[4]["payload_json"] = edited[4]["payload_json"].replace('"round":5', '"round":50')
    edited[4]["payload"]["round"] = 50  # both copies edited consistently
    assert checks_at(verify_entries(edited, pems)) == {(5, "hash"), (5, "signature")}

    edited = json.loads(path.read_text())
    edited[4]["payload"]["round"] = 50  # the readable copy disagrees with the hashed text
    assert checks_at(verify_entries(edited, pems)) == {(5, "format")}

    edited = json.loads(path.read_text())
    edited[5]["time"] += 3600
    assert (6, "format") in checks_at(verify_entries(edited, pems))

    edited = json.loads(path.read_text())
    del edited[2]
    assert (4, "seq") in checks_at(verify_entries(edited, pems))

    edited = json.loads(path.read_text())
    edited[7], edited[8] = edited[8], edited[7]
    assert {(9, "seq"), (8, "seq")} <= checks_at(verify_entries(edited, pems))

    edited = json.loads(path.read_text())
    del edited[3]["signature"]
    edited[10] = "nonsense"
    report = verify_entries(edited, pems)
    assert {(4, "format"), (11, "format")} <= checks_at(report)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_appends_keep_one_chain(
    tmp_path: Path, coord_key: AuditKey, site_key: AuditKey, trusted: dict[str, Any]
) -> None:
    path = tmp_path / "busy.db"
    logs = [AuditLog(path), AuditLog(path)]  # two connections, as two processes would have
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        key = coord_key if n % 2 else site_key
        try:
            for i in range(25):
                logs[n % 2].append(f"writer-{n}", "dp_event", {"i": i, "n": n}, key)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = logs[0].verify_or_raise(trusted)
    assert report.entries_checked == 200
    assert [e.seq for e in logs[1].entries()] == list(range(1, 201))
    assert len({e.prev_hash for e in logs[0].entries()}) == 200  # no fork
    for a in logs:
        a.close()


def test_an_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("x" * 4096)
    with pytest.raises(ConfideError, match=r"cannot open the audit log.*Fix:"):
        AuditLog(not_a_db)


def test_the_audit_command_verifies_exports_and_detects_an_edit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from confide.cli import main

    key = AuditKey.generate(tmp_path / "site.key")
    with AuditLog(tmp_path / "audit.db") as log:
        for i in range(5):
            log.append("site:h1", "dp_event", {"round": i, "epsilon": 0.1 * i}, key)
        head = log.head()
    pub = tmp_path / "site.pub.pem"
    assert (
        main(["audit", "public-key", "--key", str(tmp_path / "site.key"), "--out", str(pub)]) == 0
    )
    db, js = str(tmp_path / "audit.db"), str(tmp_path / "audit.json")
    assert main(["audit", "verify", "--log", db, "--trust", str(pub), "--head", head]) == 0
    assert "audit log OK: 5 entries" in capsys.readouterr().out
    assert main(["audit", "export", "--log", db, "--out", js]) == 0
    assert main(["audit", "verify", "--log", js, "--trust", str(pub)]) == 0
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("UPDATE audit_entries SET payload = replace(payload, '0.2', '0.0')")
    conn.commit()
    conn.close()
    capsys.readouterr()
    assert main(["audit", "verify", "--log", db, "--trust", str(pub)]) == 1
    assert "BROKEN" in capsys.readouterr().out
