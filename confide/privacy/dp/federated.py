"""DP in a federation: the ``[dp]`` settings, the per-round plan sent to sites, and events.

Shared by the coordinator, the site agent, the built-in ClientApps and the in-process
engine, so every side reads the same keys and builds the same ledger events:

* :class:`DpSettings` is the ``[dp]`` section of a federation (or simulation) config:
  ``[dp.example]`` turns on example-level DP-SGD at every site (Opacus, Poisson sampling,
  per-sample clipping); ``[dp.client]`` turns on client-level DP-FedAvg (sites clip their
  update; noise central or distributed). Either, or both.
* :meth:`DpSettings.resolve` fixes every noise multiplier before round 1: a
  ``target_epsilon`` is solved for the *whole federation* (every round, a site that is
  selected in all of them), so no site can exceed it by taking part more often.
* :func:`round_config` is what the coordinator adds to each round's train config
  (``dp.*`` keys, plain Flower config values); :func:`plan_from_config` is how a site
  reads it back, and :meth:`DpPlan.planned_events` the events the site checks against its
  budget *before* it trains (fail closed).
* A ClientApp that applied DP-SGD says so in its reply metrics (:data:`SGD_REPLY_KEYS`);
  :func:`sgd_event_from_metrics` turns that into the ledger event and refuses a reply that
  used less noise, a higher sampling rate or more steps than the plan.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from confide.config import fix
from confide.privacy.dp.accounting import DpError, DpEvent, epsilon

# --- the wire keys ----------------------------------------------------------------------

PREFIX = "dp."
FEDERATION = "dp.federation"
DELTA = "dp.delta"
SGD_NOISE = "dp.sgd.noise-multiplier"
SGD_RATE = "dp.sgd.sample-rate"
SGD_STEPS = "dp.sgd.steps"
SGD_CLIP = "dp.sgd.clip"
DATASET_SIZE = "dp.dataset-size"
CLIENT_NOISE = "dp.client.noise-multiplier"
CLIENT_CLIP = "dp.client.clip"
CLIENT_MODE = "dp.client.noise"
CLIENT_MIN_SURVIVORS = "dp.client.min-survivors"
CLIENT_ADAPTIVE = "dp.client.adaptive"
#: Reply metric of a site under adaptive clipping: 1.0 when its update was within C.
CLIENT_UNCLIPPED = "dp.client.unclipped"
#: Upload config key: the site's ledger events of the round (JSON list) for the mirror.
EVENTS = "dp.events"

#: Metrics a ClientApp returns after DP-SGD: what it actually did (σ, q, steps, C, N).
SGD_REPLY_KEYS = (SGD_NOISE, SGD_RATE, SGD_STEPS, SGD_CLIP, DATASET_SIZE)

Arrays = Sequence[npt.NDArray[Any]]

#: Relative slack when comparing a reply's σ and q with the plan (float round trips).
_TOLERANCE = 1e-9


class DpPlanError(DpError, ValueError):
    """A round's DP plan, or a reply against it, is not acceptable; nothing is released."""


# --- settings -----------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExampleDpSettings(_Section):
    """``[dp.example]``: DP-SGD at every site (example-level DP)."""

    noise_multiplier: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use σ > 0 (noise std / clipping norm; 1.0 is typical), or set target_epsilon"
        ),
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use the ε a site may spend over the whole federation (e.g. 3.0), or set "
            "noise_multiplier instead"
        ),
    )
    clip_norm: float = Field(
        1.0, gt=0, json_schema_extra=fix("use a per-example gradient norm bound > 0, e.g. 1.0")
    )
    sample_rate: float = Field(
        0.01,
        gt=0,
        le=1,
        json_schema_extra=fix(
            "use the Poisson sampling rate q in (0, 1]: the expected batch is q x the site's "
            "examples (e.g. 0.01)"
        ),
    )
    steps_per_round: int | None = Field(
        None,
        ge=1,
        json_schema_extra=fix("use a whole number of DP-SGD steps >= 1, or set local_epochs"),
    )
    local_epochs: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use a number of passes > 0 (steps = ceil(epochs / sample_rate)), or set "
            "steps_per_round"
        ),
    )

    @model_validator(mode="after")
    def _one_of(self) -> ExampleDpSettings:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "set exactly one of noise_multiplier and target_epsilon in [dp.example]"
            )
        if self.steps_per_round is not None and self.local_epochs is not None:
            raise ValueError("set steps_per_round or local_epochs in [dp.example], not both")
        return self

    @property
    def steps(self) -> int:
        """DP-SGD steps per round: ``steps_per_round``, or one pass by default."""
        if self.steps_per_round is not None:
            return self.steps_per_round
        epochs = self.local_epochs if self.local_epochs is not None else 1.0
        return max(1, math.ceil(epochs / self.sample_rate - 1e-9))


class ClientLevelSettings(_Section):
    """``[dp.client]``: DP-FedAvg (client-level DP); see docs/privacy.md for the modes."""

    noise: Literal["central", "distributed"] = Field(
        "central",
        json_schema_extra=fix(
            "use central (the coordinator adds the noise to the sum) or distributed (each "
            "site adds its share; works under secure aggregation)"
        ),
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix("use z > 0 (noise std / clip on the sum), or set target_epsilon"),
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use the client-level ε over the whole federation, or set noise_multiplier"
        ),
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        json_schema_extra=fix("use an update norm bound C > 0 (the initial C if adaptive)"),
    )
    adaptive: bool = Field(
        False,
        json_schema_extra=fix("true: C tracks a quantile of the update norms (Andrew et al.)"),
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, json_schema_extra=fix("use a quantile in (0, 1), e.g. 0.5")
    )
    clip_learning_rate: float = Field(
        0.2, gt=0, json_schema_extra=fix("use a positive rate, e.g. 0.2")
    )
    clip_count_stddev: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use the noise std on the count of unclipped sites (default: sites per round / 20)"
        ),
    )

    @model_validator(mode="after")
    def _one_of(self) -> ClientLevelSettings:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "set exactly one of noise_multiplier and target_epsilon in [dp.client]"
            )
        if self.adaptive and self.noise == "distributed":
            raise ValueError(
                "adaptive clipping needs the unclipped-count bit in the clear, so it works "
                "with noise = central only; use a fixed clip_norm with distributed noise"
            )
        return self


class DpSettings(_Section):
    """``[dp]``: differential privacy of a federation (off unless a sub-table is given)."""

    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        json_schema_extra=fix("use δ in (0, 1), well below 1 / (examples per site), e.g. 1e-5"),
    )
    example: ExampleDpSettings | None = Field(
        None, json_schema_extra=fix("see the [dp.example] keys in docs/privacy.md")
    )
    client: ClientLevelSettings | None = Field(
        None, json_schema_extra=fix("see the [dp.client] keys in docs/privacy.md")
    )

    @property
    def enabled(self) -> bool:
        return self.example is not None or self.client is not None

    def resolve(self, rounds: int) -> ResolvedDp:
        """Fix every noise multiplier for a federation of ``rounds`` rounds."""
        sgd_sigma = client_z = None
        if self.example is not None:
            ex = self.example
            sgd_sigma = ex.noise_multiplier
            if sgd_sigma is None:
                assert ex.target_epsilon is not None
                sgd_sigma = solve_sigma(
                    ex.target_epsilon,
                    self.delta,
                    ex.sample_rate,
                    ex.steps * rounds,
                    field="dp.example.target_epsilon",
                )
        if self.client is not None:
            cl = self.client
            client_z = cl.noise_multiplier
            if client_z is None:
                assert cl.target_epsilon is not None
                client_z = solve_sigma(
                    cl.target_epsilon, self.delta, 1.0, rounds, field="dp.client.target_epsilon"
                )
        return ResolvedDp(self, rounds, sgd_sigma, client_z)


@dataclass(frozen=True)
class ResolvedDp:
    """:class:`DpSettings` with every noise multiplier fixed (what rounds are planned with)."""

    settings: DpSettings
    rounds: int
    sgd_noise_multiplier: float | None
    client_noise_multiplier: float | None

    def worst_case_epsilon(self) -> float:
        """ε of a site selected in every round (both levels composed), at the δ of [dp]."""
        return epsilon(self.planned_events("-", 0, rounds=self.rounds), self.settings.delta)

    def planned_events(
        self,
        federation: str,
        rnd: int,
        *,
        rounds: int = 1,
        dataset_size: int = 1,
        clip_norm: float | None = None,
    ) -> list[DpEvent]:
        s = self.settings
        out: list[DpEvent] = []
        now = time.time()
        if s.example is not None and self.sgd_noise_multiplier is not None:
            out.append(
                DpEvent(
                    "dp-sgd",
                    self.sgd_noise_multiplier,
                    s.example.sample_rate,
                    s.example.steps * rounds,
                    s.example.clip_norm,
                    s.delta,
                    dataset_size,
                    federation or "-",
                    rnd,
                    now,
                )
            )
        if s.client is not None and self.client_noise_multiplier is not None:
            out.append(
                DpEvent(
                    "dp-fedavg",
                    self.client_noise_multiplier,
                    1.0,
                    rounds,
                    clip_norm if clip_norm is not None else s.client.clip_norm,
                    s.delta,
                    dataset_size,
                    federation or "-",
                    rnd,
                    now,
                )
            )
        return out

    def summary(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {"delta": s.delta, "rounds": self.rounds}
        if s.example is not None:
            out["example"] = {
                "noise_multiplier": self.sgd_noise_multiplier,
                "sample_rate": s.example.sample_rate,
                "steps_per_round": s.example.steps,
                "clip_norm": s.example.clip_norm,
                "target_epsilon": s.example.target_epsilon,
            }
        if s.client is not None:
            out["client"] = {
                "noise": s.client.noise,
                "noise_multiplier": self.client_noise_multiplier,
                "clip_norm": s.client.clip_norm,
                "adaptive": s.client.adaptive,
                "target_epsilon": s.client.target_epsilon,
            }
        return out


def solve_sigma(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, *, field: str
) -> float:
    """The smallest σ (to 0.1 %) whose PRV ε after ``steps`` steps at rate q is ≤ the target
    (RDP brackets it, PRV finishes; :func:`confide.privacy.dp.client.solve_noise_multiplier`)."""
    from confide.privacy.dp.client import solve_noise_multiplier

    return solve_noise_multiplier(target_epsilon, delta, sample_rate, steps, field=field)


# --- the round plan on the wire --------------------------------------------------------


def round_config(
    dp: ResolvedDp,
    federation: str,
    *,
    min_survivors: int,
    client_clip_norm: float | None = None,
) -> dict[str, Any]:
    """The ``dp.*`` keys added to a round's train config (plain Flower config values)."""
    s = dp.settings
    out: dict[str, Any] = {FEDERATION: federation, DELTA: s.delta}
    if s.example is not None and dp.sgd_noise_multiplier is not None:
        out.update(
            {
                SGD_NOISE: dp.sgd_noise_multiplier,
                SGD_RATE: s.example.sample_rate,
                SGD_STEPS: s.example.steps,
                SGD_CLIP: s.example.clip_norm,
            }
        )
    if s.client is not None and dp.client_noise_multiplier is not None:
        out.update(
            {
                CLIENT_NOISE: dp.client_noise_multiplier,
                CLIENT_CLIP: client_clip_norm if client_clip_norm else s.client.clip_norm,
                CLIENT_MODE: s.client.noise,
                CLIENT_MIN_SURVIVORS: int(min_survivors),
                CLIENT_ADAPTIVE: bool(s.client.adaptive),
            }
        )
    return out


@dataclass(frozen=True)
class SgdPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float


@dataclass(frozen=True)
class ClientPlan:
    noise_multiplier: float
    clip_norm: float
    noise: str
    min_survivors: int
    adaptive: bool


@dataclass(frozen=True)
class DpPlan:
    """One round's DP plan as a site reads it from the train config."""

    federation: str
    round: int
    delta: float
    sgd: SgdPlan | None
    client: ClientPlan | None

    def planned_events(self, dataset_size: int = 1) -> list[DpEvent]:
        """The events the round would add to the site's ledger (checked before training)."""
        now = time.time()
        out = []
        if self.sgd is not None:
            p = self.sgd
            out.append(
                DpEvent(
                    "dp-sgd",
                    p.noise_multiplier,
                    p.sample_rate,
                    p.steps,
                    p.clip_norm,
                    self.delta,
                    max(1, dataset_size),
                    self.federation,
                    self.round,
                    now,
                )
            )
        if self.client is not None:
            out.append(self.client_event(max(1, dataset_size), now))
        return out

    def client_event(self, dataset_size: int, now: float | None = None) -> DpEvent:
        assert self.client is not None
        c = self.client
        return DpEvent(
            "dp-fedavg",
            c.noise_multiplier,
            1.0,
            1,
            c.clip_norm,
            self.delta,
            max(1, dataset_size),
            self.federation,
            self.round,
            time.time() if now is None else now,
        )


def _number(config: Mapping[str, Any], key: str) -> float:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DpPlanError(f"the round's DP plan has no valid {key!r} (got {v!r})")
    return float(v)


def plan_from_config(config: Mapping[str, Any], rnd: int) -> DpPlan | None:
    """The round's DP plan from a train config, or None when the round asks for no DP."""
    if not any(k in config for k in (SGD_NOISE, CLIENT_NOISE)):
        return None
    federation = str(config.get(FEDERATION) or "-")
    delta = _number(config, DELTA)
    sgd = client = None
    if SGD_NOISE in config:
        sgd = SgdPlan(
            _number(config, SGD_NOISE),
            _number(config, SGD_RATE),
            int(_number(config, SGD_STEPS)),
            _number(config, SGD_CLIP),
        )
    if CLIENT_NOISE in config:
        client = ClientPlan(
            _number(config, CLIENT_NOISE),
            _number(config, CLIENT_CLIP),
            str(config.get(CLIENT_MODE, "central")),
            int(_number(config, CLIENT_MIN_SURVIVORS)),
            bool(config.get(CLIENT_ADAPTIVE, False)),
        )
    plan = DpPlan(federation, int(rnd), delta, sgd, client)
    try:
        plan.planned_events()  # validates every value the way the ledger will
    except DpError as e:
        raise DpPlanError(f"the round's DP plan is invalid: {e}") from None
    if client is not None and client.noise not in ("central", "distributed"):
        raise DpPlanError(f"unknown client-level noise mode {client.noise!r}")
    return plan


def sgd_from_config(config: Mapping[str, Any]) -> SgdPlan | None:
    """ClientApp side: the DP-SGD parameters of this round, or None (train without DP)."""
    if SGD_NOISE not in config:
        return None
    return SgdPlan(
        _number(config, SGD_NOISE),
        _number(config, SGD_RATE),
        int(_number(config, SGD_STEPS)),
        _number(config, SGD_CLIP),
    )


def sgd_reply_metrics(plan: SgdPlan, steps: int, dataset_size: int) -> dict[str, float | int]:
    """What a ClientApp reports after DP-SGD (the site agent turns it into the event)."""
    return {
        SGD_NOISE: plan.noise_multiplier,
        SGD_RATE: plan.sample_rate,
        SGD_STEPS: int(steps),
        SGD_CLIP: plan.clip_norm,
        DATASET_SIZE: int(dataset_size),
    }


def sgd_event_from_metrics(plan: DpPlan, metrics: Mapping[str, Any]) -> DpEvent:
    """The DP-SGD event a reply reports, checked against the plan.

    A reply without the keys did not apply DP-SGD; one with less noise, a higher rate, a
    larger clipping norm or more steps than planned spent more than was checked against
    the budget. Both raise :class:`DpPlanError`, and the site must not release the result.
    """
    assert plan.sgd is not None
    missing = [k for k in SGD_REPLY_KEYS if k not in metrics]
    if missing:
        raise DpPlanError(
            "the round asks for example-level DP, but the ClientApp's reply does not report "
            f"DP-SGD ({', '.join(missing)} missing): it did not train privately. Fix: host a "
            "ClientApp that applies DP-SGD (the built-in apps do)"
        )
    p = plan.sgd
    sigma, q = _number(metrics, SGD_NOISE), _number(metrics, SGD_RATE)
    steps, clip = int(_number(metrics, SGD_STEPS)), _number(metrics, SGD_CLIP)
    n = int(_number(metrics, DATASET_SIZE))
    if (
        sigma < p.noise_multiplier * (1 - _TOLERANCE)
        or q > p.sample_rate * (1 + _TOLERANCE)
        or steps > p.steps
        or clip > p.clip_norm * (1 + _TOLERANCE)
    ):
        raise DpPlanError(
            f"the ClientApp reports DP-SGD with σ={sigma:g}, q={q:g}, {steps} steps, C={clip:g}, "
            f"beyond the round's plan (σ≥{p.noise_multiplier:g}, q≤{p.sample_rate:g}, "
            f"≤{p.steps} steps, C≤{p.clip_norm:g}): the result is withheld"
        )
    if steps < 1:
        raise DpPlanError("the ClientApp reports 0 DP-SGD steps")
    return DpEvent(
        "dp-sgd",
        sigma,
        q,
        steps,
        clip,
        plan.delta,
        max(1, n),
        plan.federation,
        plan.round,
        time.time(),
    )


def events_to_json(events: Iterable[DpEvent]) -> str:
    return json.dumps([e.to_dict() | {"uid": e.uid} for e in events], sort_keys=True)


def events_from_json(text: str) -> list[dict[str, Any]]:
    """Parse an uploaded ``dp.events`` value (a JSON list of event dicts) without trusting it."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:  # RecursionError: "[[[[..."
        raise DpPlanError(f"{EVENTS!r} is not JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise DpPlanError(f"{EVENTS!r} must be a JSON list of events")
    return data


def strip_dp_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the ``dp.*`` keys (they are consumed by the site agent)."""
    return {k: v for k, v in values.items() if not k.startswith(PREFIX)}


# --- client-level aggregation (the coordinator's and the in-process engine's) --------------


class ClientAggregator:
    """DP-FedAvg on the aggregating side: equal weights, re-clipping, noise, adaptive C.

    The maths is :mod:`confide.privacy.dp.client`'s (clipping, the noisy mean, the noisy
    count of unclipped sites, the geometric clip update); this class holds one
    federation's state. Noise comes from the operating system's entropy
    (:func:`~confide.privacy.dp.client.secure_rng`), never from a federation seed: a seeded
    noise stream could be regenerated and subtracted by anyone who knows the seed.
    """

    def __init__(self, plan: ResolvedDp, state: Mapping[str, Any] | None = None) -> None:
        from confide.privacy.dp import client as dpc

        client = plan.settings.client
        if client is None or plan.client_noise_multiplier is None:
            raise ValueError("ClientAggregator needs a [dp.client] plan")
        self.settings = client
        self.library = dpc.ClientDpSettings(
            noise=client.noise,
            noise_multiplier=plan.client_noise_multiplier,
            clip_norm=client.clip_norm,
            adaptive=client.adaptive,
            target_quantile=client.target_quantile,
            clip_learning_rate=client.clip_learning_rate,
            clip_count_stddev=client.clip_count_stddev,
            delta=plan.settings.delta,
        )
        self.clip = (
            dpc.AdaptiveClipState.from_dict(state)
            if state
            else dpc.AdaptiveClipState.start(self.library)
        )
        self._rng = dpc.secure_rng()

    @property
    def clip_norm(self) -> float:
        return self.clip.clip_norm

    def _mean(self, total: list[np.ndarray], m: int, min_survivors: int) -> list[np.ndarray]:
        from confide.privacy.dp import client as dpc

        return dpc.noisy_mean(
            total,
            m,
            self.library,
            self.clip_norm,
            self._rng,
            add_noise=True,
            expected_clients=m,
            min_survivors=min_survivors,
        )

    def client_mean(
        self, global_weights: Arrays, updates: Sequence[Arrays], min_survivors: int
    ) -> list[np.ndarray]:
        """The next mean model from the sites' models (no secure aggregation)."""
        from confide.privacy.dp import client as dpc

        floats = _float_positions(global_weights)
        total = [np.zeros(global_weights[i].shape, np.float64) for i in floats]
        for arrays in updates:
            delta = [np.asarray(arrays[i], np.float32) - global_weights[i] for i in floats]
            if self.settings.noise == "central":  # a trusted aggregator enforces C itself too
                delta = list(dpc.clip_update(delta, self.clip_norm).arrays)
            for t, d in zip(total, delta, strict=True):
                t += d
        return _apply(global_weights, floats, self._mean(total, len(updates), min_survivors))

    def secure_mean(
        self, global_weights: Arrays, mean: Arrays, m: int, min_survivors: int
    ) -> list[np.ndarray]:
        """Under secure aggregation ``mean`` is global + Σ clipped Δ / m (every site sends
        the same weight); central mode adds the noise here, distributed mode carries it."""
        floats = _float_positions(global_weights)
        total = [(np.asarray(mean[i], np.float64) - global_weights[i]) * m for i in floats]
        return _apply(global_weights, floats, self._mean(total, m, min_survivors))

    def update_clip(self, bits: Sequence[float]) -> dict[str, float] | None:
        """Adaptive clipping: C ← C·exp(−η·(b̃ − γ)) from the noisy count b̃ of sites whose
        update was within C; returns what changed, or None when C is fixed."""
        from confide.privacy.dp import client as dpc

        if not self.settings.adaptive or not bits:
            return None
        m = len(bits)
        noisy = dpc.noisy_bit_sum(
            float(sum(bits)), self.library, self._rng, expected_clients=m, add_noise=True
        )
        old = self.clip_norm
        self.clip.update(noisy, m)
        return {"old": old, "new": self.clip_norm, "noisy_fraction": noisy / m}


def _float_positions(arrays: Arrays) -> list[int]:
    return [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]


def _apply(
    global_weights: Arrays, floats: list[int], deltas: Sequence[np.ndarray]
) -> list[np.ndarray]:
    out = [np.array(g, copy=True) for g in global_weights]
    for i, d in zip(floats, deltas, strict=True):
        out[i] = (np.asarray(global_weights[i], np.float64) + d).astype(global_weights[i].dtype)
    return out
