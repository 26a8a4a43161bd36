"""The cost model: tiny federations priced by hand, Monte Carlo against closed forms and an
independent simulation, FLOP counting, calibration, and the `confide sim estimate` command."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from confide.cli import main
from confide.errors import ConfigError
from confide.sims import catalog as cat
from confide.sims.config import SimRunConfig
from confide.sims.cost import (
    CostSettings,
    Estimate,
    EstimateConfig,
    builtin_train_flops,
    estimate,
    estimate_run,
    load_calibration,
    load_estimate_config,
    lstm_train_flops,
)
from confide.sims.wirebytes import round_traffic, stream_size, synthetic_arrays

ROOT = Path(__file__).resolve().parents[1]
USER = {"source": "user (test)", "date": "2026-01-01"}


def _num(value: float) -> dict[str, Any]:
    return {"value": value, **USER}


def _config(sim: dict[str, Any], cost: dict[str, Any]) -> EstimateConfig:
    return EstimateConfig(SimRunConfig(**sim), CostSettings(**cost))


# A 1 Gbit/s symmetric link with a 10 ms round trip, added to the catalog as a user would.
LINK = {
    "network": {"test-1g": {"down_bps": _num(1e9), "up_bps": _num(1e9), "rtt_seconds": _num(0.01)}}
}
NO_AGGREGATION = {
    "defaults": {
        "aggregation_seconds_per_parameter": _num(0.0),
        "aggregation_seconds_per_parameter_site": _num(0.0),
    }
}


def test_tiny_federation_equals_hand_computation() -> None:
    """2 sites, 1 round, always available, no dropout, a 1,000-parameter custom model."""
    cfg = _config(
        {"sites": 2, "rounds": 1, "fraction": 1.0, "local_epochs": 1, "batch_size": 10},
        {
            "model": {"parameters": 1000},
            "examples_per_site": 100,
            "sites": [{"count": 2, "hardware": "cpu-xeon-16c", "network": "test-1g"}],
            "catalog": LINK,
        },
    )
    est = estimate(cfg)
    c = cat.default_catalog()
    hw, region, d = c.hardware["cpu-xeon-16c"], c.region["us"], c.defaults

    # Bytes: the real message sizes of a round with and without its evaluation phase.
    arrays = synthetic_arrays(1000)
    train = round_traffic(arrays, sites=2, evaluate=False)
    full = round_traffic(arrays, sites=2, evaluate=True)
    first = stream_size(arrays).wire  # the model download
    assert est.bytes_down_per_site_round == full.down_per_site
    assert est.bytes_up_per_site_round == full.up_per_site
    assert est.bytes_down == 2 * full.down_per_site
    assert est.bytes_up == 2 * full.up_per_site

    # Seconds: 6 x 1000 FLOPs per example, 100 examples, 1 epoch, at peak x utilization.
    flops = hw.flops.value * d.utilization_cpu.value
    work = 6 * 1000 * 100 / flops
    eval_work = 6 * 1000 * d.forward_fraction.value * 100 * (0.1 / 0.9) / flops
    bw, rtt = 1e9, 0.01
    pre = first * 8 / bw + 2 * rtt
    post = (train.down_per_site - first) * 8 / bw + train.up_per_site * 8 / bw
    post += (train.messages_per_site - 2) * rtt
    eval_transfer = (full.down_per_site - train.down_per_site) * 8 / bw
    eval_transfer += (full.up_per_site - train.up_per_site) * 8 / bw
    eval_transfer += (full.messages_per_site - train.messages_per_site) * rtt
    close = pre + work + post
    aggregation = 1000 * (
        d.aggregation_seconds_per_parameter.value
        + d.aggregation_seconds_per_parameter_site.value * 2
    )
    round_seconds = close + aggregation + eval_transfer + eval_work
    for value in (est.round_seconds.p50, est.round_seconds.p95, est.round_seconds.mean):
        assert value == pytest.approx(round_seconds, rel=1e-9)
    assert est.total_seconds.mean == pytest.approx(round_seconds, rel=1e-9)
    assert est.datacenter.aggregation_seconds_per_round == pytest.approx(aggregation)

    # Energy: device watts x work x site PUE, plus kWh per GB of traffic.
    kwh_device = hw.watts.value * 2 * (work + eval_work) * c.energy.site_pue.value / 3.6e6
    gigabytes = 2 * (full.down_per_site + full.up_per_site) / 1e9
    kwh_network = c.energy.network_kwh_per_gb.value * gigabytes
    assert est.kwh_sites == pytest.approx(kwh_device, rel=1e-9)
    assert est.kwh_network == pytest.approx(kwh_network, rel=1e-9)
    kg = (kwh_device + kwh_network) * region.grid_g_co2_per_kwh.value / 1000
    assert est.kg_co2_sites == pytest.approx(kg, rel=1e-9)

    # Dollars at the sites: the purchase amortised over the seconds each site took part,
    # plus electricity (an on-premises device).
    assert hw.capex_usd is not None and hw.life_years is not None
    per_second = hw.capex_usd.value / (hw.life_years.value * 365 * 24 * 3600)
    billed = 2 * (close + eval_transfer + eval_work)
    group = est.per_site_group[0]
    assert group.usd_compute == pytest.approx(per_second * billed, rel=1e-9)
    assert group.usd_energy == pytest.approx(kwh_device * region.usd_per_kwh.value, rel=1e-9)
    assert group.usd_network == 0

    # The datacenter: one cloud server all year (1 run per year), storage, egress.
    server, mode = c.server["cloud-c6i-2xlarge"], c.datacenter.cloud
    dc = est.datacenter
    assert dc.servers == 1
    assert server.usd_per_hour is not None
    assert dc.usd_servers == pytest.approx(server.usd_per_hour.value * 8760)
    assert dc.kwh == pytest.approx(server.watts.value * 8760 * mode.pue.value / 1000)
    storage_gb = (4000 + 2 * d.ledger_bytes_per_site_round.value) / 1e9
    assert dc.storage_gb == pytest.approx(storage_gb)
    assert dc.usd_storage == pytest.approx(storage_gb * mode.storage_usd_per_gb_month.value * 12)
    down_gb = 2 * full.down_per_site / 1e9  # model downloads leave the cloud
    assert dc.usd_egress == pytest.approx(down_gb * mode.egress_usd_per_gb.value)
    assert est.cost_by_category == pytest.approx(
        {
            "compute": per_second * billed,
            "network": dc.usd_egress,
            "energy": kwh_device * region.usd_per_kwh.value,
            "datacenter": dc.usd_servers,
            "storage": dc.usd_storage,
        }
    )
    assert est.usd_total == pytest.approx(est.usd_sites + est.usd_datacenter)
    # No data size for a custom model without example_bytes: no central comparison.
    assert est.central is None and est.tco[0].roi is None
    assert est.tco[0].federated_usd == pytest.approx(3 * est.usd_total)


def test_dp_and_max_steps_set_the_examples_processed() -> None:
    base = {"sites": 2, "rounds": 1, "batch_size": 10}
    cost = {"model": {"parameters": 1000}, "examples_per_site": 1000, "evaluate": False}
    capped = estimate(_config({**base, "local_epochs": 3, "max_steps": 7}, cost))
    assert capped.per_site_group[0].examples_per_round == 70  # min(3 x 1000, 7 x 10)
    dp = {"example": {"noise_multiplier": 1.0, "sample_rate": 0.02, "steps_per_round": 5}}
    private = estimate(_config({**base, "dp": dp}, cost))
    group = private.per_site_group[0]
    assert group.examples_per_round == pytest.approx(5 * 0.02 * 1000)
    factor = cat.default_catalog().defaults.dp_factor.value
    assert private.dp_factor == factor
    plain = estimate(_config({**base, "max_steps": 10}, cost)).per_site_group[0]
    assert plain.examples_per_round == 100
    assert group.compute_seconds == pytest.approx(plain.compute_seconds * factor)


def test_onprem_datacenter_amortises_capex_and_pays_electricity() -> None:
    cfg = _config(
        {"sites": 1000, "rounds": 2, "fraction": 1.0},
        {
            "model": {"parameters": 10_000_000},
            "examples_per_site": 10,
            "sites": [{"count": 1000, "network": "loopback"}],
            "runs_per_year": 2,
            "datacenter": {"mode": "onprem", "region": "de"},
        },
    )
    est = estimate(cfg)
    c = cat.default_catalog()
    server, region = c.server["onprem-1u-2s"], c.region["de"]
    dc = est.datacenter
    assert server.capex_usd is not None and server.life_years is not None
    # Loopback sites pull 10M parameters each at GB/s: one 10 GbE server is not enough.
    assert dc.servers_for_sessions == 1
    assert dc.servers_for_bandwidth == math.ceil(dc.bandwidth_bps / 1e10) > 1
    assert dc.servers == dc.servers_for_bandwidth
    hours = 8760 / 2  # always on, two runs a year
    assert dc.hours == hours
    capex = server.capex_usd.value
    assert dc.capex_usd == dc.servers * capex
    life_hours = server.life_years.value * 365 * 24
    assert dc.usd_servers == pytest.approx(dc.servers * capex / life_hours * hours)
    kwh = dc.servers * server.watts.value * hours * c.datacenter.onprem.pue.value / 1000
    assert dc.kwh == pytest.approx(kwh)
    assert dc.usd_energy == pytest.approx(kwh * region.usd_per_kwh.value)
    assert dc.kg_co2 == pytest.approx(kwh * region.grid_g_co2_per_kwh.value / 1000)
    assert dc.usd_egress == 0  # flat-rate transit on premises


def _group(name: str, count: int, network: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "count": count, "network": network, "examples": 50, **extra}


def _round_time(groups: list[dict[str, Any]], **cost: Any) -> float:
    """A deterministic round of these groups alone (everyone available, nobody drops)."""
    sites = sum(g["count"] for g in groups)
    cfg = _config(
        {"sites": sites, "rounds": 1, "fraction": 1.0},
        {
            "model": {"parameters": 100_000},
            "sites": groups,
            "evaluate": False,
            "catalog": NO_AGGREGATION,
            **cost,
        },
    )
    est = estimate(cfg)
    assert est.round_seconds.p50 == pytest.approx(est.round_seconds.p95)
    return est.round_seconds.mean


@pytest.mark.parametrize("availability", [0.5, 0.1])
def test_round_time_with_availability_matches_the_closed_form(availability: float) -> None:
    """4 fast and 2 slow sites, each online with probability p; all online ones train.

    The round lasts until the slowest selected site: slow if any slow site is online.
    Conditioned on anyone being online, P(fast) = ((1-p)^2 - (1-p)^6) / (1 - (1-p)^6).
    """
    fast = _group("fast", 4, "fiber-1g", availability=availability)
    slow = _group("slow", 2, "dsl-25-3", availability=availability)
    t_fast, t_slow = (
        _round_time([{**fast, "availability": 1}]),
        _round_time([{**slow, "availability": 1}]),
    )
    assert t_slow > 2 * t_fast
    cfg = _config(
        {"sites": 6, "rounds": 1, "fraction": 1.0},
        {
            "model": {"parameters": 100_000},
            "sites": [fast, slow],
            "evaluate": False,
            "catalog": NO_AGGREGATION,
            "monte_carlo": 20_000,
            "seed": 3,
        },
    )
    est = estimate(cfg)
    q = 1 - availability
    p_fast = (q**2 - q**6) / (1 - q**6)
    mean = p_fast * t_fast + (1 - p_fast) * t_slow
    assert est.round_seconds.mean == pytest.approx(mean, rel=0.02)
    assert est.round_seconds.p50 == pytest.approx(t_fast if p_fast > 0.5 else t_slow)
    assert est.round_seconds.p95 == pytest.approx(t_slow)
    # Rounds with nobody online fail and are retried: 1 / (1 - (1-p)^6) attempts each.
    assert est.attempts_per_round == pytest.approx(1 / (1 - q**6), rel=0.02)


def test_dropout_and_over_selection_match_an_independent_simulation() -> None:
    """The documented rules, simulated one attempt at a time in plain Python."""
    groups = [
        _group("a", 5, "fiber-1g", availability=0.9, dropout=0.1),
        _group("b", 4, "fcc-100-20", availability=0.8, dropout=0.2),
        _group("c", 3, "dsl-25-3", availability=0.7, dropout=0.05),
    ]
    times = {g["name"]: _round_time([{**g, "availability": 1, "dropout": 0}]) for g in groups}
    deadline = 0.9 * times["c"]
    cfg = _config(
        {"sites": 12, "rounds": 1, "fraction": 0.5, "min_sites": 3},
        {
            "model": {"parameters": 100_000},
            "sites": groups,
            "evaluate": False,
            "catalog": NO_AGGREGATION,
            "over_selection": 0.5,
            "deadline_seconds": deadline,
            "monte_carlo": 20_000,
            "seed": 5,
        },
    )
    est = estimate(cfg)
    assert est.target_per_round == 6 and est.selected_per_round == 9

    rng = random.Random(11)
    sites = [g for g in groups for _ in range(g["count"])]
    rounds: list[float] = []
    elapsed = 0.0
    attempts = 0
    while len(rounds) < 20_000:
        attempts += 1
        online = [s for s in sites if rng.random() < s["availability"]]
        chosen = rng.sample(online, min(9, len(online)))
        back, resolved = [], []
        for s in chosen:
            t = times[s["name"]]
            if rng.random() < s["dropout"]:
                resolved.append(rng.random() * t)
            else:
                back.append(t)
                resolved.append(t)
        back.sort()
        close = back[5] if len(back) >= 6 else max(resolved, default=0.0)
        close = min(close, deadline)
        elapsed += close
        if sum(t <= close for t in back) >= 3:
            rounds.append(elapsed)
            elapsed = 0.0
    quantiles = statistics.quantiles(rounds, n=20)
    assert est.round_seconds.mean == pytest.approx(statistics.fmean(rounds), rel=0.03)
    assert est.round_seconds.p50 == pytest.approx(statistics.median(rounds), rel=0.03)
    assert est.round_seconds.p95 == pytest.approx(quantiles[18], rel=0.03)
    assert est.attempts_per_round == pytest.approx(attempts / len(rounds), rel=0.03)


def test_colocated_sites_share_one_host() -> None:
    """Three sites on one host take three times one site's compute; energy is unchanged."""
    base = {"count": 3, "network": "loopback", "examples": 5000}
    cost = {"model": {"parameters": 10_000_000}, "evaluate": False, "catalog": NO_AGGREGATION}
    sim = {"sites": 3, "rounds": 2, "fraction": 1.0}
    apart = estimate(_config(sim, {**cost, "sites": [base]}))
    shared = estimate(_config(sim, {**cost, "sites": [{**base, "colocated": True}]}))
    work = apart.per_site_group[0].compute_seconds
    assert work > 0.1
    assert shared.round_seconds.mean - apart.round_seconds.mean == pytest.approx(2 * work)
    assert shared.per_site_group[0].busy_seconds == pytest.approx(
        apart.per_site_group[0].busy_seconds
    )
    assert shared.kwh_sites == pytest.approx(apart.kwh_sites)
    # On a 2-core host, three single-threaded sites take 3/2 of one site's compute.
    two_cores = estimate(
        _config(sim, {**cost, "sites": [{**base, "colocated": True, "host_cores": 2}]})
    )
    assert two_cores.round_seconds.mean - apart.round_seconds.mean == pytest.approx(0.5 * work)


def test_lstm_flops_are_analytic() -> None:
    # 2 layers (input 8, then 256) of 256 units over 80 steps: 4 gates x (in + hidden) x
    # hidden multiply-adds, 2 FLOPs each, x3 for forward + backward.
    expected = 3 * 80 * 2 * 4 * ((8 + 256) * 256 + (256 + 256) * 256)
    assert expected == 381_419_520
    assert lstm_train_flops(8, 256, 2, 80) == expected
    assert lstm_train_flops(8, 64, 1, 6, directions=2) == 2 * lstm_train_flops(8, 64, 1, 6)


def test_builtin_models_flops_from_the_counter_plus_lstm() -> None:
    cnn, how = builtin_train_flops("cnn")
    assert cnn == 72_384_512  # torch's FlopCounterMode: conv, addmm, mm, backward
    assert "FlopCounterMode" in how and "LSTM" not in how
    lstm, how = builtin_train_flops("char-lstm")
    head = 3 * 2 * 256 * 97 * 80  # the linear read-out at each of the 80 positions
    assert lstm == head + lstm_train_flops(8, 256, 2, 80)
    assert "nn.LSTM analytically" in how


def test_estimate_run_prices_a_sim_run_config() -> None:
    cfg = SimRunConfig(task="mnist-cnn", sites=10, rounds=2, fraction=0.5)
    est = estimate_run(cfg)
    assert est.model.name == "cnn" and est.model.parameters == 1_663_370
    assert est.target_per_round == 5 and est.rounds == 2
    group = est.per_site_group[0]
    assert group.examples_per_site == 5400  # 60,000 x 0.9 / 10
    assert est.central is not None and est.central.data_gb == pytest.approx(10 * 6000 * 785 / 1e9)
    assert est.tco[0].roi is not None
    json.dumps(est.to_json())


def test_the_big_configuration_completes_with_sane_values() -> None:
    """1,000 sites x 500 rounds x 100M parameters (benchmarks/sim_estimate.py times it)."""
    cfg = _config(
        {"sites": 1000, "rounds": 500, "fraction": 0.1},
        {"model": {"parameters": 100_000_000}, "examples_per_site": 1000},
    )
    est = estimate(cfg)
    assert est.bytes_down_per_site_round == pytest.approx(2 * 4e8, rel=1e-3)  # train + eval
    assert est.bytes_up_per_site_round == pytest.approx(4e8, rel=1e-3)
    group = est.per_site_group[0]
    assert group.selected_per_round == 100
    assert est.round_seconds.p50 > group.transfer_seconds > 4e8 * 8 / 2e7  # 100/20 Mbit/s
    assert est.total_seconds.mean == pytest.approx(500 * est.round_seconds.mean)
    payload = est.to_json()
    for value in _leaves(payload):
        assert not isinstance(value, float) or math.isfinite(value)
    assert est.usd_total > 0 and est.kwh > 0 and est.kg_co2 > 0


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [v for item in x.values() for v in _leaves(item)]
    if isinstance(x, list):
        return [v for item in x for v in _leaves(item)]
    return [x]


# --- configuration errors ---------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fed.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (
            "[sim]\ntask = 'mnist-cnn'\n[[cost.sites]]\ncount = 10\navailability = 1.5\n",
            "cost.sites.0.availability",
        ),
        ("[sim]\ntask = 'mnist-cnn'\n[cost]\nover_selection = -1\n", "cost.over_selection"),
        ("[sim]\ntask = 'mnist-cnn'\n[cost]\nbogus = 1\n", "cost.bogus"),
        ("[sim]\ntask = 'mnist-cnn'\nrounds = 0\n", "sim.rounds"),
        ("[sim]\ntask = 'nope'\n", "sim.task"),
        ("[sim]\nsites = 3\n[cost.model]\nparameters = 0\n", "cost.model.parameters"),
        ("[sim]\ntask = 'mnist-cnn'\nsites = 2\nsecure_aggregation = 'secagg+'\n", "sim.min_sites"),
        ("[simulation]\ntask = 'mnist-cnn'\n", "simulation"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_estimate_config(_write(tmp_path, text))
    assert e.value.field == field and e.value.fix


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[sim]\ntask = 'mnist-cnn'\nsites = 10\n[[cost.sites]]\ncount = 4\n", "cost.sites"),
        (
            "[sim]\ntask = 'mnist-cnn'\nsites = 2\n[[cost.sites]]\ncount = 2\nhardware = 'x'\n",
            "cost.sites.0.hardware",
        ),
        ("[sim]\nsites = 2\n[cost.model]\nparameters = 1000\n", "cost.examples_per_site"),
        ("[sim]\nsites = 2\n", "sim.task"),
        (
            "[sim]\ntask = 'mnist-cnn'\nsites = 2\n[cost.datacenter]\nserver = 'onprem-1u-2s'\n",
            "cost.datacenter.server",
        ),
    ],
)
def test_inconsistent_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    cfg = load_estimate_config(_write(tmp_path, text))
    with pytest.raises(ConfigError) as e:
        estimate(cfg)
    assert e.value.field == field and e.value.fix


# --- the command line -------------------------------------------------------------------


def test_cli_estimate_prints_tables_and_writes_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_json = tmp_path / "out.json"
    config = ROOT / "examples" / "estimate-hospitals.toml"
    code = main(["sim", "estimate", "--config", str(config), "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    for text in ("round time p50 / p95", "Site groups", "rural-clinics", "Cost by category"):
        assert text in out
    assert "Total cost of ownership" in out and f"wrote {out_json}" in out
    data = json.loads(out_json.read_text())
    assert data["federation"]["sites"] == 300
    assert data["traffic"]["bytes_up_per_site_round"] > 4.4e8  # uint32 masked vector
    assert {g["name"] for g in data["per_site_group"]} >= {"rural-clinics"}
    assert set(data["cost_by_category_usd"]) == {
        "compute",
        "network",
        "energy",
        "datacenter",
        "storage",
    }
    assert data["time"]["round"]["seconds_p95"] >= data["time"]["round"]["seconds_p50"] > 0
    assert [t["years"] for t in data["tco"]] == [3, 5] and data["central"] is not None


def test_cli_bad_config_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _write(tmp_path, "[sim]\ntask = 'mnist-cnn'\n[[cost.sites]]\ncount = 10\ndropout = 2\n")
    code = main(["sim", "estimate", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("confide: error: cost.sites.0.dropout: ")
    assert "Fix: " in lines[0]


def test_calibrate_then_estimate_with_the_calibration(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "calibration.json"
    argv = ["sim", "calibrate", "--model", "cnn-small", "--steps", "2", "--repeats", "1"]
    assert main([*argv, "--dp", "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "utilization of local" in printed and "DP-SGD factor" in printed
    cal = load_calibration(out)
    assert cal.model == "cnn-small" and cal.hardware == "local"
    assert cal.utilization == pytest.approx(cal.achieved_flops / cal.peak_flops)
    assert cal.dp_factor is not None and cal.dp_factor > 0
    assert cal.aggregation_seconds_per_parameter >= 0
    assert cal.extra["batch_size"] == 8 and len(cal.extra["plain_seconds_per_example"]) == 1

    config = _write(
        tmp_path,
        "[sim]\ntask = 'mnist-cnn'\nmodel = 'cnn-small'\nsites = 3\nrounds = 2\n"
        "[sim.dp.example]\nnoise_multiplier = 1.0\nsample_rate = 0.01\n"
        "[[cost.sites]]\ncount = 3\nhardware = 'local'\nnetwork = 'loopback'\n"
        "colocated = true\n",
    )
    est: Estimate = estimate(load_estimate_config(config, calibration=out))
    group = est.per_site_group[0]
    assert group.utilization == pytest.approx(cal.utilization)
    assert est.dp_factor == pytest.approx(cal.dp_factor)
    assert est.sources["sites.flops"].startswith("/proc/cpuinfo")
    code = main(["sim", "estimate", "--config", str(config), "--calibration", str(out)])
    assert code == 0 and "local" in capsys.readouterr().out
