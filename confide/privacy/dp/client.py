"""Client-level differential privacy (DP-FedAvg): clip, noise, adapt the clip and account.

Pure NumPy and no transport: the coordinator and the site agent call these functions; the
maths lives here so it can be tested on its own. The algorithm is DP-FedAvg (McMahan, Ramage,
Talwar and Zhang 2018, "Learning differentially private recurrent language models") with the
optional adaptive clipping norm of Andrew, Thakkar, McMahan and Ramaswamy (2021,
"Differentially private learning with adaptive clipping").

One round
---------
1. Each selected site trains and computes its update Δᵢ = trained − global over the floating
   arrays, and clips it to L2 norm at most C (:func:`clip_update`).
2. The clipped updates are summed, and Gaussian noise of std z_Δ·C is added to the *sum*
   (:func:`central_noise_stddev`). With ``noise = "central"`` the coordinator adds it
   (:func:`noisy_mean`); it then sees the un-noised sum, so it must be trusted. With
   ``noise = "distributed"`` every site adds a share N(0, (z_Δ·C)²/min_survivors) to its
   own clipped update before secure aggregation (:func:`distributed_noise_share`), so the
   coordinator only ever sees a sum that already carries the full noise.
3. The noisy sum is divided by the number of sites: Δ̄ = (ΣΔᵢ + noise) / m.

What is protected. ε is *client-level*: it bounds what the released model reveals about
everything a site contributed in a round (all of its examples at once), under the
add/remove-one-site relation in its "zero-out" form (Kairouz et al. 2021): a site's
contribution is compared with a null one (a zero update, and an unclipped-bit of ½, see
below). The sum of clipped updates changes by at most C in L2, so noise z·C on the sum is
the Gaussian mechanism with noise multiplier z.

Why uniform weights. FedAvg usually weights a site by its number of examples. DP-FedAvg does
not: a site's weight is itself private data, and a weighted sum Σ wᵢΔᵢ has sensitivity
max(wᵢ)·C, which is unbounded unless the weights are capped; the weight would also reveal
the site's size. Every site therefore counts once (McMahan et al. 2018 use a capped weight
with a fixed denominator; with uniform weights that cap is 1). Under secure aggregation the
sites must be given weight 1 too.

Adaptive clipping
-----------------
C tracks the γ-quantile of the update norms. Each site reports the bit bᵢ = 1[‖Δᵢ‖ ≤ C]
(as a float 0.0/1.0, so it can ride inside a secure-aggregation vector,
:func:`unclipped_bit`); the sum of bits gets Gaussian noise of std σ_b (central: added by
the coordinator, :func:`noisy_bit_sum`; distributed: shares from the sites,
:func:`bit_noise_share`); the noisy fraction b̄ = (Σbᵢ + noise)/m drives the geometric
update C ← C·exp(−η_C·(b̄ − γ)) (:class:`AdaptiveClipState`).

The bit is a second release about the site, so it costs privacy. Against the null
contribution (bit ½, equivalently the centred bits bᵢ − ½ that TensorFlow Federated sums)
the bit sum has sensitivity ½, i.e. noise multiplier 2σ_b. Releasing both Gaussian
mechanisms is one Gaussian mechanism of multiplier z with z⁻² = z_Δ⁻² + (2σ_b)⁻² (Andrew et
al. 2021, Theorem 1), so to keep the requested z the updates get the larger
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (:func:`update_noise_multiplier`). That is only possible when
2σ_b > z. σ_b defaults to (clients per round)/20 as in the paper; in a small cross-silo
federation (10 sites, z = 1: 2σ_b = 1) that is too small, so set ``clip_count_stddev``
explicitly: σ_b ≥ 1.2·z keeps z_Δ within 10 % of z. Every function that needs σ_b or z_Δ
takes the same ``expected_clients`` (the number of sites selected for the round): the
coordinator and the sites must pass the same value, or the split no longer adds up to z.

Accounting
----------
:func:`round_event` is the ledger event of one round for one site: mechanism
``"dp-fedavg"``, noise multiplier z (the whole round's effective multiplier; the adaptive
split keeps it z), ``steps = 1`` and ``sample_rate = 1``. No amplification by sampling is
claimed: the coordinator chooses the sites, and its choice is neither secret nor a random
process the analysis could rely on (amplification needs Poisson sampling whose outcome the
adversary does not see). Instead each site records one event for every round it takes part
in, so a site that sits out rounds spends less, and a site selected in every round spends
the most. :func:`noise_multiplier_for` solves for the z of a target ε over a number of
rounds; :func:`solve_noise_multiplier` is the same search for any (q, steps), e.g. DP-SGD.

Distributed noise: what it does and does not cover
--------------------------------------------------
* Each site adds variance (z_Δ·C)²/min_survivors, so the sum of any k ≥ min_survivors shares
  has variance k/min_survivors·(z_Δ·C)² ≥ (z_Δ·C)². Dropouts only remove shares, so choosing
  min_survivors at most the number of sites whose sum can be released is conservative: with
  more survivors there is more noise than needed (less accuracy), never less. A sum of fewer
  than min_survivors shares must not be released; :func:`noisy_mean` refuses it.
* Sites that collude with the coordinator can subtract their own shares: with t colluders,
  the others are protected by (k − t)/min_survivors of the noise variance.
* Secure aggregation quantizes each value and clips it per coordinate (``[secagg] clip``).
  Keep that clip well above C plus several share standard deviations, or the clipping
  changes the noise distribution and the guarantee no longer follows.

Randomness. Sites must draw noise that nobody can predict: :func:`secure_rng` seeds NumPy's
PCG64 with 256 bits from the operating system's CSPRNG. PCG64 is not itself a cryptographic
generator, and the noise is sampled in floating point without the mitigations against
floating-point attacks on DP (Mironov 2012; Jin et al. 2022); neither is exploitable from
the released aggregate alone, but both are noted here for the auditor.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from confide.config import first_error, fix
from confide.errors import ConfigError
from confide.privacy.dp.accounting import DpError, DpEvent, epsilon

Array = npt.NDArray[Any]
NoiseMode = Literal["central", "distributed"]

#: The noise multipliers :func:`solve_noise_multiplier` searches between.
Z_MIN = 0.1
Z_MAX = 100.0
#: Relative tolerance of the solvers on z.
SOLVER_RTOL = 1e-3
#: Paper default: σ_b = expected clients per round / 20 (Andrew et al. 2021, section 3).
CLIENTS_PER_UNIT_BIT_STDDEV = 20.0


class InvalidUpdate(DpError, ValueError):
    """An update (or a sum of updates) cannot be privatized; nothing was released."""

    def __init__(self, array: str, problem: str, fix: str) -> None:
        self.array = array
        super().__init__(f"{array}: {problem}. Fix: {fix}")


class InsufficientNoise(DpError, RuntimeError):
    """A noisy sum would carry less noise than was accounted for; it must not be released."""


class ClipStateCorrupted(DpError, ValueError):
    """A checkpointed :class:`AdaptiveClipState` is not valid; the coordinator must not guess."""


# --- settings ------------------------------------------------------------------------------


class ClientDpSettings(BaseModel):
    """Client-level DP (DP-FedAvg): noise placement, z, C, adaptive clipping and δ."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise: NoiseMode = Field(
        json_schema_extra=fix(
            "use central (the coordinator adds the noise to the sum; it must be trusted) or "
            "distributed (each site adds a share before secure aggregation)"
        ),
    )
    noise_multiplier: float = Field(
        gt=0,
        allow_inf_nan=False,
        json_schema_extra=fix(
            "use z > 0: the noise std on the sum of clipped updates divided by clip_norm "
            "(1.0 is typical), or solve it from a target ε with noise_multiplier_for"
        ),
    )
    clip_norm: float = Field(
        gt=0,
        allow_inf_nan=False,
        json_schema_extra=fix(
            "use a bound C > 0 on a site's update L2 norm (initial C if adaptive)"
        ),
    )
    adaptive: bool = Field(
        False,
        json_schema_extra=fix("use true to let C track target_quantile of the update norms"),
    )
    target_quantile: float = Field(
        0.5,
        gt=0,
        lt=1,
        json_schema_extra=fix(
            "use the fraction γ of sites whose update should be unclipped, e.g. 0.5"
        ),
    )
    clip_learning_rate: float = Field(
        0.2,
        gt=0,
        allow_inf_nan=False,
        json_schema_extra=fix("use a step η_C > 0 of the geometric clip update, e.g. 0.2"),
    )
    clip_count_stddev: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        json_schema_extra=fix(
            "use σ_b > noise_multiplier / 2 (σ_b >= 1.2 x noise_multiplier keeps the update "
            "noise within 10 % of z), or leave it unset for sites per round / 20"
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        json_schema_extra=fix("use δ in (0, 1), well below 1 / (number of sites), e.g. 1e-5"),
    )

    @field_validator("clip_count_stddev")
    @classmethod
    def _count_noise_leaves_room(cls, v: float | None, info: ValidationInfo) -> float | None:
        z = info.data.get("noise_multiplier")
        if v is not None and info.data.get("adaptive") and z is not None and 2 * v <= z:
            raise ValueError(
                f"2 x clip_count_stddev = {2 * v:g} must exceed noise_multiplier = {z:g}, or "
                "the clip-count release alone would spend more than the whole round's budget"
            )
        return v

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, section: str | None = None) -> ClientDpSettings:
        """Validate ``data``; an invalid value is a :class:`ConfigError` naming the field.

        ``section`` (e.g. ``"dp.client"``) prefixes the field name in the message.
        """
        try:
            return cls(**dict(data))
        except ValidationError as e:
            err = first_error(e, cls)
            if section:
                raise ConfigError(f"{section}.{err.field}", err.problem, err.fix) from None
            raise err from None


# --- clipping (site side) ------------------------------------------------------------------


@dataclass(frozen=True)
class ClippedUpdate:
    """An update clipped to L2 norm at most C.

    ``norm`` is the norm *before* clipping, ``scale`` the factor applied to every floating
    array (1.0 when not clipped) and ``clipped`` whether the norm exceeded C.
    """

    arrays: list[Array]
    norm: float
    scale: float
    clipped: bool

    @property
    def unclipped_bit(self) -> float:
        """The adaptive-clipping bit of this update: 1.0 if ‖Δ‖ ≤ C, else 0.0."""
        return 0.0 if self.clipped else 1.0


def _is_float(a: Array) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def _label(i: int, a: Array, names: Sequence[str] | None) -> str:
    name = names[i] if names is not None and i < len(names) else f"array {i}"
    return f"update {name} (shape {tuple(a.shape)}, {a.dtype})"


def _sum_squares(arrays: Sequence[Array], names: Sequence[str] | None) -> float:
    total = 0.0
    for i, a in enumerate(arrays):
        if not _is_float(a):
            continue
        flat = a.astype(np.float64, copy=False).reshape(-1)
        # Squares of finite float32/float16 values cannot overflow in float64, so a
        # non-finite sum means a NaN or an infinity: one pass finds both.
        s = float(flat @ flat)
        if not math.isfinite(s):
            problem = (
                "contains NaN or infinite values"
                if not np.isfinite(flat).all()
                else "has values so large that its norm overflows float64"
            )
            raise InvalidUpdate(
                _label(i, a, names),
                problem,
                "the local training diverged; lower the learning rate or leave this site out "
                "of the round (nothing was sent)",
            )
        total += s
    return total


def update_norm(arrays: Sequence[Array], *, names: Sequence[str] | None = None) -> float:
    """Global L2 norm of the floating arrays of an update (integer arrays are not counted).

    Computed in float64. NaN or infinity in any array is an :class:`InvalidUpdate` naming it.
    """
    return math.sqrt(_sum_squares([np.asarray(a) for a in arrays], names))


def clip_update(
    arrays: Sequence[Array], clip_norm: float, *, names: Sequence[str] | None = None
) -> ClippedUpdate:
    """Scale the floating arrays of an update Δ so its global L2 norm is at most ``clip_norm``.

    ``arrays`` is the update Δ = trained − global, one array per model array, in model order.
    Floating arrays keep their dtype (float32 in, float32 out). Integer arrays (counters such
    as ``num_batches_tracked``) are returned untouched and are not counted in the norm: they
    are not privatized, so they must never be released (Confide keeps their global value,
    see ``confide.privacy.secagg.federated``). An update within C is returned as is, bit for
    bit and without copying.
    """
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ConfigError("clip_norm", f"must be a finite C > 0 (got {clip_norm!r})", "pass C > 0")
    arrs = [np.asarray(a) for a in arrays]
    norm = math.sqrt(_sum_squares(arrs, names))
    if norm <= clip_norm:
        return ClippedUpdate(arrs, norm, 1.0, False)
    # Rounding the scaled values to their dtype (and the float64 norm itself) can push the
    # result a few ulps above C; shrinking the factor by that bound keeps ‖clip(Δ)‖ ≤ C, the
    # sensitivity the noise is calibrated to, instead of C·(1 + 1e-7).
    floats = [a for a in arrs if _is_float(a)]
    ulp = max(float(np.finfo(a.dtype).eps) for a in floats)
    size = sum(a.size for a in floats)
    scale = clip_norm / norm * (1.0 - 2.0 * ulp - size * float(np.finfo(np.float64).eps))
    out = [(a * scale).astype(a.dtype, copy=False) if _is_float(a) else a for a in arrs]
    return ClippedUpdate(out, norm, scale, True)


def unclipped_bit(norm: float, clip_norm: float) -> float:
    """Site side of adaptive clipping: bᵢ = 1.0 if ‖Δᵢ‖ ≤ C else 0.0 (a float for secagg)."""
    return 1.0 if norm <= clip_norm else 0.0


# --- randomness and noise ------------------------------------------------------------------


def secure_rng(seed: int | None = None) -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG (``secrets``).

    ``seed`` is for tests only: noise from a known seed can be subtracted by anyone who
    knows it, which removes the privacy entirely.
    """
    entropy = secrets.randbits(256) if seed is None else seed
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float, dtype: Any) -> Array:
    dt = np.dtype(dtype)
    # The generator draws float32 or float64 only; other float dtypes are cast afterwards.
    draw = dt if dt == np.float64 else np.dtype(np.float32)
    noise = rng.standard_normal(shape, dtype=draw)
    noise *= std
    return noise.astype(dt, copy=False)


def bit_noise_stddev(settings: ClientDpSettings, expected_clients: int | None = None) -> float:
    """σ_b: ``clip_count_stddev``, or expected clients per round / 20 when it is unset."""
    if settings.clip_count_stddev is not None:
        return settings.clip_count_stddev
    if expected_clients is None or expected_clients < 1:
        raise ConfigError(
            "clip_count_stddev",
            "is unset, so it depends on the number of sites per round, which was not given",
            "set clip_count_stddev, or pass expected_clients (the sites selected for the "
            "round, the same value on the coordinator and every site)",
        )
    return expected_clients / CLIENTS_PER_UNIT_BIT_STDDEV


def adaptive_update_noise_multiplier(noise_multiplier: float, bit_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update multiplier that keeps the round at z.

    Raises :class:`ConfigError` (field ``clip_count_stddev``) when 2σ_b ≤ z.
    """
    z, sb = noise_multiplier, bit_stddev
    if not 2 * sb > z:
        raise ConfigError(
            "clip_count_stddev",
            f"2 x σ_b = {2 * sb:g} does not exceed noise_multiplier z = {z:g}, so no update "
            "noise can keep the round's total privacy at z",
            f"set clip_count_stddev above {z / 2:g} (e.g. {1.2 * z:.3g}, which raises the "
            "update noise by at most 10 %), select more sites per round, or turn adaptive off",
        )
    return float((z**-2 - (2 * sb) ** -2) ** -0.5)


def update_noise_multiplier(
    settings: ClientDpSettings, expected_clients: int | None = None
) -> float:
    """z_Δ, the multiplier of the noise on the update sum: z, raised when adaptive."""
    if not settings.adaptive:
        return settings.noise_multiplier
    return adaptive_update_noise_multiplier(
        settings.noise_multiplier, bit_noise_stddev(settings, expected_clients)
    )


def central_noise_stddev(
    settings: ClientDpSettings, clip_norm: float, *, expected_clients: int | None = None
) -> float:
    """Std of the Gaussian noise on the sum of clipped updates: z·C (z_Δ·C when adaptive)."""
    return update_noise_multiplier(settings, expected_clients) * clip_norm


def _check_survivors(min_survivors: int) -> None:
    if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) or min_survivors < 1:
        raise ConfigError(
            "min_survivors",
            f"must be an integer >= 1 (got {min_survivors!r})",
            "pass the smallest number of sites whose sum the coordinator may release",
        )


def distributed_noise_share(
    shapes: Sequence[tuple[int, ...]],
    noise_multiplier: float,
    clip_norm: float,
    min_survivors: int,
    rng: np.random.Generator,
    *,
    dtype: Any = np.float32,
) -> list[Array]:
    """One site's noise share: N(0, (z·C)²/min_survivors) per coordinate, one array per shape.

    Pass z_Δ (:func:`update_noise_multiplier`) as ``noise_multiplier``. The sum of k ≥
    ``min_survivors`` shares has variance k/min_survivors·(z·C)² ≥ (z·C)²: dropouts leave
    more noise than needed, never less.
    """
    _check_survivors(min_survivors)
    std = noise_multiplier * clip_norm / math.sqrt(min_survivors)
    return [_normal(rng, tuple(s), std, dtype) for s in shapes]


def bit_noise_share(bit_stddev: float, min_survivors: int, rng: np.random.Generator) -> float:
    """One site's noise share for its unclipped bit: N(0, σ_b²/min_survivors) (distributed)."""
    _check_survivors(min_survivors)
    return float(rng.normal(0.0, bit_stddev / math.sqrt(min_survivors)))


def noisy_bit_sum(
    bit_sum: float,
    settings: ClientDpSettings,
    rng: np.random.Generator,
    *,
    expected_clients: int | None = None,
    add_noise: bool,
) -> float:
    """Server side of adaptive clipping: Σbᵢ + N(0, σ_b²) in central mode.

    In distributed mode the sum of the sites' bits already carries the noise, and nothing
    is added. ``add_noise=False`` also adds nothing (tests only in central mode).
    """
    if not math.isfinite(bit_sum):
        raise InvalidUpdate("the unclipped-bit sum", f"is {bit_sum!r}", "discard the round")
    if not add_noise or settings.noise != "central":
        return float(bit_sum)
    return float(bit_sum + rng.normal(0.0, bit_noise_stddev(settings, expected_clients)))


@dataclass(frozen=True)
class PrivatizedUpdate:
    """What a site sends: its clipped (distributed: and noised) update, and its clip bit.

    ``bit`` is None unless clipping is adaptive: a bit nobody needs must not be sent.
    """

    arrays: list[Array]
    bit: float | None
    norm: float
    clipped: bool


def privatize_update(
    update: Sequence[Array],
    settings: ClientDpSettings,
    *,
    clip_norm: float,
    rng: np.random.Generator,
    expected_clients: int | None = None,
    min_survivors: int | None = None,
    names: Sequence[str] | None = None,
) -> PrivatizedUpdate:
    """Everything a site does in one call: clip, compute its bit, add its shares if distributed.

    Central mode returns the clipped update and the raw bit (the coordinator adds noise).
    Distributed mode adds the update share and, when adaptive, the bit share; it needs
    ``min_survivors`` (and ``expected_clients`` when σ_b is the default).
    """
    clipped = clip_update(update, clip_norm, names=names)
    arrays = clipped.arrays
    bit = clipped.unclipped_bit if settings.adaptive else None
    if settings.noise == "distributed":
        if min_survivors is None:
            raise ConfigError(
                "min_survivors",
                "distributed noise needs the smallest number of sites whose sum is released",
                "pass the round's min_survivors (the same value the coordinator enforces)",
            )
        z = update_noise_multiplier(settings, expected_clients)
        floats = [a for a in arrays if _is_float(a)]
        shares = iter(
            distributed_noise_share(
                [a.shape for a in floats], z, clip_norm, min_survivors, rng, dtype=np.float64
            )
        )
        arrays = [(a + next(shares)).astype(a.dtype) if _is_float(a) else a for a in arrays]
        if bit is not None:
            bit += bit_noise_share(bit_noise_stddev(settings, expected_clients), min_survivors, rng)
    return PrivatizedUpdate(arrays, bit, clipped.norm, clipped.clipped)


# --- aggregation (server side) -------------------------------------------------------------


def noisy_mean(
    sum_of_clipped: Sequence[Array],
    num_clients: int,
    settings: ClientDpSettings,
    clip_norm: float,
    rng: np.random.Generator,
    *,
    add_noise: bool,
    expected_clients: int | None = None,
    min_survivors: int | None = None,
) -> list[Array]:
    """Δ̄ = (ΣΔᵢ + N(0, (z_Δ·C)²)) / m in central mode; ΣΔᵢ / m in distributed mode.

    ``sum_of_clipped`` is the unweighted sum of the m = ``num_clients`` clipped updates
    (floating arrays only: integer arrays carry no privacy and are refused). Every site
    counts once, whatever its size (see the module docstring). In distributed mode the sum
    already carries the noise, so the server adds nothing, and a sum of fewer than
    ``min_survivors`` sites (which must be given) is refused with
    :class:`InsufficientNoise`. ``add_noise=False`` in central mode releases no privacy and
    is for tests.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(
            "num_clients",
            f"must be an integer >= 1 (got {num_clients!r})",
            "pass the number of sites whose updates are in the sum",
        )
    arrs = [np.asarray(a) for a in sum_of_clipped]
    for i, a in enumerate(arrs):
        if not _is_float(a):
            raise InvalidUpdate(
                _label(i, a, None),
                "is not a floating array, and only floating arrays are clipped and noised",
                "aggregate floating arrays only and keep the global value of integer arrays",
            )
    _sum_squares(arrs, None)  # NaN/Inf check
    if settings.noise == "distributed":
        if min_survivors is None:
            raise InsufficientNoise(
                "distributed noise: min_survivors was not given, so the noise in the sum "
                "cannot be checked. Fix: pass the round's min_survivors"
            )
        if num_clients < min_survivors:
            raise InsufficientNoise(
                f"the sum holds {num_clients} site(s) but the noise shares were sized for at "
                f"least {min_survivors}; releasing it would spend more privacy than recorded. "
                "Fix: discard the round (do not apply it)"
            )
        return [a / a.dtype.type(num_clients) for a in arrs]
    if not add_noise:
        return [a / a.dtype.type(num_clients) for a in arrs]
    std = central_noise_stddev(settings, clip_norm, expected_clients=expected_clients)
    return [(a + _normal(rng, a.shape, std, a.dtype)) / a.dtype.type(num_clients) for a in arrs]


# --- adaptive clipping state (server side) -------------------------------------------------


@dataclass
class AdaptiveClipState:
    """The adaptive clipping norm C between rounds, checkpointed by the coordinator.

    ``round`` counts the updates applied so far. :meth:`update` applies one round's noisy
    bit sum; :meth:`to_dict` / :meth:`from_dict` round-trip through JSON.
    """

    clip_norm: float
    target_quantile: float
    clip_learning_rate: float
    round: int = 0

    def __post_init__(self) -> None:
        _check_state(self)

    @classmethod
    def start(cls, settings: ClientDpSettings) -> AdaptiveClipState:
        """The state before round 1: C = ``settings.clip_norm``."""
        return cls(settings.clip_norm, settings.target_quantile, settings.clip_learning_rate)

    def update(self, noisy_bit_sum: float, num_clients: int) -> float:
        """C ← C·exp(−η_C·(b̄ − γ)) with b̄ = noisy_bit_sum / num_clients; returns the new C.

        ``num_clients`` is the number of sites whose bits are in the sum. b̄ is not clamped
        to [0, 1]: the noise is part of the estimate, and the geometric step stays bounded.
        """
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(
                "num_clients",
                f"must be an integer >= 1 (got {num_clients!r})",
                "pass the number of sites whose bits are in the sum",
            )
        if not math.isfinite(noisy_bit_sum):
            raise InvalidUpdate(
                "the noisy unclipped-bit sum",
                f"is {noisy_bit_sum!r}",
                "discard the round and keep C",
            )
        fraction = noisy_bit_sum / num_clients
        new = self.clip_norm * math.exp(
            -self.clip_learning_rate * (fraction - self.target_quantile)
        )
        if not (math.isfinite(new) and new > 0):
            raise InvalidUpdate(
                "the adaptive clip norm", f"would become {new!r}", "discard the round and keep C"
            )
        self.clip_norm = new
        self.round += 1
        return new

    def to_dict(self) -> dict[str, Any]:
        return {
            "clip_norm": self.clip_norm,
            "target_quantile": self.target_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "round": self.round,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptiveClipState:
        keys = ("clip_norm", "target_quantile", "clip_learning_rate", "round")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ClipStateCorrupted(
                f"adaptive clip checkpoint lacks {', '.join(missing)}. Fix: restore the "
                "checkpoint from the coordinator's state directory, or restart from clip_norm"
            )
        return cls(*(data[k] for k in keys))


def _check_state(s: AdaptiveClipState) -> None:
    def bad(field: str, rule: str) -> ClipStateCorrupted:
        return ClipStateCorrupted(
            f"adaptive clip state {field}={getattr(s, field)!r} {rule}. Fix: restore the "
            "checkpoint from the coordinator's state directory, or restart from clip_norm"
        )

    def real(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not real(s.clip_norm) or s.clip_norm <= 0:
        raise bad("clip_norm", "must be a finite number > 0")
    if not real(s.target_quantile) or not 0 < s.target_quantile < 1:
        raise bad("target_quantile", "must be in (0, 1)")
    if not real(s.clip_learning_rate) or s.clip_learning_rate <= 0:
        raise bad("clip_learning_rate", "must be a finite number > 0")
    if isinstance(s.round, bool) or not isinstance(s.round, int) or s.round < 0:
        raise bad("round", "must be an integer >= 0")


# --- accounting ----------------------------------------------------------------------------


def round_event(
    settings: ClientDpSettings,
    *,
    clip_norm: float,
    dataset_size: int,
    federation: str,
    round: int,
    time: float,
    site: str | None = None,
    note: str | None = None,
) -> DpEvent:
    """The ledger event of one DP-FedAvg round for one site that took part.

    Noise multiplier z (the round's effective multiplier, adaptive or not), q = 1, one step;
    ``clip_norm`` is the C of this round. See the module docstring for why q = 1.
    """
    return DpEvent(
        mechanism="dp-fedavg",
        noise_multiplier=settings.noise_multiplier,
        sample_rate=1.0,
        steps=1,
        clip_norm=clip_norm,
        delta=settings.delta,
        dataset_size=dataset_size,
        federation=federation,
        round=round,
        time=time,
        site=site,
        note=note,
    )


def _quiet_epsilon(events: list[DpEvent], delta: float, method: Literal["prv", "rdp"]) -> float:
    # Far from the answer ε is huge; the accountants then warn about overflow or about the
    # RDP orders. Those points only steer the search, and a non-finite ε counts as too big.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        e = epsilon(events, delta, method)
    return e if math.isfinite(e) else math.inf


def solve_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    mechanism: str = "dp-sgd",
    field: str = "target_epsilon",
) -> float:
    """The smallest σ in [0.1, 100] (to 0.1 %) with PRV ε(σ, q, steps) ≤ ``target_epsilon``.

    For DP-SGD: q = batch / examples, steps = optimizer steps; for DP-FedAvg use
    :func:`noise_multiplier_for`. RDP, which overstates ε, brackets the answer cheaply; the
    PRV accountant (the ε budgets are enforced with) finishes it, so ε at the result is
    ≤ the target and within a fraction of a percent of it. When even σ = 0.1 meets the
    target, 0.1 is returned (a smaller σ is no meaningful protection). A target that
    σ = 100 cannot meet is a :class:`ConfigError` naming ``field``.
    """
    if not _real(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(
            field,
            f"must be a finite ε > 0 (got {target_epsilon!r})",
            "use the ε a site may spend, e.g. 3.0",
        )
    if not _real(delta) or not 0 < delta < 1:
        raise ConfigError("delta", f"must be in (0, 1) (got {delta!r})", "use e.g. 1e-5")
    if not _real(sample_rate) or not 0 < sample_rate <= 1:
        raise ConfigError(
            "sample_rate",
            f"must be in (0, 1] (got {sample_rate!r})",
            "use the Poisson sampling rate q, e.g. 0.01",
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            "steps",
            f"must be an integer >= 1 (got {steps!r})",
            "use the number of noisy steps (rounds for DP-FedAvg)",
        )

    def events(z: float) -> list[DpEvent]:
        return [DpEvent(mechanism, z, sample_rate, steps, 1.0, delta, 1, "-", 0, 0.0)]

    def unreachable() -> ConfigError:
        return ConfigError(
            field,
            f"ε = {target_epsilon:g} at δ = {delta:g} is out of reach even with noise "
            f"multiplier {Z_MAX:g} over {steps} step(s) at sample rate {sample_rate:g}",
            "raise the target ε, or plan fewer rounds/steps or a lower sample rate",
        )

    return _solve(
        lambda z: _quiet_epsilon(events(z), delta, "rdp"),
        lambda z: _quiet_epsilon(events(z), delta, "prv"),
        target_epsilon,
        unreachable,
    )


def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, *, field: str = "target_epsilon"
) -> float:
    """The smallest z with ε(``rounds`` DP-FedAvg rounds at q = 1) ≤ ``target_epsilon``.

    ``rounds`` is the number of rounds a site may take part in (all of them for the worst
    case), since each one is an event in its ledger.
    """
    return solve_noise_multiplier(
        target_epsilon, delta, 1.0, rounds, mechanism="dp-fedavg", field=field
    )


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _solve(
    rdp: Callable[[float], float],
    prv: Callable[[float], float],
    target: float,
    unreachable: Callable[[], ConfigError],
) -> float:
    """Smallest z in [Z_MIN, Z_MAX] with prv(z) ≤ target, to SOLVER_RTOL; ε decreases in z.

    RDP ≥ PRV, so the RDP root is an upper bracket for PRV, found in milliseconds. PRV is
    evaluated only near the answer, where log ε is nearly linear in log z: each step probes
    the secant (first: RDP-slope) prediction ± 0.4 tolerance, so a good prediction closes
    the bracket at once, and a bisection step is taken whenever the bracket stalls. The
    returned z is always one whose PRV ε was computed and found ≤ target.
    """
    if rdp(Z_MIN) <= target:
        return Z_MIN
    tol = math.log1p(SOLVER_RTOL)
    if rdp(Z_MAX) > target:
        hi = Z_MAX
    else:
        lo_u, hi_u = math.log(Z_MIN), math.log(Z_MAX)
        while hi_u - lo_u > math.log1p(0.01):
            mid = (lo_u + hi_u) / 2
            if rdp(math.exp(mid)) <= target:
                hi_u = mid
            else:
                lo_u = mid
        hi = math.exp(hi_u)
    f_hi = prv(hi)
    while not f_hi <= target:  # PRV's discretization slack can exceed RDP's looseness
        if hi >= Z_MAX:
            raise unreachable()
        hi = min(Z_MAX, hi * 1.02)
        f_hi = prv(hi)
    slope = math.log(rdp(hi * 1.01) / rdp(hi)) / math.log1p(0.01)
    if not (math.isfinite(slope) and slope < 0):
        slope = -1.0
    lo, lo_known = Z_MIN, False  # lo_known: prv(lo) > target was seen (else lo is the limit)
    points = [(math.log(hi), math.log(f_hi / target))]  # (log z, log ε/target), finite only
    width = math.inf
    for _ in range(60):
        if hi <= Z_MIN:
            return Z_MIN
        u_lo, u_hi = math.log(lo), math.log(hi)
        if lo_known and u_hi - u_lo <= tol:
            return hi
        if lo_known and u_hi - u_lo > 0.5 * width:
            guess = (u_lo + u_hi) / 2
        elif len(points) >= 2 and points[-1][1] != points[-2][1]:
            (u1, g1), (u2, g2) = points[-2], points[-1]
            guess = u2 - g2 * (u2 - u1) / (g2 - g1)
        else:
            guess = points[-1][0] - points[-1][1] / slope
        width = u_hi - u_lo if lo_known else math.inf

        probes = sorted({min(max(guess + d, u_lo), u_hi) for d in (-0.4 * tol, 0.4 * tol)})
        # Strictly inside the bracket; the lower limit Z_MIN itself may be probed until a
        # z with ε > target is known.
        probes = [u for u in probes if (u > u_lo or (not lo_known and u == u_lo)) and u < u_hi]
        if not probes:
            probes = [(u_lo + u_hi) / 2 if lo_known else max(u_lo, u_hi - tol)]
        for u in probes:
            z = max(Z_MIN, min(hi, math.exp(u)))
            f = prv(z)
            if f <= target:
                hi, f_hi = z, f
            elif z > lo or not lo_known:
                lo, lo_known = z, True
            if math.isfinite(f):
                points.append((math.log(z), math.log(f / target)))
    return hi
