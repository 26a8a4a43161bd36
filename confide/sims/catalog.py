"""The price and hardware catalog of the cost model: every number with its source and date.

The catalog ships as ``confide/sims/catalog.toml`` (package data). Each number in it is
a table ``{value = ..., source = "...", date = YYYY-MM-DD}``; a bare number, or one
without a source or a date, is a :class:`~confide.errors.ConfigError` naming the key
and the fix, so no figure of an estimate is ever unaccounted for. A user overrides any
number, or adds a profile, with the same shape under ``[cost.catalog]`` of an estimate
config (:func:`load_catalog`); an override replaces the whole number, so it needs its
own source too ("user" is a fine source, but it must be given).

The hardware profile ``local`` means "this machine": it is not in the file but made
from a calibration (:mod:`confide.sims.calibrate`) or from ``/proc/cpuinfo``
(:func:`detect_local`), see :meth:`Catalog.with_local`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from confide.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "LOCAL",
    "Catalog",
    "DatacenterMode",
    "Hardware",
    "LocalMachine",
    "Network",
    "Number",
    "Region",
    "Server",
    "default_catalog",
    "detect_local",
    "load_catalog",
    "merge_overrides",
]

LOCAL = "local"
"""Name of the hardware profile that stands for the machine running Confide."""

_NUMBER_FIX = (
    '{value = NUMBER, source = "where it comes from (URL, document or user)", date = "YYYY-MM-DD"}'
)


class Number(BaseModel):
    """A catalog number: its value, where it comes from and the date of that source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: float = Field(allow_inf_nan=False)
    source: str = Field(min_length=1)
    date: dt.date

    @model_validator(mode="before")
    @classmethod
    def _not_bare(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            raise ValueError("a bare number has no source and date")
        source = data.get("source") if isinstance(data, Mapping) else None
        if isinstance(source, str) and not source.strip():
            raise ValueError("the source is empty")
        return data

    @property
    def cite(self) -> str:
        """``source (date)``, for reports."""
        return f"{self.source} ({self.date.isoformat()})"


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Priced(_Entry):
    """Priced by the hour (cloud) or by purchase amortised over a life (on premises)."""

    usd_per_hour: Number | None = None
    capex_usd: Number | None = None
    life_years: Number | None = None

    @model_validator(mode="after")
    def _one_price(self) -> _Priced:
        if (self.usd_per_hour is None) == (self.capex_usd is None):
            raise ValueError("give exactly one of usd_per_hour (cloud) and capex_usd (on premises)")
        if self.capex_usd is not None and (self.life_years is None or self.life_years.value <= 0):
            raise ValueError("capex_usd needs life_years > 0 to amortise it over")
        return self

    @property
    def cloud(self) -> bool:
        return self.usd_per_hour is not None

    def usd_per_second(self) -> float:
        """Rent per second (cloud), or purchase price spread over every second of its life."""
        if self.usd_per_hour is not None:
            return self.usd_per_hour.value / 3600.0
        assert self.capex_usd is not None and self.life_years is not None
        return self.capex_usd.value / (self.life_years.value * 365.0 * 24.0 * 3600.0)


class Hardware(_Priced):
    """A site's (or the central trainer's) compute device."""

    description: str = ""
    kind: Literal["cpu", "gpu"]
    flops: Number  # peak FP32 FLOP/s
    watts: Number
    utilization: Number | None = None  # achieved / peak; default by kind


class Network(_Entry):
    """A site's link to the coordinator."""

    description: str = ""
    down_bps: Number
    up_bps: Number
    rtt_seconds: Number
    usd_per_gb: Number | None = None  # metered links only

    @model_validator(mode="after")
    def _positive(self) -> Network:
        if self.down_bps.value <= 0 or self.up_bps.value <= 0:
            raise ValueError("down_bps and up_bps must be > 0")
        return self


class Region(_Entry):
    """Where power comes from: grid carbon intensity and electricity price."""

    description: str = ""
    grid_g_co2_per_kwh: Number
    usd_per_kwh: Number


class Server(_Priced):
    """A coordinator server type."""

    description: str = ""
    mode: Literal["cloud", "onprem"]
    watts: Number
    bandwidth_bps: Number
    max_sites: Number


class DatacenterMode(_Entry):
    """Prices of one way of running the datacenter (cloud or on premises)."""

    pue: Number
    storage_usd_per_gb_month: Number
    egress_usd_per_gb: Number


class Datacenter(_Entry):
    cloud_server: str
    onprem_server: str
    cloud: DatacenterMode
    onprem: DatacenterMode


class Energy(_Entry):
    network_kwh_per_gb: Number
    site_pue: Number


class Defaults(_Entry):
    utilization_cpu: Number
    utilization_gpu: Number
    dp_factor: Number
    train_flops_per_parameter: Number
    forward_fraction: Number
    aggregation_seconds_per_parameter: Number
    aggregation_seconds_per_parameter_site: Number
    secagg_mask_seconds_per_parameter: Number
    secagg_mask_seconds_per_parameter_peer: Number
    secagg_unmask_seconds_per_parameter_mask: Number
    ledger_bytes_per_site_round: Number
    local_watts_per_core: Number


class Catalog(_Entry):
    """The whole catalog, validated; look entries up with the ``*_profile`` methods."""

    hardware: dict[str, Hardware]
    network: dict[str, Network]
    region: dict[str, Region]
    server: dict[str, Server]
    datacenter: Datacenter
    energy: Energy
    defaults: Defaults
    dp_factor: dict[str, Number] = Field(default_factory=dict)

    def hardware_profile(self, name: str, field: str) -> Hardware:
        return _lookup(self.hardware, name, field, "hardware")

    def network_profile(self, name: str, field: str) -> Network:
        return _lookup(self.network, name, field, "network")

    def region_profile(self, name: str, field: str) -> Region:
        return _lookup(self.region, name, field, "region")

    def server_profile(self, name: str, field: str) -> Server:
        return _lookup(self.server, name, field, "server")

    def utilization(self, hw: Hardware) -> Number:
        if hw.utilization is not None:
            return hw.utilization
        return self.defaults.utilization_cpu if hw.kind == "cpu" else self.defaults.utilization_gpu

    def with_local(self, machine: LocalMachine) -> Catalog:
        """This catalog with the profile ``local`` made from ``machine`` (unless overridden)."""
        if LOCAL in self.hardware:
            return self
        today = dt.date.today()
        per_core = self.defaults.local_watts_per_core
        local = Hardware(
            description=f"this machine: {machine.cpu}, {machine.cores} cores",
            kind="cpu",
            flops=Number(value=machine.peak_flops, source=machine.peak_source, date=today),
            watts=Number(
                value=per_core.value * machine.cores,
                source=f"{machine.cores} cores x {per_core.value} W ({per_core.source})",
                date=per_core.date,
            ),
            capex_usd=Number(
                value=0.0,
                source="this machine is already owned (override [cost.catalog.hardware.local])",
                date=today,
            ),
            life_years=Number(value=5.0, source="irrelevant at capex 0", date=today),
            utilization=machine.utilization,
        )
        return self.model_copy(update={"hardware": {**self.hardware, LOCAL: local}})


_T = TypeVar("_T")


def _lookup(table: Mapping[str, _T], name: str, field: str, what: str) -> _T:
    try:
        return table[name]
    except KeyError:
        extra = " (or run `confide sim calibrate` for `local`)" if what == "hardware" else ""
        raise ConfigError(
            field,
            f"unknown {what} profile {name!r}",
            f"use one of: {', '.join(sorted(table))}{extra}, or add [cost.catalog.{what}.{name}]",
        ) from None


# --- this machine ---------------------------------------------------------------------


@dataclass(frozen=True)
class LocalMachine:
    """The machine Confide runs on, as the profile ``local`` sees it."""

    cpu: str
    cores: int
    ghz: float
    flops_per_cycle: int  # FP32 per core: 32 with AVX-512 (2 FMA units), 16 AVX2, 8 SSE
    peak_flops: float
    peak_source: str
    utilization: Number | None = None  # from a calibration


def detect_local(cpuinfo: str | None = None, cores: int | None = None) -> LocalMachine:
    """This machine's FP32 peak from ``/proc/cpuinfo``: cores x clock x FLOP per cycle.

    FLOP per cycle assumes two FMA units per core (``avx512f``: 16 lanes x 2 x 2 = 32;
    ``avx2`` + ``fma``: 16; otherwise 8). The clock is the ``cpu MHz`` line, which on a
    virtual machine is the nominal clock; turbo is not counted, so a measured
    utilization can exceed 1 slightly.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
    model = platform.processor() or platform.machine()
    mhz = 0.0
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine()):
            model = value.strip()
        elif key == "cpu MHz" and not mhz:
            with contextlib.suppress(ValueError):
                mhz = float(value)
        elif key == "flags" and not flags:
            flags = set(value.split())
    per_cycle = 32 if "avx512f" in flags else 16 if {"avx2", "fma"} <= flags else 8
    ghz = mhz / 1000.0 if mhz > 0 else 2.0
    clock = f"{ghz:g} GHz" if mhz > 0 else "2 GHz (no clock in /proc/cpuinfo: assumed)"
    return LocalMachine(
        cpu=model,
        cores=cores,
        ghz=ghz,
        flops_per_cycle=per_cycle,
        peak_flops=cores * ghz * 1e9 * per_cycle,
        peak_source=f"/proc/cpuinfo: {cores} cores x {clock} x {per_cycle} FP32 FLOP/cycle",
    )


# --- loading ----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, Mapping) and "value" in value


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it; a number is replaced whole, never merged.

    Replacing whole is what makes an override carry its own source: ``{value = 2}`` over
    a sourced number stays without a source and is rejected.
    """
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and not _is_number(value):
            if _is_number(old):
                out[key] = dict(value)
            else:
                out[key] = merge_overrides(old, value)
        else:
            out[key] = value
    return out


def _error(err: ValidationError, prefix: str) -> ConfigError:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    # Errors inside a number name the number (flops), not its part (flops.source).
    part = loc[-1] if loc else ""
    number = loc[:-1] if part in ("source", "date", "value") and len(loc) > 1 else loc
    key = prefix + ".".join(number) if number else prefix.rstrip(".") or "catalog"
    leaf = number[-1] if number else "number"
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return ConfigError(
            prefix + ".".join(loc),
            "unknown key",
            "remove it, or check its spelling against confide/sims/catalog.toml",
        )
    if e["type"] == "missing" and part in ("source", "date"):
        return ConfigError(
            key, f"has no {part}", f"every number names its source and date: {leaf} = {_NUMBER_FIX}"
        )
    if "bare number" in msg or (part == "source" and "empty" in msg):
        return ConfigError(key, msg, f"write {leaf} = {_NUMBER_FIX}")
    if part == "date":
        return ConfigError(key, f"the date is not YYYY-MM-DD ({msg})", "write date = 2024-06-01")
    if "exactly one of" in msg:
        return ConfigError(
            key,
            msg,
            "a profile is either cloud (usd_per_hour) or on premises (capex_usd, life_years); "
            "to price an existing one the other way, add a profile under a new name",
        )
    if e["type"] == "missing":
        return ConfigError(
            key, "missing", "add it; see confide/sims/catalog.toml for the shape of each section"
        )
    got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], Mapping) else ""
    return ConfigError(
        key, f"{msg}{got}", f"see confide/sims/catalog.toml; numbers are {_NUMBER_FIX}"
    )


def _base() -> dict[str, Any]:
    text = resources.files("confide.sims").joinpath("catalog.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_catalog(
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    prefix: str | None = None,
) -> Catalog:
    """The built-in catalog (or ``base``) with ``overrides`` applied, validated.

    Errors name the key as the user wrote it: ``prefix`` + the dotted path, where the
    prefix defaults to ``cost.catalog.`` when there are overrides (the built-in file is
    checked by the tests, so an error then means an override) and to nothing otherwise.
    """
    raw = dict(base) if base is not None else _base()
    if overrides:
        raw = merge_overrides(raw, overrides)
    if prefix is None:
        prefix = "cost.catalog." if overrides else ""
    try:
        return Catalog.model_validate(raw)
    except ValidationError as e:
        raise _error(e, prefix) from None


@functools.cache
def default_catalog() -> Catalog:
    """The built-in catalog, parsed once per process (it is immutable)."""
    return load_catalog()
