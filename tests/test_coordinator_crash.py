"""The coordinator killed with SIGKILL at points of a round, then restarted.

A DP-SGD federation of three site agents (real MNIST app, real Opacus, each site with its
own ledger, budget and audit log) and a coordinator process over loopback mutual TLS. The
coordinator dies during round 2 of 3 (while uploads come in, while secure aggregation unmasks,
in the middle of writing a checkpoint, at a seeded random moment) and a second process
resumes from the last checkpoint. Then:

* the federation completes, and every round is recorded ok exactly once;
* each site's ledger holds each release once: a site asked again for a round it already
  released on the same model sends the same release (no second training, no second ε);
  only when its masked input already left in a secure-aggregation session does it train
  afresh, and that second release is in the ledger as what it is;
* the coordinator's mirror holds exactly the sites' events (nothing lost, none twice);
* every audit chain (the coordinator's and each site's) verifies.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from federation_helpers import Federation, make_federation

from confide.client.agent import SiteAgent, validate_site_config
from confide.privacy.audit import AuditKey, AuditLog, trust_store
from confide.privacy.crypto import load_kit
from confide.privacy.dp import PrivacyLedger, epsilon
from confide.server.store import Store

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")
ROUNDS = 3

# A coordinator that dies in the middle of round 2's checkpoint: the model file is
# complete and a torn temporary file lies beside it, but the round's row was never
# committed. Run as `python wrapper.py federation.toml`.
DIES_IN_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys
    import confide.server.store as store

    real = store._write_atomic

    def dying(path, data):
        digest = real(path, data)
        if path.name.startswith("round-00002"):
            torn = path.with_name("." + path.name + ".torn.tmp")
            torn.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return digest

    store._write_atomic = dying
    from confide.cli import main
    sys.exit(main(["coordinator", "start", "--config", sys.argv[1]]))
    """
)


def _federation(tmp_path: Path, *, secagg: bool) -> Federation:
    fed = make_federation(
        tmp_path, sites=SITES, rounds=ROUNDS, min_sites=3, expected=3, max_attempts=3, deadline=90
    )
    fed.doc["evaluation"] = {"fraction": 0.0}
    fed.doc["dp"] = {
        "delta": 1e-5,
        "example": {
            "noise_multiplier": 1.0,
            "sample_rate": 0.05,
            "steps_per_round": 4,
            "clip_norm": 1.0,
        },
    }
    if secagg:
        fed.doc["federation"]["secure_aggregation"] = "secagg+"
        fed.doc["secagg"] = {"stage_deadline_seconds": 30}
    return fed


def _site(fed: Federation, name: str, pid: int) -> SiteAgent:
    doc = fed.site_doc(pid, len(SITES))
    doc["state_dir"] = str(fed.root / f"{name}-state")
    doc["privacy"] = {"epsilon_max": 50.0, "delta": 1e-5, "require_dp": True}
    return SiteAgent(load_kit(fed.kit(name)), validate_site_config(doc), app=None)


class _Lines:
    """The coordinator's output, read in a thread; ``wait`` for a line matching a test."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._new:
                self.lines.append(line)
                self.times.append(time.monotonic())
                self._new.notify_all()

    def arrived(self, needle: str) -> float:
        """When the first line containing ``needle`` arrived."""
        with self._new:
            return next(t for t, ln in zip(self.times, self.lines, strict=True) if needle in ln)

    def wait(self, test: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        with self._new:
            while not test(self.lines):
                left = end - time.monotonic()
                if left <= 0:
                    tail = "".join(self.lines[-30:])
                    raise AssertionError(f"timed out waiting for {what}:\n{tail}")
                self._new.wait(timeout=min(left, 1.0))


def _has(needle: str, after: str = "") -> Callable[[list[str]], bool]:
    """A test: some line contains ``needle`` (after the first line containing ``after``)."""

    def test(lines: list[str]) -> bool:
        start = next((i for i, ln in enumerate(lines) if after in ln), None) if after else 0
        return start is not None and any(needle in ln for ln in lines[start:])

    return test


KILL_POINTS = {
    "uploads": _has("train result from", after="round 2/3"),
    "unmasking": _has("secagg result from", after="round 2: secure aggregation stage 3"),
    "random": _has("round 2/3"),
}


def _random_moment(out: _Lines, seed: int) -> float:
    """A seeded moment inside round 2: a fraction of round 1's length (rounds are alike)."""
    start, end = out.arrived("round 1/3"), out.arrived("round 2/3")
    return random.Random(seed).uniform(0.0, 0.9) * (end - start)


def _checkpointed(fed: Federation) -> int:
    with Store(fed.root / "state") as store:
        last = store.latest_checkpoint()
    return last.round if last is not None else 0


def _run(fed: Federation, kill: str) -> tuple[list[str], int, int]:
    """Run the federation, kill the first coordinator, resume; (output, exit code of the
    second coordinator, the round of the last checkpoint when the first one died)."""
    agents = [_site(fed, name, i) for i, name in enumerate(SITES)]
    for a in agents:
        fed.start_agent(a, max_attempts=400)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if kill == "checkpoint":
        wrapper = fed.root / "dies_in_checkpoint.py"
        wrapper.write_text(DIES_IN_CHECKPOINT)
        first = subprocess.Popen(
            [sys.executable, str(wrapper), str(fed.toml)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    else:
        first = fed.coordinator_process()
    second: subprocess.Popen[str] | None = None
    try:
        out = _Lines(first)
        if kill == "checkpoint":
            first.wait(timeout=300)  # it kills itself
        else:
            out.wait(KILL_POINTS[kill], 300, f"the kill point {kill!r}")
            if kill == "random":
                time.sleep(_random_moment(out, seed=8))
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        assert first.returncode == -signal.SIGKILL, "".join(out.lines[-30:])
        killed_after = _checkpointed(fed)
        second = fed.coordinator_process()
        resumed = _Lines(second)
        code = second.wait(timeout=400)
        for t in fed.threads:
            t.join(timeout=60)
        return out.lines + resumed.lines, code, killed_after
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize(
    ("kill", "secagg"),
    [("uploads", False), ("checkpoint", False), ("random", False), ("unmasking", True)],
)
def test_a_coordinator_killed_mid_round_resumes_and_counts_every_release_once(
    tmp_path: Path, kill: str, secagg: bool
) -> None:
    fed = _federation(tmp_path, secagg=secagg)
    lines, code, killed_after = _run(fed, kill)
    assert code == 0, "".join(lines[-40:])
    assert not fed.errors, fed.errors
    assert all(not t.is_alive() for t in fed.threads)

    with Store(fed.root / "state") as store:
        ok = [r.round for r in store.rounds() if r.status == "ok"]
        resumed = store.events("resumed")
        checkpoints = [e["round"] for e in store.events("checkpoint")]
    assert sorted(ok) == list(range(1, ROUNDS + 1))  # every round ok, each once
    assert killed_after < ROUNDS  # it died before the last round was checkpointed
    if kill != "random":
        assert killed_after == 1  # ... in round 2
    # The second coordinator resumed from the last checkpoint, and wrote each one once.
    assert len(resumed) == 1 and resumed[0]["round"] == killed_after
    assert checkpoints == list(range(1, ROUNDS + 1))
    models = sorted(p.name for p in (fed.root / "state" / "models").iterdir())
    assert not any(n.endswith(".tmp") for n in models if "torn" not in n) and len(models) >= 2

    key = AuditKey.load(fed.root / "state" / "audit.key")
    with AuditLog(fed.root / "state" / "audit.db") as log:
        report = log.verify(trust_store(key.public_key_pem))
        assert report.ok, report.summary()
    resent = 0
    with PrivacyLedger(fed.root / "state" / "ledger.db") as mirror:
        for name in SITES:
            state = fed.root / f"{name}-state"
            with PrivacyLedger(state / "ledger.db", site=name) as ledger:
                events = ledger.events()
                per_round = Counter(e.round for e in events)
                site_uids = [r["uid"] for r in ledger.export()]
                mirrored = [r["uid"] for r in mirror.export(name)]
                spent = ledger.spent()
            # Nothing lost, nothing twice: the mirror holds exactly the site's events.
            assert sorted(mirrored) == sorted(site_uids) and len(set(site_uids)) == len(site_uids)
            assert spent == pytest.approx(epsilon(events, 1e-5))
            akey = AuditKey.load(state / "audit.key")
            with AuditLog(state / "audit.db") as log:
                report = log.verify(trust_store(akey.public_key_pem))
                assert report.ok, report.summary()
                kinds = Counter(e.kind for e in log.entries())
            assert kinds["dp_event"] == len(events)  # each release audited once
            resent += kinds["release_resent"]
            if kill == "unmasking":
                # The masked inputs had left in the killed session: round 2 was trained
                # again, a second release, recorded once as such.
                assert per_round == {1: 1, 2: 2, 3: 1}, per_round
                assert kinds["release_resent"] == 0
            else:
                assert per_round == dict.fromkeys(range(1, ROUNDS + 1), 1), per_round
    if kill == "uploads":
        assert resent >= 1  # the site whose result was accepted sent the same release again
    if kill == "checkpoint":
        assert resent == len(SITES)  # round 2 was fully released before the checkpoint
