"""End to end over real loopback mutual TLS: a coordinator, real site agents, real certificates."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from federation_helpers import make_federation, running_coordinator, wait_for, wait_for_line

from confide.client.agent import CoordinatorUnreachable, SiteAgent, SiteRefused, load_app
from confide.privacy.crypto import init_ca, issue, load_kit, revoke
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.protos.v1 import coordinator_pb2_grpc as pb_grpc
from confide.server.coordinator import Coordinator
from confide.server.store import Store

pytestmark = pytest.mark.slow


def _join(address: str, creds: grpc.ChannelCredentials) -> pb.JoinReply:
    with grpc.secure_channel(address, creds, options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = pb_grpc.CoordinatorStub(ch)  # type: ignore[no-untyped-call]
        return stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=5)


def test_two_sites_two_rounds_accuracy_rises(tmp_path: Path) -> None:
    fed = make_federation(tmp_path)
    with running_coordinator(fed) as (_coordinator, codes):
        for i, name in enumerate(("site-1", "site-2")):
            fed.start_agent(fed.agent(name, i, 2))
        wait_for(lambda: codes, 240, "the federation to finish")
        for t in fed.threads:
            t.join(timeout=20)
    assert codes == [0], fed.errors
    assert not fed.errors
    history = json.loads((tmp_path / "state" / "history.json").read_text())
    rounds = {r["round"]: r for r in history["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["sites_succeeded"] == 2
    assert rounds[2]["eval_accuracy"] > rounds[0]["eval_accuracy"] + 0.3
    store = Store(tmp_path / "state")
    try:
        assert [(r.round, r.status) for r in store.rounds()] == [(0, "ok"), (1, "ok"), (2, "ok")]
        assert store.latest_checkpoint() is not None
        assert store.latest_checkpoint().round == 2  # type: ignore[union-attr]
        assert {s.site_id for s in store.sites()} == {"site-1", "site-2"}
    finally:
        store.close()
    # The agents stopped by themselves when the federation ended.
    assert all(not t.is_alive() for t in fed.threads)


def test_connections_without_a_federation_certificate_are_refused(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "a", others=(("auditor-1", "auditor"),), rounds=1, min_sites=1)
    other = tmp_path / "other"
    init_ca(other, "otherfed")
    issue(other, "site-1", "site", other / "kit")
    with running_coordinator(fed):
        ca = (fed.root / "pki" / "ca.crt").read_bytes()
        # No client certificate: the TLS handshake fails.
        with pytest.raises(grpc.RpcError) as no_cert:
            _join(fed.address, grpc.ssl_channel_credentials(root_certificates=ca))
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate from another CA: refused at the handshake too.
        foreign = load_kit(other / "kit")
        with pytest.raises(grpc.RpcError) as wrong_ca:
            _join(
                fed.address,
                grpc.ssl_channel_credentials(
                    root_certificates=ca,
                    private_key=foreign.private_key.read_bytes(),
                    certificate_chain=foreign.certificate.read_bytes(),
                ),
            )
        assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE
        # An auditor is a real member of the federation but may not join as a site.
        auditor = load_kit(fed.kit("auditor-1"))
        with pytest.raises(grpc.RpcError) as not_site:
            _join(fed.address, auditor.channel_credentials())
        assert not_site.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "auditor" in (not_site.value.details() or "")
        # The site kit of the federation gets in, identity read from its certificate.
        reply = _join(fed.address, load_kit(fed.kit("site-1")).channel_credentials())
        assert reply.site_id == "site-1" and reply.federation == "testfed"


def test_a_revoked_site_is_refused_at_join_and_on_its_next_call(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, rounds=1, min_sites=2)
    with running_coordinator(fed):
        creds = load_kit(fed.kit("site-2")).channel_credentials()
        with grpc.secure_channel(fed.address, creds) as ch:
            stub = pb_grpc.CoordinatorStub(ch)  # type: ignore[no-untyped-call]
            session = stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=5)
            revoke(fed.root / "pki", "site-2", reason="keyCompromise")
            with pytest.raises(grpc.RpcError) as call:
                stub.PullTask(pb.PullTaskRequest(session_id=session.session_id), timeout=5)
            assert call.value.code() == grpc.StatusCode.PERMISSION_DENIED
        agent = fed.agent("site-2", 1, 2)
        with pytest.raises(SiteRefused, match=r"PERMISSION_DENIED|revoked"):
            agent.run(max_attempts=3)


def test_protocol_version_is_checked_at_join(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, rounds=1)
    with running_coordinator(fed):
        creds = load_kit(fed.kit("site-1")).channel_credentials()
        with grpc.secure_channel(fed.address, creds) as ch:
            stub = pb_grpc.CoordinatorStub(ch)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as e:
                stub.Join(pb.JoinRequest(protocol_version=99), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("min_sites", [2, 3])
def test_a_site_killed_mid_round(tmp_path: Path, min_sites: int) -> None:
    fed = make_federation(
        tmp_path,
        sites=("site-1", "site-2", "site-3"),
        rounds=1,
        min_sites=min_sites,
        max_attempts=1,
        expected=3,
    )
    victim = fed.site_process("site-3", 2, 3)
    try:
        with running_coordinator(fed) as (_coordinator, codes):
            for i, name in enumerate(("site-1", "site-2")):
                fed.start_agent(fed.agent(name, i, 3, **{"max-samples-per-site": 1500}))
            wait_for_line(victim, "train task", 120)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            wait_for(lambda: codes, 120, "the round to end")
    finally:
        if victim.poll() is None:
            victim.kill()
    store = Store(tmp_path / "state")
    try:
        row = next(r for r in store.rounds() if r.round == 1)
    finally:
        store.close()
    assert "site-3" in row.failures
    if min_sites == 2:  # two survivors are enough: the round completes without the victim
        assert codes == [0]
        assert row.status == "ok" and row.succeeded == ["site-1", "site-2"]
    else:  # three were required: the round is recorded as failed, the federation stops
        assert codes == [1]
        assert row.status == "failed"


def _checkpoint_rounds(db: Path) -> list[int]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT round FROM checkpoints ORDER BY round")]


def test_coordinator_killed_between_rounds_resumes_with_identical_parameters(
    tmp_path: Path,
) -> None:
    fed = make_federation(tmp_path, rounds=3)
    db = tmp_path / "state" / "state.db"
    first = fed.coordinator_process()
    try:
        agents = [fed.agent(n, i, 2) for i, n in enumerate(("site-1", "site-2"))]
        for a in agents:
            fed.start_agent(a, max_attempts=200)
        wait_for(lambda: 1 in _checkpoint_rounds(db), 180, "round 1's checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = max(_checkpoint_rounds(db))
        second = fed.coordinator_process()
        try:
            assert second.wait(timeout=240) == 0
        finally:
            if second.poll() is None:
                second.kill()
        for t in fed.threads:
            t.join(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert not fed.errors
    store = Store(tmp_path / "state")
    try:
        checkpoints = {e["round"]: e["weights_sha256"] for e in store.events("checkpoint")}
        resumed = store.events("resumed")
        rounds = [(r.round, r.status) for r in store.rounds() if r.status == "ok"]
    finally:
        store.close()
    assert len(resumed) == 1 and resumed[0]["round"] == killed_at
    # The restarted coordinator continued from exactly the model it had checkpointed.
    assert resumed[0]["weights_sha256"] == checkpoints[killed_at]
    assert sorted(checkpoints) == [1, 2, 3]
    assert [r for r, _ in rounds].count(killed_at) == 1
    assert {1, 2, 3} <= {r for r, _ in rounds}


FLOWER_ONLY_APP = '''
"""A ClientApp written only against Flower's API: no Confide import anywhere."""
import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def make_model() -> torch.nn.Module:
    return torch.nn.Linear(4, 1)


def _data(context: Context):
    rng = np.random.default_rng(int(context.node_config["partition-id"]))
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32))[:, None]
    return torch.from_numpy(x), torch.from_numpy(y)


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context)
    opt = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord({"train_loss": float(loss.detach()),
                                                        "num-examples": len(x)})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context)
    with torch.no_grad():
        loss = float(torch.nn.functional.mse_loss(model(x), y))
    return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss,
                                                        "num-examples": len(x)})}), reply_to=msg)
'''


def test_a_numpy_client_app_trains_through_the_coordinator_unchanged(tmp_path: Path) -> None:
    """A ClientApp(client_fn=...) around a NumPyClient speaks Flower's legacy records."""
    from confide.client.apps import mnist_cnn_numpy

    fed = make_federation(tmp_path)
    with running_coordinator(fed) as (_coordinator, codes):
        for i, name in enumerate(("site-1", "site-2")):
            agent = fed.agent(name, i, 2, app=mnist_cnn_numpy)
            assert agent.dialect.legacy
            fed.start_agent(agent)
        wait_for(lambda: codes, 240, "the federation to finish")
        for t in fed.threads:
            t.join(timeout=20)
    assert codes == [0] and not fed.errors
    history = json.loads((tmp_path / "state" / "history.json").read_text())
    rounds = {r["round"]: r for r in history["rounds"]}
    assert rounds[2]["sites_succeeded"] == 2 and rounds[2]["train_examples"] > 0
    assert rounds[2]["eval_examples"] > 0
    assert rounds[2]["eval_accuracy"] > rounds[0]["eval_accuracy"] + 0.3


def test_a_flower_only_clientapp_trains_through_the_coordinator(tmp_path: Path) -> None:
    app_dir = tmp_path / "user"
    app_dir.mkdir()
    (app_dir / "flower_only_app.py").write_text(textwrap.dedent(FLOWER_ONLY_APP))
    sys.path.insert(0, str(app_dir))
    try:
        fed = make_federation(tmp_path / "fed", model="flower_only_app:make_model", rounds=2)
        fed.doc["train"] = {"lr": 0.05}
        app = load_app("flower_only_app:app", app_dir=app_dir)
        with running_coordinator(fed) as (_coordinator, codes):
            for i, name in enumerate(("site-1", "site-2")):
                agent: SiteAgent = fed.agent(name, i, 2, app=app)
                fed.start_agent(agent)
            wait_for(lambda: codes, 120, "the federation to finish")
    finally:
        sys.path.remove(str(app_dir))
    assert codes == [0] and not fed.errors
    history = json.loads((fed.root / "state" / "history.json").read_text())
    losses = {r["round"]: r["eval_loss"] for r in history["rounds"]}
    assert losses[2] < 0.5 * losses[0]


def test_an_unreachable_coordinator_gives_up_after_bounded_attempts(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, rounds=1)  # no coordinator started
    agent = fed.agent("site-1", 0, 2)
    with pytest.raises(CoordinatorUnreachable):
        agent.run(max_attempts=2)


def test_a_model_is_served_in_the_chunk_size_a_site_asks_for_within_bounds(
    tmp_path: Path,
) -> None:
    from confide.wire import decode

    fed = make_federation(tmp_path, rounds=1)
    coordinator = Coordinator(fed.config())
    try:
        model_id = coordinator._publish_model(1)
        default, _ = coordinator.model_chunks(model_id, 0) or ([], 0)
        small, size = coordinator.model_chunks(model_id, 100_000) or ([], 0)
        tiny, _ = coordinator.model_chunks(model_id, 1) or ([], 0)  # clamped to 64 KiB
        assert len(small) > len(default) and size == sum(len(c) for c in small)
        parts = [pb.Chunk.FromString(c) for c in tiny]  # frames are serialized Chunks
        assert max(len(c.data) for c in parts if c.WhichOneof("part") == "data") == 64 * 1024
        for chunks in (default, small, tiny):
            out = decode(chunks, max_bytes=1 << 30)
            for a, b in zip(out.arrays, coordinator.weights, strict=True):
                assert (a == b).all()
        assert coordinator.model_chunks("no-such-model", 0) is None
    finally:
        coordinator.shutdown()


def test_a_client_on_the_generated_stubs_interoperates_with_the_raw_frame_service(
    tmp_path: Path,
) -> None:
    """The coordinator sends and reads model streams as raw frames (confide.rpc); a peer
    using only the generated protobuf stubs must see ordinary confide.v1.Chunk messages."""
    from confide.privacy.crypto import UpdateSigner
    from confide.wire import Payload, decode, encode

    fed = make_federation(tmp_path, rounds=1, min_sites=1)
    kit = load_kit(fed.kit("site-1"))

    def signer(task: pb.Task) -> UpdateSigner:  # every upload is signed (protocol 3)
        return UpdateSigner.for_task(kit, task.round, task.task_id)

    with running_coordinator(fed) as (coordinator, _codes):
        creds = kit.channel_credentials()
        with grpc.secure_channel(fed.address, creds) as ch:
            stub = pb_grpc.CoordinatorStub(ch)  # type: ignore[no-untyped-call]
            session = stub.Join(
                pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=5
            ).session_id
            task = pb.Task()
            for _ in range(30):  # bounded: round 1 is published within seconds
                task = stub.PullTask(pb.PullTaskRequest(session_id=session), timeout=10)
                if task.kind == pb.Task.EVALUATE:  # the round-0 baseline: metrics only
                    result = Payload(task.task_id, [], [], {"num-examples": 5, "accuracy": 0.5})
                    signed = encode(result, signer=signer(task))
                    assert stub.UploadResult(signed, timeout=10).accepted
                if task.kind == pb.Task.TRAIN:
                    break
            assert task.kind == pb.Task.TRAIN
            chunks = list(
                stub.DownloadModel(
                    pb.DownloadModelRequest(session_id=session, model_id=task.model_id),
                    timeout=30,
                )
            )
            assert all(isinstance(c, pb.Chunk) for c in chunks)
            model = decode(chunks, max_bytes=1 << 30)
            for got, want in zip(model.arrays, coordinator.weights, strict=True):
                np.testing.assert_array_equal(got, want)
            # Send the model back as this site's update, as protobuf messages.
            update = Payload(task.task_id, model.names, model.arrays, {"num-examples": 5})
            sent = list(encode(update, 64 * 1024, signer=signer(task)))
            reply = stub.UploadResult(iter(sent), timeout=30)
        assert reply.accepted, reply.reason
        assert reply.bytes_received == sum(c.ByteSize() for c in sent)
