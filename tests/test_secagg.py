"""SecAgg+ (confide.privacy.secagg): the sum is exact, dropouts recover, secrets stay secret."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.errors import ConfigError
from confide.privacy.secagg import (
    Aggregate,
    MaskedInputError,
    ProtocolViolation,
    QuantizationError,
    SecAggAborted,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskRequest,
    quantize,
    shamir,
)


class Round:
    """Drives one round in memory; ``drop_at[site] = stage`` makes a site vanish there."""

    def __init__(self, cfg: SecAggConfig, seed: int = 0) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        self.clients = {i: SecAggClient(cfg, i) for i in range(1, cfg.sites + 1)}
        self.server = SecAggServer(cfg)
        self.updates = {i: rng.standard_normal(cfg.dim) * 0.5 for i in self.clients}
        self.counts = {i: int(rng.integers(1, 500)) for i in self.clients}
        self.quantized: dict[int, np.ndarray] = {}

    def share(self) -> dict[int, dict[int, bytes]]:
        """Stages 1-2 for every site; the share boxes each site receives."""
        for c in self.clients.values():
            self.server.add_advert(c.advertise())
        keys = self.server.key_lists()
        for i, c in self.clients.items():
            self.server.add_shared(c.share_keys(keys[i]))
        return self.server.share_boxes()

    def run(
        self, drop_at: dict[int, int] | None = None, tamper: tuple[int, int] | None = None
    ) -> tuple[Aggregate, dict[int, UnmaskRequest]]:
        drop_at = drop_at or {}

        def alive(stage: int) -> list[int]:
            return [i for i in self.clients if drop_at.get(i, 99) > stage]

        srv = self.server
        for i in alive(1):
            srv.add_advert(self.clients[i].advertise())
        keys = srv.key_lists()
        for i in alive(2):
            if i in keys:
                srv.add_shared(self.clients[i].share_keys(keys[i]))
        boxes = srv.share_boxes()
        if tamper is not None:
            sender, recipient = tamper
            box = bytearray(boxes[recipient][sender])
            box[-1] ^= 0x01
            boxes[recipient][sender] = bytes(box)
        for i in alive(3):
            if i in boxes:
                seed = 1000 + i
                msg = self.clients[i].masked_input(
                    boxes[i], self.updates[i], self.counts[i], rng=np.random.default_rng(seed)
                )
                q = quantize(
                    self.updates[i],
                    clip=self.cfg.clip,
                    weight=self.counts[i] / self.cfg.max_weight,
                    sites=self.cfg.sites,
                    rng=np.random.default_rng(seed),
                )
                self.quantized[i] = np.append(q, np.uint32(self.counts[i]))
                srv.add_masked(msg)
        requests = srv.unmask_requests()
        replies = [self.clients[v].unmask(r) for v, r in requests.items() if v in alive(4)]
        return srv.unmask(replies), requests

    def plain_mean(self, sites: tuple[int, ...]) -> np.ndarray:
        w = np.array([self.counts[i] for i in sites], dtype=np.float64)
        x = np.stack([np.clip(self.updates[i], -self.cfg.clip, self.cfg.clip) for i in sites])
        mean: np.ndarray = (w[:, None] * x).sum(axis=0) / w.sum()
        return mean


def _config(n: int, k: int | None, dim: int, **kw: object) -> SecAggConfig:
    return SecAggConfig.build(n, dim, neighbours=k, context=b"test/round-1", **kw)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_unmasked_sum_is_the_plain_sum_and_the_mean_within_the_bound(data: st.DataObject) -> None:
    n = data.draw(st.integers(3, 14), label="N")
    k_choices = sorted({n - 1, *[k for k in range(2, n - 1) if k % 2 == 0]})
    k = data.draw(st.sampled_from(k_choices), label="k")
    t = data.draw(st.integers(k // 2 + 1, k), label="t")
    dim = data.draw(st.integers(1, 300), label="D")
    cfg = _config(n, k, dim, threshold=t)
    # Sites that drop after sharing keys; keep at least t survivors so the round can finish.
    dropped = data.draw(st.sets(st.integers(1, n), max_size=n - t), label="dropped")
    r = Round(cfg, seed=data.draw(st.integers(0, 10**6), label="seed"))
    try:
        agg, requests = r.run(drop_at={i: 3 for i in dropped})
    except SecAggAborted as e:
        # Legitimate only when some dropped site kept fewer than t sharing neighbours.
        assert "fewer than" in str(e) or "threshold" in str(e)
        return
    survivors = tuple(sorted(set(r.clients) - dropped))
    assert agg.survivors == survivors and set(agg.dropped) == dropped
    expected = np.zeros(dim + 1, dtype=np.uint32)
    for i in survivors:
        expected += r.quantized[i]  # uint32: wraps mod 2^32 like the ring
    np.testing.assert_array_equal(agg.total, expected)
    assert agg.count == sum(r.counts[i] for i in survivors)
    assert np.max(np.abs(agg.mean - r.plain_mean(survivors))) <= agg.error_bound
    # Never both secrets of a site: b of survivors, s of dropped, never overlapping.
    for req in requests.values():
        assert set(req.survivors) <= set(survivors) and set(req.dropped) <= dropped


def test_full_secagg_and_secagg_plus_agree_with_the_float_mean() -> None:
    for k in (None, 11):  # default SecAgg+ (k=8 for 12 sites) and full SecAgg
        r = Round(_config(12, k, 2000), seed=3)
        agg, _ = r.run(drop_at={2: 3, 7: 3})
        err = np.max(np.abs(agg.mean - r.plain_mean(agg.survivors)))
        assert err <= agg.error_bound < 1e-3
        assert len(agg.survivors) == 10


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 8), extra=st.integers(0, 4), secret=st.binary(min_size=32, max_size=32))
def test_shamir_needs_t_shares(t: int, extra: int, secret: bytes) -> None:
    xs = list(range(1, t + extra + 1))
    shares = shamir.share(shamir.to_limbs([secret]), xs, t)
    got = shamir.recover(np.array([xs]), shares, t)
    assert shamir.from_limbs(got) == [secret]
    # any t of them work, in any order
    pick = list(reversed(range(len(xs))))[:t]
    got = shamir.recover(np.array([[xs[j] for j in pick]]), shares[:, pick, :], t)
    assert shamir.from_limbs(got) == [secret]
    if t > 1:
        with pytest.raises(shamir.ShamirError, match="cannot recover"):
            shamir.recover(np.array([xs[: t - 1]]), shares[:, : t - 1, :], t)
        # Interpolating t-1 shares as if they were enough gives a value unrelated to it.
        wrong = shamir.recover(np.array([xs[: t - 1]]), shares[:, : t - 1, :], t - 1)
        assert not np.array_equal(wrong, shamir.to_limbs([secret]))


def test_a_tampered_share_fails_authentication_and_excludes_its_sender() -> None:
    r = Round(_config(10, None, 500), seed=5)
    cfg = r.cfg
    sender = 4
    recipient = cfg.neighbours_of(sender)[0]
    agg, _ = r.run(tamper=(sender, recipient))
    assert agg.excluded == (sender,) and sender not in agg.survivors
    assert np.max(np.abs(agg.mean - r.plain_mean(agg.survivors))) <= agg.error_bound


def test_a_masked_vector_of_the_wrong_length_or_dtype_is_rejected() -> None:
    r = Round(_config(8, 7, 100), seed=1)  # full: 5 surviving holders per seed, t = 5
    srv = r.server
    boxes = r.share()
    msgs = {i: c.masked_input(boxes[i], r.updates[i], r.counts[i]) for i, c in r.clients.items()}
    with pytest.raises(MaskedInputError, match="expected 101"):
        srv.add_masked(replace(msgs[1], vector=msgs[1].vector[:-1]))
    with pytest.raises(MaskedInputError, match="uint32"):
        srv.add_masked(replace(msgs[2], vector=msgs[2].vector.astype(np.int64)))
    for i in range(3, 9):
        srv.add_masked(msgs[i])
    requests = srv.unmask_requests()  # 1 and 2 count as dropped; the round goes on
    agg = srv.unmask([r.clients[v].unmask(q) for v, q in requests.items()])
    assert agg.survivors == (3, 4, 5, 6, 7, 8) and agg.dropped == (1, 2)
    assert np.max(np.abs(agg.mean - r.plain_mean(agg.survivors))) <= agg.error_bound


def test_a_site_killed_in_each_stage() -> None:
    cfg = _config(10, None, 64)
    # advertise (1), share keys (2), masked input (3): the round recovers without it
    for stage in (1, 2, 3):
        r = Round(cfg, seed=stage)
        agg, _ = r.run(drop_at={6: stage})
        assert 6 not in agg.survivors
        assert np.max(np.abs(agg.mean - r.plain_mean(agg.survivors))) <= agg.error_bound
    # unmask (4): its input is in the sum; the others' shares still unmask it
    r = Round(cfg, seed=4)
    agg, _ = r.run(drop_at={6: 4})
    assert 6 in agg.survivors
    assert np.max(np.abs(agg.mean - r.plain_mean(agg.survivors))) <= agg.error_bound


def test_too_few_survivors_abort_cleanly() -> None:
    cfg = _config(6, None, 16)  # k=5 (full), t=4
    r = Round(cfg)
    with pytest.raises(SecAggAborted, match="threshold"):
        r.run(drop_at={1: 3, 2: 3, 3: 3})
    # and too few unmask replies for a survivor's seed
    r = Round(cfg)
    with pytest.raises(SecAggAborted, match="fewer than t"):
        r.run(drop_at={1: 4, 2: 4, 3: 4})


def test_a_client_never_reveals_both_secrets_of_a_site() -> None:
    r = Round(_config(6, None, 8))
    boxes = r.share()
    c1 = r.clients[1]
    c1.masked_input(boxes[1], r.updates[1], r.counts[1])
    with pytest.raises(ProtocolViolation, match="both secrets"):
        c1.unmask(UnmaskRequest(survivors=(2, 3), dropped=(3,)))
    with pytest.raises(ProtocolViolation, match="own secrets"):
        r.clients[2].masked_input(boxes[2], r.updates[2], r.counts[2])
        r.clients[2].unmask(UnmaskRequest(survivors=(2,), dropped=()))


def test_upload_is_four_bytes_per_parameter() -> None:
    r = Round(_config(5, None, 1000))
    msg = r.clients[1].masked_input(r.share()[1], r.updates[1], r.counts[1])
    assert msg.vector.dtype == np.uint32 and msg.vector.nbytes == 4 * (1000 + 1)


def test_bad_configs_name_the_field_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"secagg.neighbours.*odd.*Fix"):
        SecAggConfig.build(10, 5, neighbours=3)
    with pytest.raises(ConfigError, match=r"secagg.threshold.*k/2"):
        SecAggConfig.build(10, 5, neighbours=4, threshold=2)
    with pytest.raises(ConfigError, match=r"secagg.max_weight"):
        SecAggConfig.build(1000, 5, max_weight=1 << 30)
    with pytest.raises(QuantizationError, match=r"secagg\.max_weight"):
        r = Round(_config(5, None, 4))
        r.clients[1].masked_input(r.share()[1], r.updates[1], 10**6)
