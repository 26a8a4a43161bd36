"""Signed updates and typed refusals: a replayed, forged, misdirected or bad update is
refused with its reason, and the round carries on with the other sites."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import blake3
import grpc
import numpy as np
import pytest
from federation_helpers import Federation, make_federation, offset_app, running_coordinator
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st

from confide import wire
from confide.client.agent import SiteAgent, validate_site_config
from confide.privacy.audit import AuditLog
from confide.privacy.crypto import (
    Kit,
    SignatureInvalid,
    StatementInvalid,
    UpdateSigner,
    UpdateStatement,
    init_ca,
    issue,
    load_kit,
    sign_update,
    verify_update,
)
from confide.privacy.crypto.signing import DOMAIN, RECORD_KEYS
from confide.privacy.dp import federated as dpfed
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient
from confide.server.integrity import NonceStore, check_client_clip, check_signed, clip_limit
from confide.server.rounds import Reason, Rejected
from confide.server.store import Store
from confide.wire import Payload, WireError, decode, frames

MB = 1 << 20
FIELDS = ("federation", "round", "task_id", "site", "nonce", "manifest_sha256", "data_digest")
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "federation": st.text(max_size=24),
    "round": st.integers(0, 2**63 - 1),
    "task_id": st.text(max_size=24),
    "site": st.text(max_size=24),
    "nonce": st.binary(min_size=16, max_size=16),
    "manifest_sha256": st.binary(min_size=32, max_size=32),
    "data_digest": st.binary(min_size=32, max_size=32),
}
STATEMENTS = st.builds(UpdateStatement, **VALUES)


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Kit]:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "pki", "testfed")
    return {n: load_kit(issue(root / "pki", n, "site")) for n in ("site-a", "site-b")}


def _statement(**changes: Any) -> UpdateStatement:
    base = UpdateStatement(
        "testfed", 3, "r3-train-7", "site-a", b"\x01" * 16, b"\x02" * 32, b"\x03" * 32
    )
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- sign / verify


@settings(max_examples=60, deadline=None)
@given(statement=STATEMENTS, field=st.sampled_from(FIELDS), data=st.data())
def test_any_changed_statement_field_fails_verification(
    kits: dict[str, Kit], statement: UpdateStatement, field: str, data: st.DataObject
) -> None:
    kit = kits["site-a"]
    cert = kit.certificate.read_bytes()
    signature = sign_update(kit, statement)
    verify_update(cert, statement, signature)
    other = data.draw(VALUES[field].filter(lambda v: v != getattr(statement, field)))
    with pytest.raises(SignatureInvalid):
        verify_update(cert, dataclasses.replace(statement, **{field: other}), signature)


@settings(max_examples=200, deadline=None)
@given(a=STATEMENTS, b=STATEMENTS)
def test_canonical_encoding_is_injective(a: UpdateStatement, b: UpdateStatement) -> None:
    assert (a.canonical() == b.canonical()) == (a == b)


def test_canonical_encoding_is_domain_separated_and_length_prefixed() -> None:
    data = _statement().canonical()
    assert data[:4] == len(DOMAIN).to_bytes(4, "big") and data[4 : 4 + len(DOMAIN)] == DOMAIN
    # Moving a character from one field to the next changes the bytes signed.
    shifted = _statement(federation="testfe", task_id="dr3-train-7")
    assert shifted.canonical() != data


def test_another_sites_key_does_not_verify(kits: dict[str, Kit]) -> None:
    statement = _statement()
    signature = sign_update(kits["site-b"], statement)
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify_update(kits["site-a"].certificate.read_bytes(), statement, signature)
    with pytest.raises(SignatureInvalid, match="no signature"):
        verify_update(kits["site-a"].certificate.read_bytes(), statement, b"")
    # A PEM private key works as well as a kit.
    pem = kits["site-b"].private_key.read_bytes()
    verify_update(kits["site-b"].certificate.read_bytes(), statement, sign_update(pem, statement))


@pytest.mark.parametrize(
    "changes",
    [
        {"nonce": b"\x01" * 15},
        {"data_digest": b"\x00" * 31},
        {"manifest_sha256": "x" * 32},
        {"round": -1},
        {"round": True},
        {"site": "s" * 2000},
        {"federation": 7},
    ],
)
def test_malformed_statements_are_refused_on_construction(changes: dict[str, Any]) -> None:
    with pytest.raises(StatementInvalid):
        _statement(**changes)


def test_statement_from_record_names_what_is_missing() -> None:
    signer = UpdateSigner(b"", federation="f", round=1, task_id="t", site="s")
    record = dict(signer.record)
    digests = {"task_id": "t", "manifest_sha256": b"\x00" * 32, "data_digest": b"\x00" * 32}
    assert UpdateStatement.from_record(record, **digests) == signer.statement(
        b"\x00" * 32, b"\x00" * 32
    )
    del record["confide.nonce"]
    with pytest.raises(StatementInvalid, match=r"confide\.nonce"):
        UpdateStatement.from_record(record, **digests)
    with pytest.raises(StatementInvalid, match="integer"):
        UpdateStatement.from_record({**signer.record, "confide.round": "1"}, **digests)


# --------------------------------------------------------------------------- the stream


def _payload() -> Payload:
    arrays = [np.arange(300_000, dtype=np.float32), np.ones((3, 4), np.float32)]
    return Payload("r1-train-1", ["w", "b"], arrays, {wire.NUM_EXAMPLES: 5}, {"lr": 0.1})


def _signer(kit: Kit, **changes: Any) -> UpdateSigner:
    fields = {"federation": "testfed", "round": 1, "task_id": "r1-train-1", "site": kit.identity}
    return UpdateSigner(kit, **{**fields, **changes})


def test_a_signed_stream_carries_its_statement_and_ends_with_the_signature(
    kits: dict[str, Kit],
) -> None:
    kit = kits["site-a"]
    signer = _signer(kit)
    stream = list(frames(_payload(), 256 * 1024, signer=signer))
    assert pb.Chunk.FromString(stream[-2]).WhichOneof("part") == "digest"
    assert pb.Chunk.FromString(stream[-1]).WhichOneof("part") == "signature"
    got = decode(stream, max_bytes=16 * MB)
    head = pb.Chunk.FromString(stream[0]).manifest
    canonical = head.SerializeToString(deterministic=True)  # map keys sorted
    assert got.manifest_sha256 == hashlib.sha256(canonical).digest()
    assert got.data_digest == pb.Chunk.FromString(stream[-2]).digest
    assert {k: got.config[k] for k in RECORD_KEYS} == signer.record
    statement = UpdateStatement.from_record(
        got.config,
        task_id=got.task_id,
        manifest_sha256=got.manifest_sha256,
        data_digest=got.data_digest,
    )
    verify_update(kit.certificate.read_bytes(), statement, got.signature)
    # The same stream as protobuf messages (a peer on the generated stubs) decodes the same.
    as_messages = decode(
        [pb.Chunk.FromString(f) for f in stream], max_bytes=16 * MB
    ).manifest_sha256
    assert as_messages == got.manifest_sha256
    unsigned = decode(frames(_payload(), 256 * 1024), max_bytes=16 * MB)
    assert unsigned.signature == b"" and not set(RECORD_KEYS) & set(unsigned.config)


def test_a_signature_out_of_place_breaks_the_wire_contract(kits: dict[str, Kit]) -> None:
    stream = list(frames(_payload(), 256 * 1024, signer=_signer(kits["site-a"])))
    sig = stream[-1]
    with pytest.raises(WireError, match="before the digest"):
        decode([*stream[:-2], sig, stream[-2]], max_bytes=16 * MB)
    with pytest.raises(WireError, match="after the signature"):
        decode([*stream, sig], max_bytes=16 * MB)
    with pytest.raises(WireError, match="a signature of 600 bytes"):
        long = pb.Chunk(signature=b"s" * 600).SerializeToString()
        decode([*stream[:-1], long], max_bytes=16 * MB)


# --------------------------------------------------------------------------- the checks


class _Nonces:
    def __init__(self) -> None:
        self.seen: set[tuple[str, bytes]] = set()

    def claim_nonce(self, site_id: str, nonce: bytes, rnd: int) -> bool:
        if (site_id, nonce) in self.seen:
            return False
        self.seen.add((site_id, nonce))
        return True


def _checked(stream: list[bytes], kit: Kit, nonces: NonceStore, rnd: int = 1) -> Reason | None:
    payload = decode(stream, max_bytes=16 * MB)
    try:
        check_signed(
            payload,
            site=kit.identity,
            certificate=kit.certificate.read_bytes(),
            federation="testfed",
            current_round=rnd,
            nonces=nonces,
        )
    except Rejected as e:
        return e.reason
    assert not set(RECORD_KEYS) & set(payload.config)  # reserved entries removed
    return None


def test_check_signed_refuses_each_forgery_with_its_reason(kits: dict[str, Kit]) -> None:
    a, b = kits["site-a"], kits["site-b"]
    nonces = _Nonces()

    def stream(signer: UpdateSigner | None) -> list[bytes]:
        return list(frames(_payload(), 256 * 1024, signer=signer))

    good = stream(_signer(a))
    assert _checked(good, a, nonces) is None
    assert _checked(good, a, nonces) is Reason.REPLAYED
    assert _checked(stream(_signer(a)), a, nonces, rnd=2) is Reason.WRONG_ROUND
    assert _checked(stream(_signer(a, federation="otherfed")), a, nonces) is (
        Reason.WRONG_FEDERATION
    )
    assert _checked(stream(_signer(a, site="site-b")), a, nonces) is Reason.WRONG_SITE
    assert _checked(stream(dataclasses.replace(_signer(a), key=b)), a, nonces) is (
        Reason.BAD_SIGNATURE
    )
    assert _checked(stream(None), a, nonces) is Reason.UNSIGNED
    no_nonce = stream(_signer(a))
    manifest = pb.Chunk.FromString(no_nonce[0])
    del manifest.manifest.config["confide.nonce"]
    assert _checked([manifest.SerializeToString(), *no_nonce[1:]], a, nonces) is Reason.UNSIGNED
    assert _checked(_retampered(stream(_signer(a))), a, nonces) is Reason.BAD_SIGNATURE
    assert _checked(_more_examples(stream(_signer(a))), a, nonces) is Reason.BAD_SIGNATURE


def _data(stream: list[bytes]) -> bytes:
    return b"".join(pb.Chunk.FromString(f).data for f in stream[1:-2])


def _flipped(stream: list[bytes]) -> list[bytes]:
    """A flipped bit in the last data byte, the digest left as sent."""
    last = bytearray(stream[-3])
    last[-1] ^= 0x01
    return [*stream[:-3], bytes(last), *stream[-2:]]


def _retampered(stream: list[bytes]) -> list[bytes]:
    """A flipped data bit with the digest recomputed to match: only the signature can tell."""
    out = _flipped(stream)
    digest = pb.Chunk(digest=blake3.blake3(_data(out)).digest()).SerializeToString()
    return [*out[:-2], digest, out[-1]]


def _more_examples(stream: list[bytes]) -> list[bytes]:
    """The manifest's num-examples raised after signing (a site inflating its weight)."""
    head = pb.Chunk.FromString(stream[0])
    head.manifest.metrics[wire.NUM_EXAMPLES].int_value = 10**6
    return [head.SerializeToString(), *stream[1:]]


def test_seen_nonces_survive_a_restart_and_old_rounds_are_pruned(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        assert store.claim_nonce("site-a", b"n" * 16, 4)
        assert store.claim_nonce("site-b", b"n" * 16, 4)  # nonces are per site
        assert store.claim_nonce("site-a", b"m" * 16, 3)
    with Store(tmp_path) as store:
        assert not store.claim_nonce("site-a", b"n" * 16, 4)
        assert store.prune_nonces(4) == 1
        assert store.claim_nonce("site-a", b"m" * 16, 4)
        assert not store.claim_nonce("site-a", b"n" * 16, 4)


def test_a_copy_sent_after_a_coordinator_restart_is_refused_as_replayed(
    tmp_path: Path, kits: dict[str, Kit]
) -> None:
    # After a restart the round re-runs and task ids start again at 1: only the nonce
    # store tells the copy from a fresh upload.
    kit = kits["site-a"]
    stream = list(frames(_payload(), 256 * 1024, signer=_signer(kit)))

    with Store(tmp_path) as store:
        assert _checked(stream, kit, store) is None
    with Store(tmp_path) as store:
        assert _checked(stream, kit, store) is Reason.REPLAYED


def test_clip_bound_admits_a_clipped_update_and_refuses_a_larger_one() -> None:
    rng = np.random.default_rng(0)
    model = [rng.normal(size=(300, 20)).astype(np.float32), np.array(5, np.int64)]
    config: dict[str, wire.ScalarValue] = {dpfed.CLIENT_CLIP: 0.5}
    direction = rng.normal(size=(300, 20))
    for norm, refused in ((0.5, False), (0.499, False), (0.51, True)):
        delta = direction / np.linalg.norm(direction) * norm
        sent = [(model[0] + delta).astype(np.float32), np.array(9, np.int64)]
        if refused:
            with pytest.raises(Rejected) as e:
                check_client_clip(config, sent, model)
            assert e.value.reason is Reason.NORM_ABOVE_CLIP
        else:
            check_client_clip(config, sent, model)
    check_client_clip({}, [model[0] + 100, model[1]], model)  # no client DP: no bound
    # Distributed noise: the site's own share widens the bound by its tail.
    distributed = {
        dpfed.CLIENT_CLIP: 0.5,
        dpfed.CLIENT_MODE: "distributed",
        dpfed.CLIENT_NOISE: 1.0,
        dpfed.CLIENT_MIN_SURVIVORS: 4,
    }
    share = rng.normal(0.0, 1.0 * 0.5 / 2, size=(300, 20))
    check_client_clip(distributed, [(model[0] + share).astype(np.float32), model[1]], model)
    bound = clip_limit(distributed, 0.0, 6000)
    assert bound is not None and 0.25 * np.sqrt(6000) < bound < 0.25 * np.sqrt(6000) + 3


# --------------------------------------------------------------------------- a federation


class RawSite:
    """A site driven by hand over its kit's mutual TLS: joins, takes tasks, sends streams."""

    def __init__(self, fed: Federation, name: str, **capabilities: str) -> None:
        self.kit = load_kit(fed.kit(name))
        self.channel = grpc.secure_channel(
            fed.address, self.kit.channel_credentials(), options=[("grpc.enable_http_proxy", 0)]
        )
        self.stub = CoordinatorClient(self.channel)
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=capabilities)
        self.session = self.stub.Join(request, timeout=10).session_id

    def task(self, kind: int = pb.Task.TRAIN, polls: int = 90) -> pb.Task:
        for _ in range(polls):  # bounded: each poll waits at most server.max_poll_seconds
            task = self.stub.PullTask(
                pb.PullTaskRequest(session_id=self.session, wait_seconds=1), timeout=10
            )
            if task.kind == kind:
                return task
            assert task.kind == pb.Task.WAIT, task
        raise AssertionError(f"{self.kit.identity}: no task of kind {kind} came")

    def model(self, task: pb.Task) -> Payload:
        request = pb.DownloadModelRequest(session_id=self.session, model_id=task.model_id)
        return decode(self.stub.DownloadModel(request, timeout=30), max_bytes=1 << 30)

    def signed(self, payload: Payload, rnd: int, **changes: Any) -> list[bytes]:
        fields = {
            "federation": self.kit.federation,
            "round": rnd,
            "task_id": payload.task_id,
            "site": self.kit.identity,
        }
        key = changes.pop("key", self.kit)
        signer = UpdateSigner(key, **{**fields, **changes})
        return list(frames(payload, 64 * 1024, signer=signer))

    def send(self, stream: list[bytes]) -> pb.UploadReply:
        reply: pb.UploadReply = self.stub.UploadResult(iter(stream), timeout=30)
        return reply

    def refused(self, stream: list[bytes]) -> str:
        """The reason code of a refused upload."""
        reply = self.send(stream)
        assert not reply.accepted, "the upload was accepted"
        return reply.reason.split(":", 1)[0]

    def close(self) -> None:
        self.channel.close()


def _update(task: pb.Task, model: Payload, **metrics: wire.ScalarValue) -> Payload:
    """An honest-looking training result: the model itself, with 10 examples."""
    return Payload(
        task.task_id, model.names, list(model.arrays), {wire.NUM_EXAMPLES: 10, **metrics}
    )


def _bad(kind: str, task: pb.Task, model: Payload) -> Payload:
    p = _update(task, model)
    if kind == "shape":
        p.arrays[0] = np.zeros((*p.arrays[0].shape[:-1], p.arrays[0].shape[-1] + 1), np.float32)
    elif kind == "dtype":
        p.arrays[0] = p.arrays[0].astype(np.int32)
    elif kind in ("nan", "inf"):
        p.arrays[1] = p.arrays[1].copy()
        p.arrays[1].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "metrics":
        p.metrics = {wire.NUM_EXAMPLES: -3}
    return p


def _wait(codes: list[int], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not codes and time.monotonic() < end:
        time.sleep(0.2)
    assert codes, "the federation did not finish in time"


def _start_agents(fed: Federation, names: tuple[str, ...], app: ClientApp) -> None:
    for i, name in enumerate(names):
        fed.start_agent(fed.agent(name, i, len(names), app=app))


ROGUES = ("rogue-a", "rogue-b", "rogue-c")


@pytest.mark.slow
def test_replays_forgeries_and_bad_updates_are_refused_and_rounds_complete(
    tmp_path: Path,
) -> None:
    agents = ("site-1", "site-2")
    names = (*agents, "rogue-s", *ROGUES)
    fed = make_federation(
        tmp_path, sites=names, rounds=2, min_sites=2, expected=len(names), deadline=60
    )
    fed.doc["evaluation"] = {"fraction": 0.0}
    fed.doc["server"]["site_timeout_seconds"] = 60  # the test thread drives four sites in turn
    seen: dict[str, list[str]] = {}
    with running_coordinator(fed) as (_coordinator, codes):
        s = RawSite(fed, "rogue-s")
        rogues = {n: RawSite(fed, n) for n in ROGUES}
        _start_agents(fed, agents, offset_app())
        try:
            # Round 1: forgeries under probe task ids (refused before any task is looked
            # up, so the rogue's own task stays open and the phase with it).
            t1 = s.task()
            m1 = s.model(t1)
            probe = dataclasses.replace(_update(t1, m1), task_id="r1-probe")
            other = load_kit(fed.kit("site-1"))
            seen["r1"] = [
                s.refused(list(frames(probe, 64 * 1024))),  # unsigned
                s.refused(s.signed(probe, 1, key=other)),  # another site's key
                s.refused(s.signed(probe, 1, site="site-1")),  # another site's id
                s.refused(s.signed(probe, 1, federation="otherfed")),
                s.refused(_flipped(s.signed(probe, 1))),  # the digest catches it
                s.refused(_retampered(s.signed(probe, 1))),  # the signature catches it
                s.refused(_more_examples(s.signed(probe, 1))),  # manifest altered
            ]
            v1 = s.signed(probe, 1)
            seen["r1"] += [s.refused(v1), s.refused(v1)]  # unknown task, then a replay
            for kind, name in zip(("shape", "dtype", "nan"), ROGUES, strict=True):
                r = rogues[name]
                t = r.task()
                seen.setdefault(name, []).append(r.refused(r.signed(_bad(kind, t, r.model(t)), 1)))
            u1 = s.signed(_update(t1, m1), 1)
            assert s.send(u1).accepted
            # Round 2: the captured round-1 upload is refused, the round goes on.
            t2 = s.task()
            m2 = s.model(t2)
            seen["r2"] = [s.refused(u1)]
            for kind, name in zip(("inf", "metrics", None), ROGUES, strict=True):
                r = rogues[name]
                t = r.task()
                p = _update(t, r.model(t)) if kind is None else _bad(kind, t, r.model(t))
                if kind is None:
                    assert r.send(r.signed(p, 2)).accepted
                else:
                    seen[name].append(r.refused(r.signed(p, 2)))
            u2 = s.signed(_update(t2, m2), 2)
            assert s.send(u2).accepted
            _wait(codes)
            seen["r2"].append(s.refused(u2))  # a second copy of an accepted upload
        finally:
            for r in (s, *rogues.values()):
                r.close()
        for t in fed.threads:
            t.join(timeout=20)
    assert codes == [0], fed.errors
    assert not fed.errors
    assert seen["r1"] == [
        "UNSIGNED",
        "BAD_SIGNATURE",
        "WRONG_SITE",
        "WRONG_FEDERATION",
        "MALFORMED",
        "BAD_SIGNATURE",
        "BAD_SIGNATURE",
        "UNKNOWN_TASK",
        "REPLAYED",
    ]
    assert seen["r2"] == ["WRONG_ROUND", "REPLAYED"]
    assert seen["rogue-a"] == ["WRONG_SHAPE", "NOT_FINITE"]
    assert seen["rogue-b"] == ["WRONG_DTYPE", "BAD_METRICS"]
    assert seen["rogue-c"] == ["NOT_FINITE"]
    with Store(tmp_path / "state") as store:
        rows = {r.round: r for r in store.rounds() if r.status == "ok"}
        rejected = [e["code"] for e in store.events("rejected")]
    assert sorted(rows) == [1, 2]
    assert rows[1].succeeded == ["rogue-s", "site-1", "site-2"]
    assert {k: v.split(":")[0] for k, v in rows[1].failures.items()} == {
        "rogue-a": "WRONG_SHAPE",
        "rogue-b": "WRONG_DTYPE",
        "rogue-c": "NOT_FINITE",
    }
    assert rows[2].succeeded == ["rogue-c", "rogue-s", "site-1", "site-2"]
    assert sorted(rejected) == sorted(
        [*seen["r1"], *seen["r2"], *seen["rogue-a"], *seen["rogue-b"], *seen["rogue-c"]]
    )
    with AuditLog(tmp_path / "state" / "audit.db") as log:
        audited = [
            json.loads(e.payload_json)["code"] for e in log.entries() if e.kind == "update_refused"
        ]
    assert sorted(audited) == sorted(
        c
        for c in [*seen["r1"], *seen["r2"]]
        if c not in ("MALFORMED", "UNKNOWN_TASK")  # not forgeries: not on the signed record
    )


@pytest.mark.slow
def test_an_upload_sent_to_another_federations_coordinator_is_refused(tmp_path: Path) -> None:
    home = make_federation(tmp_path / "home", sites=("site-1",), rounds=1, min_sites=1)
    other = make_federation(tmp_path / "other", sites=("site-1",), rounds=1, min_sites=1)
    kit = load_kit(home.kit("site-1"))
    upload = Payload("r1-train-1", ["w"], [np.ones(8, np.float32)], {wire.NUM_EXAMPLES: 3})
    signer = UpdateSigner(
        kit, federation=kit.federation, round=1, task_id="r1-train-1", site="site-1"
    )
    stream = list(frames(upload, signer=signer))
    with running_coordinator(other):
        # With the home kit, the other federation's CA does not even let it connect.
        with grpc.secure_channel(
            other.address, kit.channel_credentials(), options=[("grpc.enable_http_proxy", 0)]
        ) as ch:
            with pytest.raises(grpc.RpcError) as e:
                CoordinatorClient(ch).UploadResult(iter(stream), timeout=10)
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # The same site enrolled there too: its key there is not the one that signed.
        site = RawSite(other, "site-1")
        try:
            assert site.refused(stream) == "BAD_SIGNATURE"
        finally:
            site.close()


def _too_far_app() -> ClientApp:
    """Moves every floating parameter by 0.05: far beyond a clip of 0.5 unless clipped."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        arrays = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
        out = [(a + np.float32(0.05)).astype(a.dtype) if a.dtype.kind == "f" else a for a in arrays]
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)

    return app


def _unclipped(agent: SiteAgent) -> SiteAgent:
    """A site that records its DP events but sends its update unclipped."""
    release = agent.privacy.release

    def cheat(plan: Any, model: Payload, payload: Payload) -> Any:
        sent, events = release(plan, model, payload)
        return dataclasses.replace(sent, arrays=list(payload.arrays)), events

    agent.privacy.release = cheat  # type: ignore[method-assign]
    return agent


@pytest.mark.slow
def test_an_update_above_the_client_clip_is_refused_and_the_round_completes(
    tmp_path: Path,
) -> None:
    names = ("site-1", "site-2", "site-3")
    fed = make_federation(tmp_path, sites=names, rounds=1, min_sites=2, expected=3)
    fed.doc["evaluation"] = {"fraction": 0.0}
    fed.doc["dp"] = {"delta": 1e-5, "client": {"noise_multiplier": 0.8, "clip_norm": 0.5}}
    agents = []
    for i, name in enumerate(names):
        doc = fed.site_doc(i, 3)
        doc["state_dir"] = str(tmp_path / f"{name}-state")
        doc["privacy"] = {"epsilon_max": 50.0, "delta": 1e-5}
        agent = SiteAgent(load_kit(fed.kit(name)), validate_site_config(doc), app=_too_far_app())
        agents.append(_unclipped(agent) if name == "site-3" else agent)
    with running_coordinator(fed) as (_coordinator, codes):
        for agent in agents:
            fed.start_agent(agent)
        _wait(codes)
        for t in fed.threads:
            t.join(timeout=20)
    assert codes == [0], fed.errors
    with Store(tmp_path / "state") as store:
        (row,) = [r for r in store.rounds() if r.round == 1]
    assert row.status == "ok"
    assert row.succeeded == ["site-1", "site-2"]
    assert row.failures["site-3"].startswith("NORM_ABOVE_CLIP")
