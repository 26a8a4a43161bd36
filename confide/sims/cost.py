"""The cost model of a federation: time, bytes, energy, CO2 and dollars, without training.

:func:`estimate` prices the run an :class:`EstimateConfig` describes (``[sim]``, the keys
of ``confide sim run``, plus ``[cost]``) against a :class:`~confide.sims.catalog.Catalog`:

* **work** per site and round: training FLOPs per example (torch's ``FlopCounterMode``
  on one forward + backward of a built-in model, LSTMs analytically, or 6 x parameters
  for a custom model) x examples processed x the DP-SGD factor, over the device's peak
  FLOP/s x utilization; evaluation at a third of that; secure-aggregation masking;
* **bytes** from the real message sizes (:mod:`confide.sims.wirebytes`), turned into
  seconds by each site's bandwidth and round-trip time;
* **rounds** by Monte Carlo, whole arrays at once: each draw picks the available sites
  (Bernoulli), selects ``ceil(K (1 + over_selection))`` of them, lets some drop, closes
  when ``K`` have returned or at the deadline, aggregates, then evaluates; sites that
  share one host (``colocated``) share its throughput (processor sharing);
* **energy** (device watts x busy time x PUE, kWh/GB of traffic, the coordinator's
  servers), **CO2** by each region's grid and **dollars** by site (cloud rent, or
  purchase amortised over its life plus electricity) and by the datacenter (servers,
  storage, egress), with 3- and 5-year TCO against training centrally.

Everything here is a pure function of its inputs: no transport, no global state (the
FLOP count of a built-in model is cached per name). docs/cost-model.md states every
formula and assumption.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from confide.client.tasks import TASKS
from confide.config import first_error, fix, load_toml
from confide.errors import ConfigError
from confide.privacy.secagg.federated import SecAggSettings, round_config
from confide.sims.catalog import (
    LOCAL,
    Catalog,
    Hardware,
    LocalMachine,
    Network,
    Number,
    Region,
    default_catalog,
    detect_local,
    load_catalog,
)
from confide.sims.config import SimRunConfig
from confide.sims.wirebytes import (
    DEFAULT_CHUNK_BYTES,
    ArraySpec,
    model_arrays,
    round_traffic,
    stream_size,
    synthetic_arrays,
)

__all__ = [
    "Calibration",
    "CentralPlan",
    "CentralSettings",
    "CostSettings",
    "CustomModel",
    "DatacenterPlan",
    "DatacenterSettings",
    "Estimate",
    "EstimateConfig",
    "GroupEstimate",
    "ModelCost",
    "Percentiles",
    "SiteGroup",
    "Tco",
    "builtin_train_flops",
    "estimate",
    "estimate_run",
    "example_batch",
    "load_calibration",
    "load_estimate_config",
    "lstm_train_flops",
    "model_cost",
    "resolve_catalog",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

SECONDS_PER_HOUR = 3600.0
HOURS_PER_YEAR = 8760.0
GB = 1e9  # bytes; network energy and prices are per decimal GB
J_PER_KWH = 3.6e6

#: Training examples of each built-in task's data set (what its loader yields, before a
#: site's evaluation hold-out), counted with the loaders on the build machine.
TASK_TRAIN_EXAMPLES: Mapping[str, int] = {
    "mnist-cnn": 60_000,
    "shakespeare-lstm": 10_048,  # 80-character windows of the 232 roles with enough text
    "shakespeare-transformer": 10_048,
    "credit-lstm": 24_000,  # 30,000 customers, 20 % held out as the central test set
    "credit-transformer": 24_000,
}
#: Bytes of one raw training example (what training centrally would move and store).
TASK_EXAMPLE_BYTES: Mapping[str, int] = {
    "mnist-cnn": 785,  # 28 x 28 uint8 pixels and a label
    "shakespeare-lstm": 80,
    "shakespeare-transformer": 80,
    "credit-lstm": 120,  # one CSV row of the UCI credit-default table
    "credit-transformer": 120,
}
#: Natural split of the Shakespeare tasks: sites are speaking roles, data is not split.
_NO_HOLDOUT = ("shakespeare-lstm", "shakespeare-transformer")
#: Defaults for a custom model (no task to take them from).
CUSTOM_BATCH_SIZE = 32
CUSTOM_LOCAL_EPOCHS = 1

_DTYPES: Mapping[int, str] = {2: "<f2", 4: "<f4", 8: "<f8"}

# --- configuration ------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CustomModel(_Section):
    """``[cost.model]``: a model that is not built in, described by its size."""

    parameters: int = Field(
        ge=1, json_schema_extra=fix("use the model's number of parameters, e.g. 100_000_000")
    )
    train_flops_per_example: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use the FLOPs of one example's forward + backward pass, or leave it unset for "
            "6 x parameters x tokens_per_example"
        ),
    )
    tokens_per_example: int = Field(
        1,
        ge=1,
        json_schema_extra=fix("use the tokens (positions) per example of a sequence model, >= 1"),
    )
    dtype_bytes: Literal[2, 4, 8] = Field(
        4, json_schema_extra=fix("use 2, 4 or 8 bytes per parameter on the wire")
    )
    example_bytes: int | None = Field(
        None,
        ge=1,
        json_schema_extra=fix("use the bytes of one raw training example (central comparison)"),
    )


class SiteGroup(_Section):
    """``[[cost.sites]]``: ``count`` sites alike in hardware, network, region and data."""

    name: str | None = Field(None, json_schema_extra=fix("use a short label"))
    count: int = Field(ge=1, json_schema_extra=fix("use the number of sites in the group, >= 1"))
    hardware: str = Field(
        "cpu-xeon-16c", json_schema_extra=fix("use a [hardware.*] profile of the catalog")
    )
    network: str = Field(
        "fcc-100-20", json_schema_extra=fix("use a [network.*] profile of the catalog")
    )
    region: str = Field("us", json_schema_extra=fix("use a [region.*] of the catalog"))
    availability: float = Field(
        1.0, gt=0, le=1, json_schema_extra=fix("use the probability a site is online, in (0, 1]")
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        json_schema_extra=fix("use the probability a selected site drops mid-round, in [0, 1)"),
    )
    examples: int | None = Field(
        None, ge=1, json_schema_extra=fix("use the training examples of each site, >= 1")
    )
    colocated: bool = Field(
        False,
        json_schema_extra=fix("true: the group's sites share one host's cores (e.g. loopback)"),
    )
    host_cores: float | None = Field(
        None,
        ge=1,
        json_schema_extra=fix(
            "use the cores of the shared host (colocated sites, one training thread each), "
            "or leave it unset: the calibration's measured parallel speedup for `local`, else 1"
        ),
    )
    utilization: float | None = Field(
        None,
        gt=0,
        le=2,
        json_schema_extra=fix("use achieved / peak FLOP/s, e.g. 0.4, or leave it unset"),
    )
    data_gb: float | None = Field(
        None,
        ge=0,
        json_schema_extra=fix("use each site's raw data in GB (central comparison)"),
    )


class DatacenterSettings(_Section):
    """``[cost.datacenter]``: where and how the coordinator runs."""

    mode: Literal["cloud", "onprem"] = Field(
        "cloud", json_schema_extra=fix("use cloud (rented) or onprem (bought)")
    )
    server: str | None = Field(
        None,
        json_schema_extra=fix("use a [server.*] of the catalog, or leave it unset for the mode's"),
    )
    region: str = Field("us", json_schema_extra=fix("use a [region.*] of the catalog"))
    years: list[int] = Field(
        default_factory=lambda: [3, 5],
        min_length=1,
        json_schema_extra=fix("use a list of horizons in whole years, e.g. [3, 5]"),
    )
    always_on: bool = Field(
        True,
        json_schema_extra=fix("true: the coordinator runs all year; false: only during runs"),
    )
    retention_months: float = Field(
        12.0, ge=0, json_schema_extra=fix("use months a run's checkpoints and ledger are kept")
    )
    checkpoints_kept: int | None = Field(
        None, ge=0, json_schema_extra=fix("use a number of checkpoints, or unset for every round")
    )

    @field_validator("years")
    @classmethod
    def _positive_years(cls, v: list[int]) -> list[int]:
        if any(y < 1 for y in v):
            raise ValueError("every horizon must be at least 1 year")
        return v


class CentralSettings(_Section):
    """``[cost.central]``: the comparison with training all the data in one datacenter."""

    enabled: bool = Field(True, json_schema_extra=fix("use true or false"))
    hardware: str = Field(
        "cloud-a100", json_schema_extra=fix("use a [hardware.*] profile (a datacenter GPU)")
    )
    gpus: int = Field(1, ge=1, json_schema_extra=fix("use the number of such devices, >= 1"))
    data_gb_per_site: float | None = Field(
        None,
        ge=0,
        json_schema_extra=fix("use the GB of raw data each site would send, or unset to derive it"),
    )
    region: str = Field("us", json_schema_extra=fix("use a [region.*] of the catalog"))


class CostSettings(_Section):
    """``[cost]`` of an estimate config."""

    model: CustomModel | None = Field(
        None, json_schema_extra=fix("see the [cost.model] keys in docs/cost-model.md")
    )
    examples_per_site: int | None = Field(
        None, ge=1, json_schema_extra=fix("use the training examples of each site, >= 1")
    )
    sites: list[SiteGroup] = Field(
        default_factory=list,
        json_schema_extra=fix("see the [[cost.sites]] keys in docs/cost-model.md"),
    )
    deadline_seconds: float | None = Field(
        None, gt=0, json_schema_extra=fix("use seconds > 0 a round waits at most, or leave unset")
    )
    over_selection: float = Field(
        0.0,
        ge=0,
        le=1,
        json_schema_extra=fix("use 0 (none) up to 1 (select twice as many sites as needed)"),
    )
    monte_carlo: int = Field(
        2000,
        ge=100,
        le=1_000_000,
        json_schema_extra=fix("use a number of simulated round attempts in [100, 1000000]"),
    )
    seed: int = Field(0, ge=0, json_schema_extra=fix("use a non-negative integer"))
    runs_per_year: float = Field(
        1.0, gt=0, json_schema_extra=fix("use how many such federations run per year, > 0")
    )
    evaluate: bool = Field(
        True, json_schema_extra=fix("true: every round ends with the sites evaluating")
    )
    chunk_bytes: int = Field(
        DEFAULT_CHUNK_BYTES, ge=1, json_schema_extra=fix("use the stream chunk size in bytes")
    )
    datacenter: DatacenterSettings = Field(
        default_factory=DatacenterSettings,
        json_schema_extra=fix("see the [cost.datacenter] keys in docs/cost-model.md"),
    )
    central: CentralSettings = Field(
        default_factory=CentralSettings,
        json_schema_extra=fix("see the [cost.central] keys in docs/cost-model.md"),
    )
    calibration: Path | None = Field(
        None,
        json_schema_extra=fix("give the JSON file `confide sim calibrate --out` wrote"),
    )
    catalog: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra=fix("override catalog numbers with {value, source, date} tables"),
    )


@dataclass(frozen=True)
class EstimateConfig:
    """An estimate's whole configuration: the federation and its cost settings."""

    sim: SimRunConfig
    cost: CostSettings


def _prefixed(err: ConfigError, prefix: str) -> ConfigError:
    field_name = err.field if err.field.startswith("--") else prefix + err.field
    return ConfigError(field_name, err.problem, err.fix)


def load_estimate_config(path: Path, *, calibration: Path | None = None) -> EstimateConfig:
    """Read and validate an estimate config (``[sim]`` and ``[cost]``) from TOML.

    A relative ``[cost] calibration`` is taken relative to the config file;
    ``calibration`` (the ``--calibration`` flag) replaces it.
    """
    raw = load_toml(path)
    unknown = sorted(set(raw) - {"sim", "cost"})
    if unknown:
        raise ConfigError(
            unknown[0], "unknown table", "an estimate config has [sim] and [cost] tables only"
        )
    sim_raw, cost_raw = raw.get("sim", {}), raw.get("cost", {})
    for name, table in (("sim", sim_raw), ("cost", cost_raw)):
        if not isinstance(table, dict):
            raise ConfigError(name, "is not a table", f"write [{name}] with its keys below it")
    try:
        sim = SimRunConfig(**sim_raw)
    except ValidationError as e:
        raise _prefixed(first_error(e, SimRunConfig), "sim.") from None
    try:
        sim.check_secure_aggregation()
    except ConfigError as e:
        raise _prefixed(e, "sim.") from None
    try:
        cost = CostSettings(**cost_raw)
    except ValidationError as e:
        raise _prefixed(first_error(e, CostSettings), "cost.") from None
    if calibration is not None:
        cost = cost.model_copy(update={"calibration": calibration})
    elif cost.calibration is not None and not cost.calibration.is_absolute():
        cost = cost.model_copy(update={"calibration": path.parent / cost.calibration})
    return EstimateConfig(sim, cost)


# --- calibration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What ``confide sim calibrate`` measured on one machine, as the estimator uses it."""

    hardware: str  # the profile it calibrates (`local`: this machine)
    model: str
    peak_flops: float
    peak_source: str
    utilization: float  # achieved FLOP/s / peak_flops
    achieved_flops: float
    dp_factor: float | None  # DP-SGD step time / plain step time, for `model`
    aggregation_seconds_per_parameter: float
    aggregation_seconds_per_parameter_site: float
    cpu: str
    cores: int
    ghz: float
    flops_per_cycle: int
    created: str
    path: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Throughput of `cores` single-threaded trainers at once over one's: what a host of
    # colocated sites really has (hyper-threads, shared caches), not its core count.
    parallel_speedup: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("path", "extra")}
        return {"calibration": 1, **out, **dict(self.extra)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: str = "") -> Calibration:
        fields = cls.__dataclass_fields__
        names = [f for f in fields if f not in ("path", "extra")]
        required = [n for n in names if fields[n].default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if data.get("calibration") != 1 or missing:
            raise ConfigError(
                "cost.calibration",
                f"{path or 'the file'} is not a calibration"
                + (f" (missing {', '.join(missing)})" if missing else ""),
                "write it with `confide sim calibrate --model NAME --out FILE`",
            )
        values = {n: data[n] for n in names if n in data}
        extra = {k: v for k, v in data.items() if k not in names and k != "calibration"}
        return cls(**values, path=path, extra=extra)

    def machine(self) -> LocalMachine:
        """The calibrated machine as the catalog's profile ``local`` needs it."""
        return LocalMachine(
            cpu=self.cpu,
            cores=self.cores,
            ghz=self.ghz,
            flops_per_cycle=self.flops_per_cycle,
            peak_flops=self.peak_flops,
            peak_source=self.peak_source,
            utilization=self.utilization_number(),
        )

    def utilization_number(self) -> Number:
        return Number(
            value=self.utilization,
            source=f"confide sim calibrate, model {self.model} ({self.path or 'calibration'})",
            date=dt.date.fromisoformat(self.created[:10]),
        )


def load_calibration(path: Path) -> Calibration:
    """Read a calibration written by ``confide sim calibrate``."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(
            "cost.calibration",
            f"cannot read {path} ({e.strerror or e})",
            "give the JSON file `confide sim calibrate --out` wrote",
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            "cost.calibration", f"{path} is not JSON ({e})", "run `confide sim calibrate` again"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("cost.calibration", f"{path} is not a calibration", "run it again")
    return Calibration.from_json(data, str(path))


def resolve_catalog(
    cost: CostSettings,
    calibration: Calibration | None = None,
    *,
    base: Catalog | None = None,
    local: LocalMachine | None = None,
) -> Catalog:
    """The catalog an estimate uses: the built-in one (or ``base``) with the overrides of
    ``[cost.catalog]``, and the profile ``local`` when a site group names it."""
    catalog = base if base is not None else default_catalog()
    if cost.catalog:
        catalog = load_catalog(cost.catalog, base=catalog.model_dump(), prefix="cost.catalog.")
    wants_local = any(g.hardware == LOCAL for g in cost.sites) or cost.central.hardware == LOCAL
    if wants_local and LOCAL not in catalog.hardware:
        if calibration is not None and calibration.hardware == LOCAL:
            machine = calibration.machine()
        else:
            machine = local if local is not None else detect_local()
        catalog = catalog.with_local(machine)
    return catalog


# --- the model's work and size ------------------------------------------------------------


def lstm_train_flops(
    input_size: int, hidden_size: int, num_layers: int, seq_len: int, *, directions: int = 1
) -> float:
    """Training FLOPs of one example through an LSTM (``FlopCounterMode`` counts 0 for it).

    Per layer, direction and time step the four gates multiply ``[x_t, h_{t-1}]`` by
    their weights: ``4 x (input + hidden) x hidden`` multiply-adds, 2 FLOPs each; the
    backward pass costs twice the forward (gradients of inputs and of weights), so
    training is 3x the forward. Element-wise gate arithmetic is left out, as the
    counter leaves it out of every other layer.
    """
    total = 0.0
    for layer in range(num_layers):
        width = input_size if layer == 0 else hidden_size * directions
        total += 4 * (width + hidden_size) * hidden_size * 2 * seq_len * directions
    return 3.0 * total


def example_batch(kind: str, batch: int) -> tuple[Any, Any]:
    """A seeded batch ``(x, y)`` of torch tensors for a model of input ``kind``."""
    import torch

    from confide.client.data.shakespeare import char_sequences

    gen = torch.Generator().manual_seed(0)
    if kind == "image":
        return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,))
    if kind == "chars":
        seq_len = int(inspect.signature(char_sequences).parameters["seq_len"].default)
        tokens = torch.randint(0, 97, (batch, seq_len + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    return torch.randn(batch, 6, 8, generator=gen), torch.randint(0, 2, (batch,))


@functools.cache
def builtin_train_flops(model: str, batch: int = 4) -> tuple[float, str]:
    """FLOPs of one training example (forward + backward) of a built-in model, and how.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` on one batch of the model's
    input (characters: the tasks' 80-character windows), divided by the batch size; the
    fused ``nn.LSTM`` kernel, which the counter reports as 0, is added with
    :func:`lstm_train_flops` from the shapes it ran on. Cached per model name.
    """
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from confide.client.models import MODELS, build_model

    if model not in MODELS:
        raise ConfigError(
            "sim.model", f"unknown model {model!r}", f"use one of: {', '.join(MODELS)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model(model)
    x, y = example_batch(MODELS[model].input_kind, batch)
    lstm_flops = 0.0

    def on_lstm(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal lstm_flops
        assert isinstance(module, nn.LSTM)
        seq = inputs[0]
        steps = seq.shape[1] if module.batch_first else seq.shape[0]
        lstm_flops += seq.shape[0 if module.batch_first else 1] * lstm_train_flops(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            int(steps),
            directions=2 if module.bidirectional else 1,
        )

    hooks = [m.register_forward_hook(on_lstm) for m in net.modules() if isinstance(m, nn.LSTM)]
    try:
        with FlopCounterMode(display=False) as counter:
            logits = net(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            torch.autograd.backward(loss)
    finally:
        for h in hooks:
            h.remove()
    counted = float(counter.get_total_flops())
    how = "torch FlopCounterMode, forward + backward"
    if hooks:
        how += " + nn.LSTM analytically (4 gates x (input + hidden) x hidden x 2 x steps x 3)"
    return (counted + lstm_flops) / batch, how


@dataclass(frozen=True)
class ModelCost:
    """The model as the cost model sees it: its size on the wire and its work per example."""

    name: str
    parameters: int  # floating-point values (what secure aggregation masks)
    train_flops_per_example: float
    flops_source: str
    arrays: tuple[ArraySpec, ...]
    builtin: bool

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "builtin": self.builtin,
            "parameters": self.parameters,
            "bytes": self.nbytes,
            "train_flops_per_example": self.train_flops_per_example,
            "flops_source": self.flops_source,
        }


def model_cost(sim: SimRunConfig, cost: CostSettings, catalog: Catalog) -> ModelCost:
    """The custom ``[cost.model]`` if given, else the built-in model of ``[sim]``."""
    custom = cost.model
    if custom is not None:
        per_param = catalog.defaults.train_flops_per_parameter
        flops = custom.train_flops_per_example
        how = "[cost.model] train_flops_per_example"
        if flops is None:
            flops = per_param.value * custom.parameters * custom.tokens_per_example
            how = (
                f"{per_param.value:g} x parameters x {custom.tokens_per_example} token(s) "
                f"({per_param.source})"
            )
        arrays = tuple(synthetic_arrays(custom.parameters, _DTYPES[custom.dtype_bytes]))
        return ModelCost("custom", custom.parameters, flops, how, arrays, builtin=False)
    name = _builtin_name(sim)
    flops, how = builtin_train_flops(name)
    arrays = tuple(model_arrays(name))
    params = sum(a.size for a in arrays if a.floating)
    return ModelCost(name, params, flops, how, arrays, builtin=True)


def _builtin_name(sim: SimRunConfig) -> str:
    task: str | None = sim.task
    if sim.model is not None:
        return sim.model
    if task is None:
        raise ConfigError(
            "sim.task",
            "missing: no built-in task or model, and no [cost.model]",
            f"set [sim] task (one of: {', '.join(TASKS)}) or describe your model in "
            "[cost.model] (parameters = ...)",
        )
    return TASKS[task].model


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    """A distribution by its median, 95th percentile and mean (seconds)."""

    p50: float
    p95: float
    mean: float

    @classmethod
    def of(cls, values: FloatArray) -> Percentiles:
        p50, p95 = np.percentile(values, [50, 95])
        return cls(float(p50), float(p95), float(values.mean()))

    def to_json(self, unit: str = "seconds") -> dict[str, float]:
        return {f"{unit}_p50": self.p50, f"{unit}_p95": self.p95, f"{unit}_mean": self.mean}


@dataclass(frozen=True)
class GroupEstimate:
    """One group of sites over the whole run (one federation)."""

    name: str
    sites: int
    hardware: str
    network: str
    region: str
    colocated: bool
    examples_per_site: int
    examples_per_round: float  # processed by one selected site in one round
    utilization: float
    compute_seconds: float  # one site's device work per round at full speed
    transfer_seconds: float  # one site's bytes over its links + calls x RTT, per round
    selected_per_round: float
    returned_per_round: float
    bytes_down: float
    bytes_up: float
    busy_seconds: float  # device-seconds of work, all sites of the group
    kwh: float  # device energy (with the site PUE) + network energy of its bytes
    kg_co2: float
    usd_compute: float
    usd_energy: float
    usd_network: float

    @property
    def usd_total(self) -> float:
        return self.usd_compute + self.usd_energy + self.usd_network

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sites": self.sites,
            "hardware": self.hardware,
            "network": self.network,
            "region": self.region,
            "colocated": self.colocated,
            "examples_per_site": self.examples_per_site,
            "examples_per_site_round": self.examples_per_round,
            "utilization": self.utilization,
            "compute_seconds_per_site_round": self.compute_seconds,
            "transfer_seconds_per_site_round": self.transfer_seconds,
            "selected_sites_per_round": self.selected_per_round,
            "returned_sites_per_round": self.returned_per_round,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "busy_seconds": self.busy_seconds,
            "kwh": self.kwh,
            "kg_co2": self.kg_co2,
            "usd_compute": self.usd_compute,
            "usd_energy": self.usd_energy,
            "usd_network": self.usd_network,
            "usd_total": self.usd_total,
        }


@dataclass(frozen=True)
class DatacenterPlan:
    """The coordinator's side of one run: servers, storage, egress, energy and money."""

    mode: str
    server: str
    servers: int
    servers_for_sessions: int
    servers_for_bandwidth: int
    bandwidth_bps: float  # the round's traffic over the mean round time
    aggregation_seconds_per_round: float
    hours: float  # server hours charged to the run (a year's share when always on)
    storage_gb: float  # checkpoints and ledger of the run
    capex_usd: float  # purchase price of the servers (on premises)
    usd_servers: float
    usd_energy: float
    usd_storage: float
    usd_egress: float
    kwh: float
    kg_co2: float

    @property
    def usd_total(self) -> float:
        return self.usd_servers + self.usd_energy + self.usd_storage + self.usd_egress

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "server": self.server,
            "servers": self.servers,
            "servers_for_sessions": self.servers_for_sessions,
            "servers_for_bandwidth": self.servers_for_bandwidth,
            "bandwidth_bps": self.bandwidth_bps,
            "aggregation_seconds_per_round": self.aggregation_seconds_per_round,
            "server_hours": self.hours,
            "storage_gb": self.storage_gb,
            "capex_usd": self.capex_usd,
            "usd_servers": self.usd_servers,
            "usd_energy": self.usd_energy,
            "usd_storage": self.usd_storage,
            "usd_egress": self.usd_egress,
            "usd_total": self.usd_total,
            "kwh": self.kwh,
            "kg_co2": self.kg_co2,
        }


@dataclass(frozen=True)
class CentralPlan:
    """Training the same work centrally: move every site's data once, store it, train."""

    hardware: str
    gpus: int
    data_gb: float
    transfer_seconds: float  # the slowest site's upload of its data, once
    train_flops: float  # per run
    hours: float  # device hours per run
    usd_train: float  # per run
    usd_transfer: float  # once (metered site links)
    usd_storage_per_year: float
    kwh: float  # per run
    kwh_transfer: float  # once
    kg_co2: float  # per run
    kg_co2_transfer: float  # once

    def to_json(self) -> dict[str, Any]:
        return {
            "hardware": self.hardware,
            "gpus": self.gpus,
            "data_gb": self.data_gb,
            "transfer_seconds": self.transfer_seconds,
            "train_flops": self.train_flops,
            "device_hours": self.hours,
            "usd_train": self.usd_train,
            "usd_transfer_once": self.usd_transfer,
            "usd_storage_per_year": self.usd_storage_per_year,
            "kwh": self.kwh,
            "kwh_transfer_once": self.kwh_transfer,
            "kg_co2": self.kg_co2,
            "kg_co2_transfer_once": self.kg_co2_transfer,
        }


@dataclass(frozen=True)
class Tco:
    """Total cost of ownership over a horizon, federated against central training."""

    years: int
    federated_usd: float
    central_usd: float | None
    savings_usd: float | None  # central - federated
    roi: float | None  # savings / federated

    def to_json(self) -> dict[str, Any]:
        return {
            "years": self.years,
            "federated_usd": self.federated_usd,
            "central_usd": self.central_usd,
            "savings_usd": self.savings_usd,
            "roi": self.roi,
        }


@dataclass(frozen=True)
class Estimate:
    """What one federation (one run) costs, and what it costs over the years."""

    model: ModelCost
    sites: int
    rounds: int
    target_per_round: int
    selected_per_round: int
    min_sites: int
    secure_aggregation: str
    dp_factor: float
    dp_factor_source: str
    bytes_down_per_site_round: int
    bytes_up_per_site_round: int
    messages_per_site_round: int
    round_seconds: Percentiles
    total_seconds: Percentiles
    attempts_per_round: float
    bytes_down: float
    bytes_up: float
    kwh_sites: float
    kwh_network: float
    kwh_datacenter: float
    kg_co2_sites: float
    kg_co2_datacenter: float
    cost_by_category: Mapping[str, float]
    per_site_group: tuple[GroupEstimate, ...]
    datacenter: DatacenterPlan
    central: CentralPlan | None
    tco: tuple[Tco, ...]
    runs_per_year: float
    monte_carlo: int
    seed: int
    assumptions: tuple[str, ...]
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def kwh(self) -> float:
        return self.kwh_sites + self.kwh_network + self.kwh_datacenter

    @property
    def kg_co2(self) -> float:
        return self.kg_co2_sites + self.kg_co2_datacenter

    @property
    def usd_sites(self) -> float:
        return sum(g.usd_total for g in self.per_site_group)

    @property
    def usd_datacenter(self) -> float:
        return self.datacenter.usd_total

    @property
    def usd_total(self) -> float:
        return sum(self.cost_by_category.values())

    def to_json(self) -> dict[str, Any]:
        """Every figure with its unit in its key; per run unless the key says otherwise."""
        return {
            "model": self.model.to_json(),
            "federation": {
                "sites": self.sites,
                "rounds": self.rounds,
                "target_sites_per_round": self.target_per_round,
                "selected_sites_per_round": self.selected_per_round,
                "min_sites": self.min_sites,
                "secure_aggregation": self.secure_aggregation,
                "dp_factor": self.dp_factor,
                "dp_factor_source": self.dp_factor_source,
                "runs_per_year": self.runs_per_year,
            },
            "traffic": {
                "bytes_down_per_site_round": self.bytes_down_per_site_round,
                "bytes_up_per_site_round": self.bytes_up_per_site_round,
                "messages_per_site_round": self.messages_per_site_round,
                "bytes_down": self.bytes_down,
                "bytes_up": self.bytes_up,
            },
            "time": {
                "round": self.round_seconds.to_json(),
                "total": self.total_seconds.to_json(),
                "total_hours_mean": self.total_seconds.mean / SECONDS_PER_HOUR,
                "attempts_per_round": self.attempts_per_round,
            },
            "energy": {
                "kwh_sites": self.kwh_sites,
                "kwh_network": self.kwh_network,
                "kwh_datacenter": self.kwh_datacenter,
                "kwh": self.kwh,
            },
            "co2": {
                "kg_co2_sites": self.kg_co2_sites,
                "kg_co2_datacenter": self.kg_co2_datacenter,
                "kg_co2": self.kg_co2,
            },
            "usd": {
                "usd_sites": self.usd_sites,
                "usd_datacenter": self.usd_datacenter,
                "usd_total": self.usd_total,
            },
            "cost_by_category_usd": dict(self.cost_by_category),
            "per_site_group": [g.to_json() for g in self.per_site_group],
            "datacenter": self.datacenter.to_json(),
            "central": self.central.to_json() if self.central is not None else None,
            "tco": [t.to_json() for t in self.tco],
            "monte_carlo": {"draws": self.monte_carlo, "seed": self.seed},
            "assumptions": list(self.assumptions),
            "sources": dict(self.sources),
        }


# --- the estimate -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """A site group with every per-site, per-round quantity the simulation needs."""

    name: str
    count: int
    settings: SiteGroup
    hw: Hardware
    net: Network
    region: Region
    examples: int
    processed: float  # training examples per round
    utilization: float
    flops: float  # effective FLOP/s = peak x utilization
    train_work: float  # seconds of training + masking at full speed
    eval_work: float
    pre: float  # PullTask + model download before training starts
    post: float  # the rest of the training phase's transfers (upload, secagg stages)
    eval_transfer: float
    data_gb: float | None
    host_cores: float  # colocated groups: the host's parallel capacity in single-site units


@dataclass
class _Sums:
    """Per-group sums over simulated attempts (arrays of length G)."""

    selected: FloatArray
    returned: FloatArray
    work: FloatArray
    billed: FloatArray
    down: FloatArray
    up: FloatArray


def estimate_run(
    sim: SimRunConfig,
    cost: CostSettings | None = None,
    *,
    catalog: Catalog | None = None,
    calibration: Calibration | None = None,
) -> Estimate:
    """Estimate the run a :class:`SimRunConfig` describes (default ``[cost]``: one group of
    ``sim.sites`` on-premises 16-core servers on 100/20 Mbit/s broadband in the US)."""
    cost = cost if cost is not None else CostSettings()
    return estimate(EstimateConfig(sim, cost), catalog=catalog, calibration=calibration)


def estimate(
    cfg: EstimateConfig,
    *,
    catalog: Catalog | None = None,
    calibration: Calibration | None = None,
) -> Estimate:
    """Price the federation ``cfg`` describes; see the module docstring and docs/cost-model.md.

    ``catalog`` defaults to the built-in one with ``[cost.catalog]`` applied;
    ``calibration`` defaults to the file ``[cost] calibration`` names, if any.
    """
    sim, cost = cfg.sim, cfg.cost
    if calibration is None and cost.calibration is not None:
        calibration = load_calibration(cost.calibration)
    if catalog is None:
        catalog = resolve_catalog(cost, calibration)
    notes: list[str] = []
    sources: dict[str, str] = {}
    model = model_cost(sim, cost, catalog)
    task: str | None = sim.task
    n_sites = sim.sites
    if sim.dp.client is not None:
        notes.append("client-level DP (clipping, noise) is not priced: it is negligible per round")

    # --- the round's shape
    target = min(n_sites, max(sim.min_sites, round(sim.fraction * n_sites)))
    selected = min(n_sites, math.ceil(target * (1 + cost.over_selection) - 1e-9))
    secagg: SecAggSettings | None = sim.secagg if sim.secure_aggregation != "none" else None
    neighbours = threshold = 0
    if secagg is not None:
        sa = round_config(secagg, selected, max(1, model.parameters), federation="", rnd=1)
        neighbours, threshold = sa.neighbours, sa.threshold
    need = max(sim.min_sites, threshold, 1)

    # --- bytes per site and round, from the real message sizes
    down_train, up_train, calls_train, down_eval, up_eval, calls_eval = _traffic(
        model.arrays, selected, cost.chunk_bytes, secagg, evaluate=cost.evaluate
    )
    first_down = stream_size(model.arrays, chunk_bytes=cost.chunk_bytes).wire

    # --- the DP factor and the coordinator's constants
    dp_factor, dp_source = 1.0, "no example-level DP"
    if sim.dp.example is not None:
        if calibration is not None and calibration.dp_factor and calibration.model == model.name:
            dp_factor = calibration.dp_factor
            dp_source = f"calibration {calibration.path or ''} ({calibration.created[:10]})"
        elif model.name in catalog.dp_factor:
            dp_factor, dp_source = (
                catalog.dp_factor[model.name].value,
                catalog.dp_factor[model.name].cite,
            )
        else:
            dp_factor, dp_source = catalog.defaults.dp_factor.value, catalog.defaults.dp_factor.cite
    d = catalog.defaults
    agg_a, agg_b = (
        d.aggregation_seconds_per_parameter.value,
        d.aggregation_seconds_per_parameter_site.value,
    )
    if calibration is not None:
        agg_a = calibration.aggregation_seconds_per_parameter
        agg_b = calibration.aggregation_seconds_per_parameter_site
        notes.append(
            "coordinator aggregation cost from the calibration "
            f"({agg_a:.3g} + {agg_b:.3g} x sites seconds per parameter)"
        )

    # --- per-group work and transfer times
    groups = _groups(sim, cost, catalog, calibration, notes)
    batch = sim.batch_size or (TASKS[task].batch_size if task else CUSTOM_BATCH_SIZE)
    epochs = sim.local_epochs or (TASKS[task].local_epochs if task else CUSTOM_LOCAL_EPOCHS)
    resolved: list[_Group] = []
    for i, (name, sg, examples) in enumerate(groups):
        hw = catalog.hardware_profile(sg.hardware, f"cost.sites.{i}.hardware")
        net = catalog.network_profile(sg.network, f"cost.sites.{i}.network")
        region = catalog.region_profile(sg.region, f"cost.sites.{i}.region")
        util = _utilization(sg, hw, catalog, calibration)
        flops = hw.flops.value * util
        if sim.dp.example is not None:
            processed = sim.dp.example.steps * sim.dp.example.sample_rate * examples
        else:
            processed = float(epochs * examples)
            if sim.max_steps is not None:
                processed = min(processed, float(sim.max_steps * batch))
        train = model.train_flops_per_example * processed * dp_factor / flops
        if secagg is not None:
            train += model.parameters * (
                d.secagg_mask_seconds_per_parameter.value
                + d.secagg_mask_seconds_per_parameter_peer.value * (neighbours + 1)
            )
        held_out = sim.eval_fraction / (1 - sim.eval_fraction)
        evaluate = 0.0
        if cost.evaluate:
            evaluate = (
                model.train_flops_per_example * d.forward_fraction.value * examples * held_out
            ) / flops
        down, up, rtt = net.down_bps.value, net.up_bps.value, net.rtt_seconds.value
        pre = first_down * 8 / down + 2 * rtt
        post = (down_train - first_down) * 8 / down + up_train * 8 / up + (calls_train - 2) * rtt
        eval_transfer = down_eval * 8 / down + up_eval * 8 / up + calls_eval * rtt
        data_gb = sg.data_gb
        if data_gb is None and cost.central.data_gb_per_site is not None:
            data_gb = cost.central.data_gb_per_site
        if data_gb is None:
            per_example = (
                cost.model.example_bytes
                if cost.model is not None
                else TASK_EXAMPLE_BYTES.get(task or "")
            )
            if per_example:
                data_gb = examples * (1 + held_out) * per_example / GB
        resolved.append(
            _Group(
                name,
                sg.count,
                sg,
                hw,
                net,
                region,
                examples,
                processed,
                util,
                flops,
                train,
                evaluate,
                pre,
                max(post, 0.0),
                eval_transfer,
                data_gb,
                _host_cores(sg, calibration),
            )
        )

    # --- Monte Carlo over round attempts
    rng = np.random.default_rng(cost.seed)
    attempt_time, success, sums, agg_mean = _simulate(
        resolved,
        rng,
        draws=cost.monte_carlo,
        target=target,
        selected=selected,
        need=need,
        deadline=cost.deadline_seconds,
        evaluate=cost.evaluate,
        agg=(agg_a, agg_b),
        secagg=(d.secagg_unmask_seconds_per_parameter_mask.value, neighbours)
        if secagg is not None
        else None,
        parameters=model.parameters,
        bytes_=(first_down, down_train, up_train, down_eval, up_eval),
    )
    rounds_done = int(success.sum())
    if rounds_done == 0:
        raise ConfigError(
            "cost.sites",
            f"no round completed in {cost.monte_carlo} simulated attempts (each needs "
            f"{need} sites back{' before the deadline' if cost.deadline_seconds else ''})",
            "raise availability, lower dropout or sim.min_sites, add over_selection, or "
            "extend deadline_seconds",
        )
    ends = np.flatnonzero(success)
    cum = np.cumsum(attempt_time)[ends]
    round_times = np.diff(np.concatenate(([0.0], cum)))
    round_pct = Percentiles.of(round_times)
    total_pct = _total_time(round_times, sim.rounds, rng)
    attempts_per_round = (ends[-1] + 1) / rounds_done
    if attempts_per_round > 1.0001:
        notes.append(
            f"{100 * (1 - 1 / attempts_per_round):.1f} % of round attempts failed (fewer than "
            f"{need} sites back) and were retried; their time and cost are included"
        )
    per_round = sim.rounds / rounds_done  # per-attempt sums -> per run

    # --- sites: energy, CO2, dollars
    e = catalog.energy
    group_out: list[GroupEstimate] = []
    kwh_sites = kwh_network = kg_sites = 0.0
    for i, g in enumerate(resolved):
        work = float(sums.work[i]) * per_round
        billed = float(sums.billed[i]) * per_round
        down_b, up_b = float(sums.down[i]) * per_round, float(sums.up[i]) * per_round
        kwh_device = g.hw.watts.value * work * e.site_pue.value / J_PER_KWH
        kwh_net = e.network_kwh_per_gb.value * (down_b + up_b) / GB
        kg = (kwh_device + kwh_net) * g.region.grid_g_co2_per_kwh.value / 1000
        usd_compute = g.hw.usd_per_second() * billed
        usd_energy = 0.0 if g.hw.cloud else kwh_device * g.region.usd_per_kwh.value
        usd_net = (g.net.usd_per_gb.value if g.net.usd_per_gb else 0.0) * (down_b + up_b) / GB
        kwh_sites += kwh_device
        kwh_network += kwh_net
        kg_sites += kg
        group_out.append(
            GroupEstimate(
                name=g.name,
                sites=g.count,
                hardware=g.settings.hardware,
                network=g.settings.network,
                region=g.settings.region,
                colocated=g.settings.colocated,
                examples_per_site=g.examples,
                examples_per_round=g.processed,
                utilization=g.utilization,
                compute_seconds=g.train_work + g.eval_work,
                transfer_seconds=g.pre + g.post + g.eval_transfer,
                selected_per_round=float(sums.selected[i]) / rounds_done,
                returned_per_round=float(sums.returned[i]) / rounds_done,
                bytes_down=down_b,
                bytes_up=up_b,
                busy_seconds=work,
                kwh=kwh_device + kwh_net,
                kg_co2=kg,
                usd_compute=usd_compute,
                usd_energy=usd_energy,
                usd_network=usd_net,
            )
        )
    bytes_down = float(sum(g.bytes_down for g in group_out))
    bytes_up = float(sum(g.bytes_up for g in group_out))

    # --- the datacenter
    dc = _datacenter(
        cost,
        catalog,
        sites=n_sites,
        rounds=sim.rounds,
        round_mean=round_pct.mean,
        run_seconds=total_pct.mean,
        bytes_round=(bytes_down + bytes_up) / sim.rounds,
        bytes_down=bytes_down,
        model_bytes=model.nbytes,
        site_rounds=float(sums.returned.sum()) * per_round,
        aggregation=agg_mean,
        notes=notes,
    )

    # --- central training of the same work
    train_flops = (
        sum(
            float(sums.returned[i]) * per_round * g.processed * model.train_flops_per_example
            for i, g in enumerate(resolved)
        )
        * dp_factor
    )
    central = (
        _central(cost, catalog, resolved, train_flops, notes) if cost.central.enabled else None
    )

    categories = {
        "compute": sum(g.usd_compute for g in group_out),
        "network": sum(g.usd_network for g in group_out) + dc.usd_egress,
        "energy": sum(g.usd_energy for g in group_out) + dc.usd_energy,
        "datacenter": dc.usd_servers,
        "storage": dc.usd_storage,
    }
    per_run = sum(categories.values())
    tco = []
    for years in cost.datacenter.years:
        runs = cost.runs_per_year * years
        fed = per_run * runs
        cen = None
        if central is not None:
            cen = central.usd_train * runs + central.usd_storage_per_year * years
            cen += central.usd_transfer
        tco.append(
            Tco(
                years,
                fed,
                cen,
                None if cen is None else cen - fed,
                None if cen is None or fed <= 0 else (cen - fed) / fed,
            )
        )
    sources["train_flops_per_example"] = model.flops_source
    sources["dp_factor"] = dp_source
    for g in resolved:
        sources[f"{g.name}.flops"] = g.hw.flops.cite
        sources[f"{g.name}.utilization"] = f"{g.utilization:g}"
    return Estimate(
        model=model,
        sites=n_sites,
        rounds=sim.rounds,
        target_per_round=target,
        selected_per_round=selected,
        min_sites=need,
        secure_aggregation=sim.secure_aggregation,
        dp_factor=dp_factor,
        dp_factor_source=dp_source,
        bytes_down_per_site_round=down_train + down_eval,
        bytes_up_per_site_round=up_train + up_eval,
        messages_per_site_round=calls_train + calls_eval,
        round_seconds=round_pct,
        total_seconds=total_pct,
        attempts_per_round=attempts_per_round,
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        kwh_sites=kwh_sites,
        kwh_network=kwh_network,
        kwh_datacenter=dc.kwh,
        kg_co2_sites=kg_sites,
        kg_co2_datacenter=dc.kg_co2,
        cost_by_category=categories,
        per_site_group=tuple(group_out),
        datacenter=dc,
        central=central,
        tco=tuple(tco),
        runs_per_year=cost.runs_per_year,
        monte_carlo=cost.monte_carlo,
        seed=cost.seed,
        assumptions=tuple(notes),
        sources=sources,
    )


def _traffic(
    arrays: Sequence[ArraySpec],
    sites: int,
    chunk_bytes: int,
    secagg: SecAggSettings | None,
    *,
    evaluate: bool,
) -> tuple[int, int, int, int, int, int]:
    """Per site and round: (down, up, calls) of training, then of evaluation.

    The evaluation phase is the difference of a round with and without it, taken on
    rounds without secure aggregation (which only changes it by a few task-id digits),
    so the costly secure-aggregation round is sized once.
    """
    plain = round_traffic(arrays, sites=sites, chunk_bytes=chunk_bytes, evaluate=False)
    if not evaluate:
        ev = (0, 0, 0)
    else:
        both = round_traffic(arrays, sites=sites, chunk_bytes=chunk_bytes, evaluate=True)
        ev = (
            both.down_per_site - plain.down_per_site,
            both.up_per_site - plain.up_per_site,
            both.messages_per_site - plain.messages_per_site,
        )
    train = plain
    if secagg is not None:
        train = round_traffic(
            arrays, sites=sites, chunk_bytes=chunk_bytes, secagg=secagg, evaluate=False
        )
    return train.down_per_site, train.up_per_site, train.messages_per_site, *ev


def _groups(
    sim: SimRunConfig,
    cost: CostSettings,
    catalog: Catalog,
    calibration: Calibration | None,
    notes: list[str],
) -> list[tuple[str, SiteGroup, int]]:
    """The site groups (a default single group) with each group's examples per site."""
    groups = list(cost.sites) or [SiteGroup(count=sim.sites)]
    total = sum(g.count for g in groups)
    if total != sim.sites:
        raise ConfigError(
            "cost.sites",
            f"the groups' counts sum to {total}, but sim.sites is {sim.sites}",
            "make the counts of [[cost.sites]] add up to sim.sites",
        )
    task: str | None = sim.task
    default_examples = cost.examples_per_site
    if default_examples is None and task is not None and cost.model is None:
        whole = TASK_TRAIN_EXAMPLES[task]
        share = 1.0 if task in _NO_HOLDOUT else 1 - sim.eval_fraction
        default_examples = max(1, int(whole * share / sim.sites))
        if sim.max_samples_per_site is not None:
            default_examples = min(default_examples, sim.max_samples_per_site)
        notes.append(
            f"examples per site from the task's data: {whole:,} x {share:g} / {sim.sites} "
            f"sites = {default_examples:,}"
        )
    out: list[tuple[str, SiteGroup, int]] = []
    names: set[str] = set()
    for i, g in enumerate(groups):
        name = g.name or (f"group-{i + 1}" if len(groups) > 1 else "sites")
        if name in names:
            raise ConfigError(f"cost.sites.{i}.name", f"{name!r} is used twice", "name it apart")
        names.add(name)
        examples = g.examples or default_examples
        if examples is None:
            raise ConfigError(
                "cost.examples_per_site",
                "missing: without a built-in task there is no data set to count examples in",
                "set [cost] examples_per_site = N, or examples = N in every [[cost.sites]]",
            )
        out.append((name, g, examples))
    return out


def _host_cores(g: SiteGroup, calibration: Calibration | None) -> float:
    """How many colocated single-threaded sites the group's host runs at full speed."""
    if g.host_cores is not None:
        return g.host_cores
    if (
        calibration is not None
        and calibration.hardware == g.hardware
        and calibration.parallel_speedup is not None
    ):
        return max(1.0, calibration.parallel_speedup)
    return 1.0


def _utilization(
    g: SiteGroup, hw: Hardware, catalog: Catalog, calibration: Calibration | None
) -> float:
    if g.utilization is not None:
        return g.utilization
    if calibration is not None and calibration.hardware == g.hardware:
        return calibration.utilization
    return catalog.utilization(hw).value


def _simulate(
    groups: Sequence[_Group],
    rng: np.random.Generator,
    *,
    draws: int,
    target: int,
    selected: int,
    need: int,
    deadline: float | None,
    evaluate: bool,
    agg: tuple[float, float],
    secagg: tuple[float, int] | None,
    parameters: int,
    bytes_: tuple[int, int, int, int, int],
) -> tuple[FloatArray, BoolArray, _Sums, float]:
    """Simulate ``draws`` round attempts in row chunks; return each attempt's duration,
    whether it succeeded, per-group sums over all attempts and the mean aggregation time."""
    counts = np.array([g.count for g in groups])
    site_group = np.repeat(np.arange(len(groups)), counts)
    n = int(counts.sum())

    def per_site(values: Sequence[float]) -> FloatArray:
        return np.asarray(values, dtype=np.float64)[site_group]

    avail = per_site([g.settings.availability for g in groups])
    all_available = bool((avail >= 1).all())
    g_count = len(groups)
    vec = {
        "drop": np.array([g.settings.dropout for g in groups]),
        "train": np.array([g.train_work for g in groups]),
        "eval": np.array([g.eval_work for g in groups]),
        "pre": np.array([g.pre for g in groups]),
        "post": np.array([g.post for g in groups]),
        "eval_transfer": np.array([g.eval_transfer for g in groups]),
    }
    colocated = [i for i, g in enumerate(groups) if g.settings.colocated]
    host_cores = [g.host_cores for g in groups]
    first_down, down_train, up_train, down_eval, up_eval = bytes_
    chunk = max(1, min(draws, 2_000_000 // max(n, 1)))
    times: list[FloatArray] = []
    oks: list[BoolArray] = []
    sums = _Sums(*(np.zeros(g_count) for _ in range(6)))
    agg_total = 0.0
    done = 0
    while done < draws:
        m = min(chunk, draws - done)
        done += m
        # Selection: ceil(K (1 + o)) sites uniformly among the available ones.
        if selected < n:
            keys = rng.random((m, n))
            if not all_available:
                keys[rng.random((m, n)) >= avail] = 2.0
            idx = np.argpartition(keys, selected - 1, axis=1)[:, :selected]
            valid = np.take_along_axis(keys, idx, axis=1) < 1.5
            gid = site_group[idx]
        else:  # every available site is selected
            valid = np.ones((m, n), dtype=bool)
            if not all_available:
                valid = rng.random((m, n)) < avail
            gid = np.broadcast_to(site_group, (m, n))
        train = vec["train"][gid]
        # Colocated sites of a group train at once on one host of `host_cores` cores, one
        # thread each: n of them finish after max(1, n / cores) times one site's work.
        stretched = train
        for c in colocated:
            in_c = valid & (gid == c)
            sharing = np.maximum(1.0, in_c.sum(axis=1, keepdims=True) / host_cores[c])
            stretched = np.where(in_c, train * sharing, stretched)
        pre = vec["pre"][gid]
        finish = pre + stretched + vec["post"][gid]
        dropped = valid & (rng.random((m, selected)) < vec["drop"][gid])
        resolve = np.where(dropped, rng.random((m, selected)) * finish, finish)
        back = valid & ~dropped
        # The round closes when `target` sites are back, else when every selected site has
        # returned or dropped, and at the latest at the deadline.
        t_back = np.where(back, finish, np.inf)
        kth = np.partition(t_back, target - 1, axis=1)[:, target - 1]
        last = np.where(valid, resolve, 0.0).max(axis=1)
        close = np.where(np.isfinite(kth), kth, last)
        if deadline is not None:
            close = np.minimum(close, deadline)
        got = back & (finish <= close[:, None])
        n_got = got.sum(axis=1)
        ok = n_got >= need
        if secagg is not None:
            per_mask, k = secagg
            n_valid = valid.sum(axis=1)
            aggregation = parameters * (agg[0] + per_mask * (n_got + (n_valid - n_got) * k))
        else:
            aggregation = parameters * (agg[0] + agg[1] * n_got)
        aggregation = np.where(ok, aggregation, 0.0)
        agg_total += float(aggregation.sum())
        evaluated = got & ok[:, None]
        eval_time = np.zeros(m)
        eval_work = vec["eval"][gid]
        if evaluate:
            eval_stretched = eval_work
            for c in colocated:
                in_c = evaluated & (gid == c)
                sharing = np.maximum(1.0, in_c.sum(axis=1, keepdims=True) / host_cores[c])
                eval_stretched = np.where(in_c, eval_work * sharing, eval_stretched)
            e_finish = vec["eval_transfer"][gid] + eval_stretched
            eval_time = np.where(evaluated, e_finish, 0.0).max(axis=1)
            if deadline is not None:
                eval_time = np.minimum(eval_time, deadline)
        else:
            e_finish = np.zeros_like(train)
        times.append(close + aggregation + eval_time)
        oks.append(ok)
        # What each selected site spent: it works until it finishes, drops or is cut off.
        end = np.where(valid, np.minimum(resolve, close[:, None]), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(stretched > 0, (end - pre) / stretched, 1.0)
        work = train * np.clip(frac, 0.0, 1.0) * valid
        work = work + np.where(evaluated, eval_work, 0.0)
        billed = np.where(evaluated, end + e_finish, end)
        for c in colocated:
            billed = np.where(gid == c, work, billed)
        down = np.where(got, down_train, np.where(valid, first_down, 0)) + np.where(
            evaluated, down_eval, 0
        )
        up = np.where(got, up_train, 0) + np.where(evaluated, up_eval, 0)
        flat = gid.ravel()
        for name, values in (
            ("selected", valid),
            ("returned", got),
            ("work", work),
            ("billed", billed),
            ("down", down),
            ("up", up),
        ):
            total = getattr(sums, name)
            total += np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=g_count)
    success = np.concatenate(oks)
    ok_count = max(1, int(success.sum()))
    return np.concatenate(times), success, sums, agg_total / ok_count


def _total_time(round_times: FloatArray, rounds: int, rng: np.random.Generator) -> Percentiles:
    """The run's duration: sums of ``rounds`` round times drawn from the simulated ones."""
    if np.ptp(round_times) == 0:
        total = float(round_times[0]) * rounds
        return Percentiles(total, total, total)
    boots = max(200, min(1000, 2_000_000 // max(rounds, 1)))
    totals = np.zeros(boots)
    step = max(1, 2_000_000 // boots)
    for start in range(0, rounds, step):
        r = min(step, rounds - start)
        totals += round_times[rng.integers(0, len(round_times), size=(boots, r))].sum(axis=1)
    pct = Percentiles.of(totals)
    return Percentiles(pct.p50, pct.p95, float(round_times.mean()) * rounds)


def _datacenter(
    cost: CostSettings,
    catalog: Catalog,
    *,
    sites: int,
    rounds: int,
    round_mean: float,
    run_seconds: float,
    bytes_round: float,
    bytes_down: float,
    model_bytes: int,
    site_rounds: float,
    aggregation: float,
    notes: list[str],
) -> DatacenterPlan:
    s = cost.datacenter
    mode = catalog.datacenter.cloud if s.mode == "cloud" else catalog.datacenter.onprem
    name = s.server or (
        catalog.datacenter.cloud_server if s.mode == "cloud" else catalog.datacenter.onprem_server
    )
    server = catalog.server_profile(name, "cost.datacenter.server")
    if server.mode != s.mode:
        raise ConfigError(
            "cost.datacenter.server",
            f"{name!r} is a {server.mode} server, the datacenter mode is {s.mode}",
            f"pick a {s.mode} server, or set mode = {server.mode}",
        )
    region = catalog.region_profile(s.region, "cost.datacenter.region")
    bandwidth = bytes_round * 8 / round_mean if round_mean > 0 else 0.0
    for_sessions = math.ceil(sites / server.max_sites.value)
    for_bandwidth = math.ceil(bandwidth / server.bandwidth_bps.value)
    servers = max(1, for_sessions, for_bandwidth)
    run_hours = run_seconds / SECONDS_PER_HOUR
    hours = HOURS_PER_YEAR / cost.runs_per_year if s.always_on else run_hours
    if s.always_on:
        notes.append(
            f"the coordinator runs all year: each run carries 1/{cost.runs_per_year:g} of a "
            "year of its servers"
        )
    usd_servers = servers * server.usd_per_second() * hours * SECONDS_PER_HOUR
    kwh = servers * server.watts.value * hours * mode.pue.value / 1000
    usd_energy = 0.0 if server.cloud else kwh * region.usd_per_kwh.value
    kept = rounds if s.checkpoints_kept is None else min(rounds, s.checkpoints_kept)
    storage_gb = (
        kept * model_bytes + site_rounds * catalog.defaults.ledger_bytes_per_site_round.value
    ) / GB
    usd_storage = storage_gb * mode.storage_usd_per_gb_month.value * s.retention_months
    usd_egress = bytes_down / GB * mode.egress_usd_per_gb.value
    return DatacenterPlan(
        mode=s.mode,
        server=name,
        servers=servers,
        servers_for_sessions=for_sessions,
        servers_for_bandwidth=for_bandwidth,
        bandwidth_bps=bandwidth,
        aggregation_seconds_per_round=aggregation,
        hours=hours,
        storage_gb=storage_gb,
        capex_usd=servers * server.capex_usd.value if server.capex_usd else 0.0,
        usd_servers=usd_servers,
        usd_energy=usd_energy,
        usd_storage=usd_storage,
        usd_egress=usd_egress,
        kwh=kwh,
        kg_co2=kwh * region.grid_g_co2_per_kwh.value / 1000,
    )


def _central(
    cost: CostSettings,
    catalog: Catalog,
    groups: Sequence[_Group],
    train_flops: float,
    notes: list[str],
) -> CentralPlan | None:
    c = cost.central
    missing = [g.name for g in groups if g.data_gb is None]
    if missing:
        notes.append(
            "no central comparison: the data size of "
            f"{', '.join(missing)} is unknown (set [cost.central] data_gb_per_site, "
            "[cost.model] example_bytes or data_gb per group)"
        )
        return None
    hw = catalog.hardware_profile(c.hardware, "cost.central.hardware")
    region = catalog.region_profile(c.region, "cost.central.region")
    mode = catalog.datacenter.cloud if hw.cloud else catalog.datacenter.onprem
    flops = hw.flops.value * catalog.utilization(hw).value * c.gpus
    seconds = train_flops / flops
    kwh = hw.watts.value * c.gpus * seconds * mode.pue.value / J_PER_KWH
    usd = hw.usd_per_second() * c.gpus * seconds
    if not hw.cloud:
        usd += kwh * region.usd_per_kwh.value
    data_gb = sum(g.count * (g.data_gb or 0.0) for g in groups)
    transfer = max(
        (g.data_gb or 0.0) * GB * 8 / g.net.up_bps.value + g.net.rtt_seconds.value for g in groups
    )
    kwh_transfer = data_gb * catalog.energy.network_kwh_per_gb.value
    kg_transfer = sum(
        g.count
        * (g.data_gb or 0.0)
        * catalog.energy.network_kwh_per_gb.value
        * g.region.grid_g_co2_per_kwh.value
        / 1000
        for g in groups
    )
    usd_transfer = sum(
        g.count * (g.data_gb or 0.0) * (g.net.usd_per_gb.value if g.net.usd_per_gb else 0.0)
        for g in groups
    )
    notes.append(
        "central training does the same example passes as the federation (DP factor "
        "included) on the central device; its data moves once and is stored for the horizon"
    )
    return CentralPlan(
        hardware=c.hardware,
        gpus=c.gpus,
        data_gb=data_gb,
        transfer_seconds=transfer,
        train_flops=train_flops,
        hours=seconds / SECONDS_PER_HOUR,
        usd_train=usd,
        usd_transfer=usd_transfer,
        usd_storage_per_year=data_gb * mode.storage_usd_per_gb_month.value * 12,
        kwh=kwh,
        kwh_transfer=kwh_transfer,
        kg_co2=kwh * region.grid_g_co2_per_kwh.value / 1000,
        kg_co2_transfer=kg_transfer,
    )
