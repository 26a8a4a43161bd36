"""The coordinator: serves the wire contract over mutual TLS and drives the rounds.

One loop thread runs the federation (select, train, aggregate, evaluate, checkpoint)
while gRPC handler threads talk to the sites through a :class:`RoundBoard`. State goes
to SQLite and model files after every round, so a restarted coordinator resumes at the
next round with exactly the model it had.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import torch

from confide.client.models import MODELS, build_model, get_weights
from confide.errors import ConfideError, ConfigError
from confide.logs import JsonFormatter
from confide.privacy.crypto import load_coordinator
from confide.privacy.dp.federated import CLIENT_UNCLIPPED
from confide.privacy.secagg import (
    Aggregate,
    ProtocolViolation,
    SecAggAborted,
    SecAggConfig,
    SecAggServer,
    UnmaskReply,
)
from confide.privacy.secagg import federated as secagg_fl
from confide.rpc import TrafficMeter, add_coordinator_service
from confide.server.config import FederationConfig
from confide.server.history import History, RoundRecord
from confide.server.integrity import check_arrays, check_client_clip
from confide.server.privacy import CoordinatorPrivacy
from confide.server.rounds import Kind, Phase, Reason, Rejected, RoundBoard, TaskSpec
from confide.server.service import CoordinatorService
from confide.server.store import CheckpointWriteError, Store
from confide.server.strategy import (
    FedAdam,
    SiteResult,
    make_strategy,
    weighted_metrics,
)
from confide.tuning import keep_large_buffers
from confide.wire import NUM_EXAMPLES, Payload, frames

log = logging.getLogger("confide.coordinator")

MAX_EXAMPLES = 10**9
MIN_CHUNK_BYTES = 64 * 1024  # a site claiming more is lying or broken; it would dominate the mean
EXIT_STATE_UNWRITABLE = 3  # a checkpoint could not be written (a full disk): stopped, resumable


class NotEnoughSites(ConfideError, RuntimeError):
    """Fewer sites than ``min_sites`` connected, or every attempt of a round failed."""


def initial_model(spec: str, seed: int) -> tuple[list[str], list[npt.NDArray[Any]]]:
    """Names and weights of the starting model: a built-in name or ``module:attribute``."""
    torch.manual_seed(seed)
    if spec in MODELS:
        model = build_model(spec)
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(
                "federation.model",
                f"cannot load {spec!r} ({e})",
                "give module:attribute of a function returning a torch.nn.Module",
            ) from e
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                "federation.model",
                f"{spec} returned {type(model).__name__}",
                "return a torch.nn.Module",
            )
    else:
        raise ConfigError(
            "federation.model",
            f"unknown model {spec!r}",
            f"use one of {', '.join(MODELS)} or module:attribute",
        )
    return list(model.state_dict().keys()), get_weights(model)


def weights_digest(weights: list[npt.NDArray[Any]]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(np.ascontiguousarray(w).reshape(-1).view(np.uint8).data)  # no copy
    return h.hexdigest()


class Coordinator:
    """A federation's coordinator process (``confide coordinator start``)."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.files = load_coordinator(cfg.coordinator_dir)
        if self.files.federation != cfg.federation.name:
            raise ConfigError(
                "federation.name",
                f"{cfg.federation.name!r} but the certificates in {cfg.coordinator_dir} are "
                f"for {self.files.federation!r}",
                "use the name given to `confide pki init`, or point server.coordinator_dir "
                "at that federation's folder",
            )
        self.store = Store(cfg.state_dir, cfg.seal_key())
        self.store.bind(cfg.federation.name, cfg.federation.model)
        self.board = RoundBoard(site_timeout=cfg.server.site_timeout_seconds)
        self.chunk_bytes = int(cfg.server.chunk_mb * 1024 * 1024)
        self.max_update_bytes = int(cfg.server.max_update_mb * 1024 * 1024)
        self.strategy = make_strategy(cfg.federation.strategy, cfg.federation.server_lr)
        self.stop_event = threading.Event()
        self._models: OrderedDict[tuple[str, int], tuple[list[bytes], int]] = OrderedDict()
        self._published: OrderedDict[str, Payload] = OrderedDict()
        self._models_lock = threading.Lock()
        # Every message in and out of the service; each round record takes its window.
        self.meter = TrafficMeter()
        self._traffic_mark = self.meter.snapshot()
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self.privacy = CoordinatorPrivacy(
            cfg.dp, cfg.federation.name, cfg.federation.rounds, cfg.state_dir, cfg.federation.seed
        )

        checkpoint = self.store.latest_checkpoint()
        if checkpoint is None:
            self.names, self.weights = initial_model(cfg.federation.model, cfg.federation.seed)
            self.store.save_checkpoint(0, self.names, self.weights)
            self.next_round = 1
            self.store.event("created", rnd=0, weights_sha256=weights_digest(self.weights))
        else:
            self.names, self.weights = checkpoint.names, checkpoint.weights
            if isinstance(self.strategy, FedAdam):
                self.strategy.load_state(checkpoint.strategy_state)
            self.next_round = checkpoint.round + 1
            self.store.event(
                "resumed", rnd=checkpoint.round, weights_sha256=weights_digest(self.weights)
            )
            log.info("resuming after round %d from %s", checkpoint.round, self.store.path)
        self.history = self._history_from_store()
        self._first_round = self.next_round

    # --- serving -----------------------------------------------------------------------

    def start(self) -> int:
        """Start the gRPC server (mutual TLS only); returns the bound port."""
        keep_large_buffers()  # models arrive as 1-4 MiB messages: reuse their buffers
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.cfg.server.workers),
            options=[
                ("grpc.max_receive_message_length", 2 * self.chunk_bytes + (1 << 20)),
                ("grpc.max_send_message_length", 2 * self.chunk_bytes + (1 << 20)),
            ],
        )
        add_coordinator_service(
            CoordinatorService(self, self.files.revocation_list()), server, self.meter
        )
        port = int(server.add_secure_port(self.cfg.server.address, self.files.server_credentials()))
        if port == 0:
            raise ConfigError(
                "server.address",
                f"cannot listen on {self.cfg.server.address}",
                "choose a free port, or an address of this machine",
            )
        server.start()
        self.server, self.port = server, port
        host = self.cfg.server.address.rsplit(":", 1)[0]
        log.info(
            "coordinator of %s listening on %s:%d (mutual TLS)",
            self.cfg.federation.name,
            host,
            port,
        )
        self.store.event("listening", port=port)
        return port

    def shutdown(self, grace: float = 2.0) -> None:
        self.stop_event.set()
        self.board.finish()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        self.store.close()
        self.privacy.close()

    def model_chunks(self, model_id: str, chunk_bytes: int) -> tuple[list[bytes], int] | None:
        """The serialized chunk frames of a published model and their total size, or None.

        A site may ask for smaller chunks (a slow or lossy link); sizes are clamped to
        [64 KiB, server chunk size] so no caller can make the cache explode.
        """
        size = chunk_bytes if chunk_bytes > 0 else self.chunk_bytes
        size = max(MIN_CHUNK_BYTES, min(size, self.chunk_bytes))
        with self._models_lock:
            cached = self._models.get((model_id, size))
            if cached is not None:
                return cached
            payload = self._published.get(model_id)
        if payload is None:
            return None
        chunks = list(frames(payload, size))
        entry = (chunks, sum(len(c) for c in chunks))
        with self._models_lock:
            self._models[(model_id, size)] = entry
            self._trim_models()
        return entry

    def _trim_models(self) -> None:
        while len(self._models) > 4:  # the current model and a few chunkings of it
            self._models.popitem(last=False)
        while len(self._published) > 2:  # this round's trained and evaluated models
            self._published.popitem(last=False)

    def _publish_model(self, rnd: int) -> str:
        model_id = f"r{rnd}-{weights_digest(self.weights)[:12]}"
        payload = Payload(model_id, self.names, list(self.weights))
        chunks = list(frames(payload, self.chunk_bytes))
        with self._models_lock:
            self._published[model_id] = payload
            self._models[(model_id, self.chunk_bytes)] = (chunks, sum(len(c) for c in chunks))
            self._trim_models()
        return model_id

    def traffic_bytes(self) -> dict[str, int]:
        """Bytes in (``up``) and out (``down``) of the service so far, every method."""
        now = self.meter.snapshot()
        return {"up": now.up, "down": now.down}

    def _round_traffic(self, rnd: int) -> dict[str, Any]:
        """The meter's count since the previous round's record (retries included).

        The windows tile the run: every message is counted in exactly one round. What a
        site exchanges as a round ends (the reply to its last upload, its next poll) may
        fall on either side of the boundary: tens of bytes a site.
        """
        now = self.meter.snapshot()
        window, self._traffic_mark = now - self._traffic_mark, now
        traffic = window.to_dict()
        self.store.event("traffic", rnd=rnd, **traffic)
        return traffic

    # --- validation of results ----------------------------------------------------------

    def validate(self, task: TaskSpec, payload: Payload) -> None:
        """A result's content; :class:`Rejected` with a typed reason when it cannot count.

        Who sent it and for which round was checked before (``integrity.check_signed``).
        """
        if task.kind is Kind.TRAIN and self.privacy.enabled:
            try:
                self.privacy.accept_events(task.site_id, task.round, payload.config)
            except Rejected as e:
                raise Rejected(str(e), Reason.BAD_DP_EVENTS) from None
        if task.kind is Kind.SECAGG or (task.kind is Kind.TRAIN and "secagg.site" in task.config):
            self._validate_secagg(task, payload)
            return
        n = payload.metrics.get(NUM_EXAMPLES)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_EXAMPLES:
            raise Rejected(
                f"metric {NUM_EXAMPLES!r} must be an integer in 0..{MAX_EXAMPLES}",
                Reason.BAD_METRICS,
            )
        for key, value in payload.metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise Rejected(f"metric {key!r} is not finite", Reason.BAD_METRICS)
        if task.kind is Kind.EVALUATE:
            return
        if n == 0:
            raise Rejected("a training result must report at least one example", Reason.BAD_METRICS)
        check_arrays(payload.arrays, self.weights, self.names)
        if self.privacy.enabled and self.cfg.dp.client is not None:
            check_client_clip(task.config, payload.arrays, self.weights)

    def _validate_secagg(self, task: TaskSpec, payload: Payload) -> None:
        """Parse a secure-aggregation message; the round loop feeds it to the protocol."""
        for key, value in payload.metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise Rejected(f"metric {key!r} is not finite", Reason.BAD_METRICS)
        stage = 1 if task.kind is Kind.TRAIN else task.config.get("secagg.stage")
        site = task.config.get("secagg.site")
        try:
            if stage == 3:
                dim = int(task.config["secagg.dim"])  # set by this coordinator
                if len(payload.arrays) != 1:
                    raise Rejected("a masked input is exactly one array", Reason.BAD_SECAGG)
                vec = payload.arrays[0]
                if vec.dtype != np.uint32 or vec.shape != (dim + 1,):
                    raise Rejected(
                        f"a masked input must be uint32 of shape ({dim} + 1,), got {vec.dtype} "
                        f"{vec.shape}",
                        Reason.BAD_SECAGG,
                    )
                got = secagg_fl.masked_from_record(payload.metrics, vec).site
            else:
                if payload.arrays:
                    raise Rejected(
                        "this secure-aggregation stage carries no arrays", Reason.BAD_SECAGG
                    )
                if stage == 1:
                    got = secagg_fl.advert_from_record(payload.metrics).site
                elif stage == 2:
                    got = secagg_fl.shared_from_record(payload.metrics).site
                elif stage == 4:
                    got = secagg_fl.reply_from_record(payload.metrics).site
                else:
                    raise Rejected(f"unknown secure-aggregation stage {stage!r}", Reason.BAD_SECAGG)
        except ProtocolViolation as e:
            raise Rejected(
                f"malformed secure-aggregation message: {e}", Reason.BAD_SECAGG
            ) from None
        if got != site:
            raise Rejected(
                f"the message names site {got}, this site is {site!r} in the round",
                Reason.WRONG_SITE,
            )

    # --- the federation ----------------------------------------------------------------

    def run(self) -> int:
        """Run the remaining rounds; 0 when the federation finished, 1 when it could not."""
        cfg = self.cfg
        try:
            if self.next_round == 1 and cfg.evaluation.fraction > 0:
                self._baseline()
            for rnd in range(self.next_round, cfg.federation.rounds + 1):
                if not self._run_round(rnd):
                    return 1
                if self.stop_event.is_set():
                    log.info("stopped after round %d", rnd)
                    return 0
            if self.next_round > cfg.federation.rounds:
                log.info(
                    "federation %s already finished %d rounds",
                    cfg.federation.name,
                    cfg.federation.rounds,
                )
            self._finish()
            return 0
        except NotEnoughSites as e:
            log.error("%s", e)
            self.store.event("aborted", reason=str(e))
            return 1
        except CheckpointWriteError as e:
            # Training on without durable checkpoints would break "a crash loses nothing":
            # stop, and let the operator free space and restart from the last checkpoint.
            log.error("%s", e)
            return EXIT_STATE_UNWRITABLE

    def _sites_needed(self, rnd: int) -> int:
        sel = self.cfg.selection
        # Before the first round of this process, give every expected site time to join.
        return max(sel.min_sites, sel.expected_sites if rnd <= self._first_round else 0)

    def _baseline(self) -> None:
        """Federated evaluation of the initial model (round 0), the yardstick of progress."""
        sel = self.cfg.selection
        sites = self.board.wait_for_sites(
            self._sites_needed(0), sel.wait_for_sites_seconds, self.stop_event
        )
        if len(sites) < sel.min_sites or self.stop_event.is_set():
            return  # the first round reports the shortage
        start = time.time()
        self.store.round_started(0, 1, sites)
        evaluation = self._evaluate(0)
        traffic = self._round_traffic(0)
        self.store.round_finished(0, 1, "ok", eval_metrics=evaluation)
        record = RoundRecord(
            round=0,
            eval_loss=evaluation.get("eval_loss"),
            eval_accuracy=evaluation.get("eval_accuracy"),
            eval_examples=int(evaluation.get(NUM_EXAMPLES, 0)),
            seconds=time.time() - start,
            traffic=traffic,
        )
        self.history.add(record)
        self.history.save(self.cfg.state_dir / "history.json")
        acc = record.eval_accuracy
        log.info(
            "round 0 (initial model): eval accuracy %s",
            f"{100 * acc:.1f}%" if acc is not None else "-",
        )

    def _run_round(self, rnd: int) -> bool:
        sel = self.cfg.selection
        for attempt in range(1, sel.max_attempts + 1):
            if self.stop_event.is_set():
                return True
            sites = self.board.wait_for_sites(
                self._sites_needed(rnd), sel.wait_for_sites_seconds, self.stop_event
            )
            if self.stop_event.is_set():
                return True
            if len(sites) < sel.min_sites:
                raise NotEnoughSites(
                    f"round {rnd}: only {len(sites)} of the required {sel.min_sites} sites "
                    f"connected within {sel.wait_for_sites_seconds:.0f} s. Fix: start more sites, "
                    "or lower selection.min_sites"
                )
            sites, no_budget = self.privacy.eligible(sorted(sites), rnd)
            if len(sites) < sel.min_sites:
                self.privacy.audit(
                    "budgets_exhausted", {"round": rnd, "left_out": no_budget, "eligible": sites}
                )
                raise NotEnoughSites(
                    f"round {rnd}: only {len(sites)} connected site(s) have privacy budget left "
                    f"for the round, {sel.min_sites} needed (left out: "
                    f"{', '.join(sorted(no_budget)) or 'none'}). The federation stops here; "
                    "every site's ledger records what it spent. Fix: plan fewer rounds or more "
                    "noise, or add sites with budget"
                )
            rng = np.random.default_rng([self.cfg.federation.seed, rnd, attempt])
            target = min(len(sites), max(sel.min_sites, round(sel.fraction * len(sites))))
            k = min(len(sites), math.ceil(target * (1 + sel.over_selection)))
            chosen = sorted(str(s) for s in rng.choice(sites, size=k, replace=False))
            start = time.time()
            self.store.round_started(rnd, attempt, chosen)
            self.store.prune_nonces(rnd)  # older rounds' uploads are refused as WRONG_ROUND
            if self.privacy.enabled:
                self.privacy.audit(
                    "round_started",
                    {"round": rnd, "attempt": attempt, "selected": chosen, "left_out": no_budget},
                )
            log.info(
                "round %d/%d (attempt %d): training on %s (need %d, at least %d)",
                rnd,
                self.cfg.federation.rounds,
                attempt,
                ", ".join(chosen),
                target,
                sel.min_sites,
            )
            model_id = self._publish_model(rnd)
            config: dict[str, Any] = {**self.cfg.train, "server-round": rnd}
            config.update(self.privacy.round_config(self._min_survivors(len(chosen))))
            secure: SecAggConfig | None = None
            per_site: dict[str, secagg_fl.Record] | None = None
            if self.cfg.federation.secure_aggregation != "none":
                secure = secagg_fl.round_config(
                    self.cfg.secagg,
                    len(chosen),
                    secagg_fl.update_dim(self.weights),
                    federation=self.cfg.federation.name,
                    rnd=rnd,
                    attempt=attempt,
                )
                per_site = {
                    site: secagg_fl.config_record(secure, i + 1) for i, site in enumerate(chosen)
                }
            phase = self.board.publish(
                Kind.TRAIN,
                rnd,
                chosen,
                model_id,
                config,
                target=target,
                deadline_seconds=sel.deadline_seconds,
                per_site=per_site,
            )
            self.board.wait_phase(phase, self.stop_event)
            if self.stop_event.is_set():
                self.store.round_finished(rnd, attempt, "interrupted", failures=phase.failures)
                return True
            if len(phase.results) < sel.min_sites:
                log.warning(
                    "round %d attempt %d failed: %d result(s), %d needed; failures: %s",
                    rnd,
                    attempt,
                    len(phase.results),
                    sel.min_sites,
                    phase.failures,
                )
                self.store.round_finished(
                    rnd, attempt, "failed", succeeded=sorted(phase.results), failures=phase.failures
                )
                continue
            outcome = None
            if secure is not None:
                dropped: dict[str, str] = {}  # kept when the protocol aborts: who and why
                aborted: SecAggAborted | None = None
                try:
                    outcome = self._secure_aggregate(rnd, secure, chosen, phase, dropped)
                except SecAggAborted as e:
                    aborted = e
                if self.stop_event.is_set():  # a stop closes the stages early: not a failure
                    self.store.round_finished(rnd, attempt, "interrupted", failures=phase.failures)
                    return True
                if aborted is not None:
                    log.warning(
                        "round %d attempt %d: secure aggregation aborted: %s", rnd, attempt, aborted
                    )
                    failures = {**phase.failures, **dropped, "secure aggregation": str(aborted)}
                    self.store.round_finished(
                        rnd, attempt, "failed", succeeded=sorted(phase.results), failures=failures
                    )
                    continue
            self._complete_round(rnd, attempt, phase, start, outcome)
            return True
        raise NotEnoughSites(
            f"round {rnd} failed {sel.max_attempts} times. Fix: check the sites' logs, raise "
            "selection.deadline_seconds, or lower selection.min_sites"
        )

    def _complete_round(
        self, rnd: int, attempt: int, phase: Phase, start: float, secure: _Secure | None = None
    ) -> None:
        client_dp = self.privacy.enabled and self.cfg.dp.client is not None
        if secure is None:
            results = [
                SiteResult(list(p.arrays), int(p.metrics[NUM_EXAMPLES]))  # validated int
                for _, p in sorted(phase.results.items())
            ]
            if client_dp:  # DP-FedAvg: clipped updates, equal weights, noise on the sum
                mean = self.privacy.client_mean(
                    self.weights, [r.weights for r in results], self._min_survivors(len(results))
                )
                self.weights = self.strategy.apply(self.weights, mean)
            else:
                self.weights = self.strategy.aggregate(self.weights, results)
            train = weighted_metrics(
                [
                    (int(p.metrics[NUM_EXAMPLES]), _numbers(p.metrics))
                    for p in phase.results.values()
                ]
            )
            succeeded = sorted(phase.results)
            examples = sum(int(p.metrics[NUM_EXAMPLES]) for p in phase.results.values())
            failures = dict(phase.failures)
        else:
            mean = secagg_fl.apply_mean_update(self.weights, secure.aggregate.mean)
            if client_dp:
                mean = self.privacy.secure_mean(
                    self.weights, mean, len(secure.survivors), self._min_survivors(len(phase.tasks))
                )
            self.weights = self.strategy.apply(self.weights, mean)
            # Sites' counts are secret: their training metrics are averaged unweighted.
            train = weighted_metrics(
                [(1, _numbers(phase.results[s].metrics)) for s in secure.survivors]
            )
            succeeded, examples = secure.survivors, secure.aggregate.count
            failures = {**phase.failures, **secure.failures}
        if client_dp:
            bits = [
                float(p.metrics[CLIENT_UNCLIPPED])
                for s, p in phase.results.items()
                if s in succeeded and isinstance(p.metrics.get(CLIENT_UNCLIPPED), (int, float))
            ]
            self.privacy.update_clip(bits)
        dp_summary = self._dp_summary(rnd, succeeded, failures)
        evaluation = self._evaluate(rnd)
        traffic = self._round_traffic(rnd)
        state = self.strategy.state() if isinstance(self.strategy, FedAdam) else None
        try:
            self.store.save_checkpoint(rnd, self.names, self.weights, state)
        except CheckpointWriteError as e:
            self._checkpoint_failed(rnd, attempt, phase, e)
            raise
        self.store.round_finished(
            rnd,
            attempt,
            "ok",
            succeeded=succeeded,
            failures=failures,
            train_metrics=train,
            eval_metrics=evaluation,
        )
        self.store.event("checkpoint", rnd=rnd, weights_sha256=weights_digest(self.weights))
        record = RoundRecord(
            round=rnd,
            sites_selected=len(phase.tasks),
            sites_succeeded=len(succeeded),
            train_loss=train.get("train_loss"),
            train_accuracy=train.get("train_accuracy"),
            train_examples=examples,
            eval_loss=evaluation.get("eval_loss"),
            eval_accuracy=evaluation.get("eval_accuracy"),
            eval_examples=int(evaluation.get(NUM_EXAMPLES, 0)),
            seconds=time.time() - start,
            failures=[f"{s}: {r}" for s, r in sorted(failures.items())],
            secure_aggregation=None if secure is None else secure.summary(),
            dp=dp_summary,
            traffic=traffic,
        )
        self.history.add(record)
        self.history.save(self.cfg.state_dir / "history.json")
        acc = record.eval_accuracy
        log.info(
            "round %d/%d done: %d/%d sites, train loss %s, eval accuracy %s, %.1f s, "
            "%.3g MB down / %.3g MB up",
            rnd,
            self.cfg.federation.rounds,
            record.sites_succeeded,
            record.sites_selected,
            f"{record.train_loss:.3f}" if record.train_loss is not None else "-",
            f"{100 * acc:.1f}%" if acc is not None else "-",
            record.seconds,
            traffic["down_bytes"] / 1e6,
            traffic["up_bytes"] / 1e6,
        )

    def _checkpoint_failed(
        self, rnd: int, attempt: int, phase: Phase, e: CheckpointWriteError
    ) -> None:
        """Record (best effort: the disk may be full) that round ``rnd`` was not saved."""
        failures = {**phase.failures, "checkpoint": str(e)}
        try:
            self.store.round_finished(
                rnd, attempt, "failed", succeeded=sorted(phase.results), failures=failures
            )
            self.store.event("checkpoint_failed", rnd=rnd, error=str(e))
        except (ConfideError, OSError, sqlite3.Error) as again:
            log.error("round %d: could not record the failed checkpoint either: %s", rnd, again)

    def _min_survivors(self, selected: int) -> int:
        """Fewest sites whose updates can make up an aggregate this round (for noise shares)."""
        low = min(self.cfg.selection.min_sites, selected)
        if self.cfg.federation.secure_aggregation != "none":
            cfg = secagg_fl.round_config(
                self.cfg.secagg, selected, 1, federation=self.cfg.federation.name, rnd=0
            )
            low = min(low, cfg.threshold)
        return max(1, low)

    def _dp_summary(
        self, rnd: int, succeeded: list[str], failures: Mapping[str, str]
    ) -> dict[str, Any] | None:
        if not self.privacy.enabled:
            return None
        spent = self.privacy.spent(succeeded)
        refused = sorted(s for s, r in failures.items() if "BUDGET_EXHAUSTED" in r)
        summary: dict[str, Any] = {
            "epsilon_max_site": max(spent.values()) if spent else 0.0,
            "epsilon": spent,
            "refused": refused,
        }
        if self.privacy.clip_norm is not None:
            summary["client_clip_norm"] = self.privacy.clip_norm
        self.privacy.audit("round_finished", {"round": rnd, "succeeded": succeeded, **summary})
        log.info(
            "round %d: privacy spent so far (PRV, δ of each budget): %s%s",
            rnd,
            ", ".join(f"{s} ε={e:.3f}" for s, e in sorted(spent.items())),
            f"; refused for budget: {', '.join(refused)}" if refused else "",
        )
        return summary

    def _secure_aggregate(
        self,
        rnd: int,
        cfg: SecAggConfig,
        chosen: list[str],
        train: Phase,
        failures: dict[str, str],
    ) -> _Secure:
        """Stages 2-4 of SecAgg+ after the TRAIN phase (stage 1: the sites' public keys).

        Each stage is a phase of SECAGG tasks with its own deadline; a site that misses
        one, or sends something the protocol refuses, counts as dropped from then on; its
        reason goes into ``failures``, the caller's, so an aborted round names it too.
        The coordinator only ever holds masked vectors and, at the end, their sum.
        """
        ids = {site: i + 1 for i, site in enumerate(chosen)}
        names = {i: site for site, i in ids.items()}
        server = SecAggServer(cfg)

        def feed(phase: Phase, add: Callable[[Payload], None]) -> None:
            for site, payload in sorted(phase.results.items()):
                try:
                    add(payload)
                except ProtocolViolation as e:
                    failures[site] = f"secure aggregation: {e}"
                    log.warning("round %d: %s dropped from secure aggregation: %s", rnd, site, e)
            for site, reason in phase.failures.items():
                failures.setdefault(site, f"secure aggregation: {reason}")

        def stage(number: int, records: Mapping[int, secagg_fl.Record]) -> Phase:
            sites = [names[i] for i in sorted(records)]
            phase = self.board.publish(
                Kind.SECAGG,
                rnd,
                sites,
                "",
                {"secagg.stage": number, **secagg_fl.config_record(cfg, 0)},
                target=len(sites),
                deadline_seconds=self.cfg.secagg.stage_deadline_seconds,
                per_site={names[i]: {"secagg.site": i, **r} for i, r in records.items()},
            )
            self.board.wait_phase(phase, self.stop_event)
            log.info(
                "round %d: secure aggregation stage %d (%s): %d/%d sites",
                rnd,
                number,
                secagg_fl.STAGES[number],
                len(phase.results),
                len(sites),
            )
            return phase

        feed(train, lambda p: server.add_advert(secagg_fl.advert_from_record(p.metrics)))
        keys = server.key_lists()
        shared = stage(2, {i: secagg_fl.adverts_record(a) for i, a in keys.items()})
        feed(shared, lambda p: server.add_shared(secagg_fl.shared_from_record(p.metrics)))
        boxes = server.share_boxes()
        masked = stage(3, {i: secagg_fl.boxes_record(b) for i, b in boxes.items()})
        feed(
            masked,
            lambda p: server.add_masked(secagg_fl.masked_from_record(p.metrics, p.arrays[0])),
        )
        masked_in = len(server.survivors())
        if masked_in < self.cfg.selection.min_sites:  # (the protocol's own floor is t)
            raise SecAggAborted(
                f"only {masked_in} sites sent a valid masked input; selection.min_sites is "
                f"{self.cfg.selection.min_sites}, so their sum is not unmasked"
            )
        requests = server.unmask_requests()
        unmasked = stage(4, {i: secagg_fl.to_record(r) for i, r in requests.items()})
        replies: list[UnmaskReply] = []
        feed(unmasked, lambda p: replies.append(secagg_fl.reply_from_record(p.metrics)))
        aggregate = server.unmask(replies)
        for i in aggregate.excluded:
            failures[names[i]] = (
                "secure aggregation: excluded (a share it sent failed authentication)"
            )
        survivors = [names[i] for i in aggregate.survivors]
        for site in survivors:
            failures.pop(site, None)  # e.g. missed the unmask stage: its input still counts
        return _Secure(cfg, aggregate, survivors, failures)

    def _evaluate(self, rnd: int) -> dict[str, float]:
        ev = self.cfg.evaluation
        if ev.fraction <= 0 or rnd % ev.every != 0:
            return {}
        sites = self.board.connected()
        if not sites:
            return {}
        rng = np.random.default_rng([self.cfg.federation.seed, rnd, 99])
        k = max(1, round(ev.fraction * len(sites)))
        chosen = sorted(str(s) for s in rng.choice(sites, size=k, replace=False))
        model_id = self._publish_model(rnd)
        phase = self.board.publish(
            Kind.EVALUATE,
            rnd,
            chosen,
            model_id,
            {"server-round": rnd},
            target=len(chosen),
            deadline_seconds=ev.deadline_seconds,
        )
        self.board.wait_phase(phase, self.stop_event)
        pairs = [
            (int(p.metrics[NUM_EXAMPLES]), _numbers(p.metrics))
            for p in phase.results.values()
            if int(p.metrics[NUM_EXAMPLES]) > 0
        ]
        out = weighted_metrics(pairs)
        out[NUM_EXAMPLES] = float(sum(n for n, _ in pairs))
        out["sites"] = float(len(pairs))
        return out

    def _finish(self) -> None:
        self.board.finish()
        self.store.event("finished", rnd=self.cfg.federation.rounds)
        log.info("federation %s finished; telling the sites to stop", self.cfg.federation.name)
        from confide.sims.report import plot_history

        if self.history.rounds:
            plot_history(self.history, self.cfg.state_dir / "metrics.png")
        end = time.monotonic() + 2 * self.cfg.server.max_poll_seconds
        while time.monotonic() < end and not self.board.all_stopped():
            time.sleep(0.2)

    def _history_from_store(self) -> History:
        history = History(task=self.cfg.federation.model, strategy=self.cfg.federation.strategy)
        history.meta["federation"] = self.cfg.federation.name
        traffic = {e["round"]: e for e in self.store.events("traffic")}
        for row in self.store.rounds():
            if row.status != "ok":
                continue
            history.add(
                RoundRecord(
                    round=row.round,
                    sites_selected=len(row.selected),
                    sites_succeeded=len(row.succeeded),
                    train_loss=row.train_metrics.get("train_loss"),
                    train_accuracy=row.train_metrics.get("train_accuracy"),
                    eval_loss=row.eval_metrics.get("eval_loss"),
                    eval_accuracy=row.eval_metrics.get("eval_accuracy"),
                    seconds=(row.finished or row.started) - row.started,
                    traffic=_traffic_of(traffic.get(row.round)),
                )
            )
        return history


@dataclass
class _Secure:
    """The outcome of a securely aggregated round."""

    config: SecAggConfig
    aggregate: Aggregate
    survivors: list[str]
    failures: dict[str, str]

    def summary(self) -> dict[str, Any]:
        a = self.aggregate
        return {
            "mode": "full" if self.config.full else "secagg+",
            "neighbours": self.config.neighbours,
            "threshold": self.config.threshold,
            "survivors": len(a.survivors),
            "dropped": len(a.dropped),
            "excluded": len(a.excluded),
            "error_bound": a.error_bound,
        }


def _traffic_of(event: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A round's traffic as recorded in the store's ``traffic`` event."""
    if event is None:
        return None
    return {k: event[k] for k in ("up_bytes", "down_bytes", "messages", "by_method") if k in event}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != NUM_EXAMPLES
    }


def configure_logging(state_dir: Path, *, json_lines: bool = False) -> None:
    """Log to stderr and to ``state_dir/coordinator.log`` (text or JSON lines)."""
    logger = logging.getLogger("confide")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt: logging.Formatter = (
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    for handler in (
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(state_dir / "coordinator.log"),
    ):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False
