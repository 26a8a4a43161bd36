"""The price catalog: every number carries its source and date; overrides too."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from confide.errors import ConfigError
from confide.sims import catalog as cat
from confide.sims.cost import load_estimate_config

BASE = cat._base()


def _numbers(table: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of the raw TOML that is not a descriptive string."""
    for key, value in table.items():
        where = f"{path}.{key}" if path else key
        if isinstance(value, Mapping) and "value" not in value:
            yield from _numbers(value, where)
        elif not isinstance(value, str):
            yield where, value


def test_every_number_of_the_builtin_catalog_names_source_and_date() -> None:
    leaves = list(_numbers(BASE))
    assert len(leaves) > 60
    for where, value in leaves:
        assert isinstance(value, Mapping), f"{where} is a bare value"
        assert set(value) == {"value", "source", "date"}, where
        assert isinstance(value["source"], str) and value["source"].strip(), where
        assert isinstance(value["date"], (dt.date, str)), where
    catalog = cat.default_catalog()
    assert catalog.hardware["cpu-xeon-16c"].flops.value == pytest.approx(16 * 2.9e9 * 32)
    assert catalog.dp_factor["char-lstm"].cite.endswith("(2026-11-22)")


def _without(path: list[str], part: str) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    node = raw
    for key in path:
        node = node[key]
    del node[part]
    return raw


def test_number_without_source_is_rejected_naming_the_key() -> None:
    raw = _without(["hardware", "cpu-xeon-16c", "flops"], "source")
    with pytest.raises(ConfigError) as e:
        cat.load_catalog(base=raw)
    assert e.value.field == "hardware.cpu-xeon-16c.flops"
    assert "no source" in e.value.problem
    assert 'source = "' in e.value.fix and "date" in e.value.fix


def test_number_without_date_is_rejected_naming_the_key() -> None:
    raw = _without(["region", "us", "usd_per_kwh"], "date")
    with pytest.raises(ConfigError, match=r"region\.us\.usd_per_kwh: has no date"):
        cat.load_catalog(base=raw)


def test_bare_number_is_rejected() -> None:
    raw = copy.deepcopy(BASE)
    raw["energy"]["site_pue"] = 1.5
    with pytest.raises(ConfigError, match=r"energy\.site_pue: a bare number has no source"):
        cat.load_catalog(base=raw)


def test_blank_source_is_rejected() -> None:
    over = {"energy": {"site_pue": {"value": 1.2, "source": " ", "date": "2026-01-01"}}}
    with pytest.raises(ConfigError, match=r"cost\.catalog\.energy\.site_pue: the source is empty"):
        cat.load_catalog(over)


def test_override_without_source_is_rejected_even_over_a_sourced_number() -> None:
    over = {"hardware": {"cpu-xeon-16c": {"flops": {"value": 2e12, "date": "2026-01-01"}}}}
    with pytest.raises(ConfigError) as e:
        cat.load_catalog(over)
    assert e.value.field == "cost.catalog.hardware.cpu-xeon-16c.flops"
    assert e.value.problem == "has no source"


def test_override_with_source_replaces_the_number_and_keeps_the_rest() -> None:
    over = {
        "region": {"us": {"usd_per_kwh": {"value": 0.1, "source": "user", "date": "2026-01-01"}}}
    }
    catalog = cat.load_catalog(over)
    assert catalog.region["us"].usd_per_kwh.value == 0.1
    assert catalog.region["us"].usd_per_kwh.source == "user"
    assert (
        catalog.region["us"].grid_g_co2_per_kwh
        == cat.default_catalog().region["us"].grid_g_co2_per_kwh
    )


def test_unknown_key_is_rejected_naming_it() -> None:
    over = {
        "hardware": {"cpu-xeon-16c": {"flopz": {"value": 1, "source": "u", "date": "2026-01-01"}}}
    }
    with pytest.raises(ConfigError) as e:
        cat.load_catalog(over)
    assert e.value.field == "cost.catalog.hardware.cpu-xeon-16c.flopz"
    assert e.value.problem == "unknown key"


def test_new_profile_needs_every_number() -> None:
    number = {"value": 1e13, "source": "vendor sheet", "date": "2025-01-01"}
    with pytest.raises(ConfigError, match=r"cost\.catalog\.hardware\.my-gpu\.watts: missing"):
        cat.load_catalog({"hardware": {"my-gpu": {"kind": "gpu", "flops": number}}})
    full = {"kind": "gpu", "flops": number, "watts": number, "usd_per_hour": number}
    assert cat.load_catalog({"hardware": {"my-gpu": full}}).hardware["my-gpu"].cloud


def test_a_profile_has_exactly_one_way_to_be_priced() -> None:
    rent = {"value": 1.0, "source": "user", "date": "2026-01-01"}
    with pytest.raises(ConfigError, match="exactly one of usd_per_hour"):
        cat.load_catalog({"hardware": {"cpu-xeon-16c": {"usd_per_hour": rent}}})


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        cat.default_catalog().hardware_profile("cray-1", "cost.sites.0.hardware")
    assert e.value.field == "cost.sites.0.hardware"
    assert "cpu-xeon-16c" in e.value.fix and "[cost.catalog.hardware.cray-1]" in e.value.fix


def test_amortised_price_spreads_capex_over_its_life() -> None:
    hw = cat.default_catalog().hardware["cpu-xeon-16c"]
    assert hw.capex_usd is not None and hw.life_years is not None
    year = 365 * 24 * 3600
    assert hw.usd_per_second() * year * hw.life_years.value == pytest.approx(hw.capex_usd.value)


def test_local_profile_from_cpuinfo() -> None:
    cpuinfo = "model name\t: Test CPU\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu avx2 fma avx512f\n"
    machine = cat.detect_local(cpuinfo, cores=4)
    assert machine.peak_flops == pytest.approx(4 * 3.0e9 * 32)
    assert machine.cpu == "Test CPU" or machine.cpu  # platform.processor() may win
    catalog = cat.default_catalog().with_local(machine)
    local = catalog.hardware[cat.LOCAL]
    assert local.flops.value == machine.peak_flops and "/proc/cpuinfo" in local.flops.source
    per_core = catalog.defaults.local_watts_per_core.value
    assert local.watts.value == pytest.approx(4 * per_core)
    avx2 = cat.detect_local("cpu MHz : 2000\nflags : avx2 fma\n", cores=1)
    assert avx2.peak_flops == pytest.approx(2.0e9 * 16)


def test_override_in_an_estimate_config_names_the_toml_key(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text(
        "[sim]\ntask = 'mnist-cnn'\nsites = 2\nrounds = 1\n"
        "[cost.catalog.region.us]\nusd_per_kwh = {value = 0.1}\n"
    )
    cfg = load_estimate_config(path)
    from confide.sims.cost import resolve_catalog

    with pytest.raises(
        ConfigError, match=r"^cost\.catalog\.region\.us\.usd_per_kwh: has no source"
    ):
        resolve_catalog(cfg.cost)
