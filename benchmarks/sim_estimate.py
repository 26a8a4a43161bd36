"""Time `confide sim estimate` on 1,000 sites x 500 rounds x a 100M-parameter model.

The estimate is analytic (no training): per round, the real message sizes of the round
(confide.sims.wirebytes), then a Monte Carlo of 2,000 round attempts over all 1,000
sites as whole NumPy arrays. Three federations of that size are timed:

* ``plain``: 10 % of the sites per round, one group of identical sites;
* ``secagg+dp``: SecAgg+ and DP-SGD, 20 % over-selection, a deadline, and three groups
  with different hardware, networks, availability and dropout;
* ``all-sites``: every one of the 1,000 sites in every round (the largest Monte Carlo).

For each, ``estimate()`` in this process (median of ``--repeats``; the first call, which
also measures secure aggregation's record sizes once, is shown apart) and the whole
command ``confide sim estimate --config ... --quiet`` in a fresh process (Python start
and imports included; the import of ``confide.sims.cost`` alone is timed too).

    python benchmarks/sim_estimate.py
    python benchmarks/sim_estimate.py --quick --json out.json    # smoke run (CI)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import write_json
from rich.console import Console
from rich.table import Table

from confide.sims.cost import estimate, load_estimate_config

SIZE = """
[sim]
sites = 1000
rounds = 500
fraction = {fraction}
min_sites = 50
{sim_extra}

[cost]
examples_per_site = 2000
monte_carlo = 2000
{cost_extra}

[cost.model]
parameters = 100_000_000
example_bytes = 1000
"""

CONFIGS: dict[str, dict[str, str]] = {
    "plain": {"fraction": "0.1", "sim_extra": "", "cost_extra": ""},
    "secagg+dp": {
        "fraction": "0.1",
        "sim_extra": 'secure_aggregation = "secagg+"\n'
        "[sim.dp.example]\nnoise_multiplier = 1.0\nsample_rate = 0.01\nsteps_per_round = 10",
        "cost_extra": "over_selection = 0.2\ndeadline_seconds = 3600\n"
        '[[cost.sites]]\ncount = 600\nhardware = "cpu-xeon-16c"\nnetwork = "fcc-100-20"\n'
        "availability = 0.9\ndropout = 0.05\n"
        '[[cost.sites]]\ncount = 300\nhardware = "cloud-g4dn-xlarge"\nnetwork = "fiber-1g"\n'
        'region = "de"\ndropout = 0.02\n'
        '[[cost.sites]]\ncount = 100\nhardware = "cpu-workstation-8c"\nnetwork = "dsl-25-3"\n'
        "availability = 0.7\ndropout = 0.1",
    },
    "all-sites": {"fraction": "1.0", "sim_extra": "", "cost_extra": ""},
}


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def measure(name: str, folder: Path, repeats: int) -> dict[str, Any]:
    path = folder / f"{name}.toml"
    path.write_text(SIZE.format(**CONFIGS[name]))
    cfg = load_estimate_config(path)
    start = time.perf_counter()
    est = estimate(cfg)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        est = estimate(cfg)
        seconds.append(time.perf_counter() - start)
    python = sys.executable
    cli = [python, "-m", "confide.cli", "sim", "estimate", "--config", str(path), "--quiet"]
    cli_seconds = [_wall(cli) for _ in range(repeats)]
    import_seconds = [_wall([python, "-c", "import confide.sims.cost"]) for _ in range(repeats)]
    return {
        "config": name,
        "sites": est.sites,
        "rounds": est.rounds,
        "parameters": est.model.parameters,
        "selected_per_round": est.selected_per_round,
        "estimate_seconds_first": first,
        "estimate_seconds": statistics.median(seconds),
        "estimate_seconds_all": seconds,
        "cli_seconds": statistics.median(cli_seconds),
        "cli_seconds_all": cli_seconds,
        "import_seconds": statistics.median(import_seconds),
        "round_seconds_p50": est.round_seconds.p50,
        "round_seconds_p95": est.round_seconds.p95,
        "total_hours_mean": est.total_seconds.mean / 3600,
        "usd_total": est.usd_total,
        "kwh": est.kwh,
    }


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r])
    # CI logs are not terminals and would default to 80 columns, wrapping every row.
    Console(width=max(Console().width, 120)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median (5)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="one repeat of `plain` (CI)")
    args = parser.parse_args(argv)
    names = ["plain"] if args.quick else args.configs.split(",")
    repeats = 1 if args.quick else args.repeats
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or repeats < 1:
        parser.error(f"unknown config(s) {unknown}; use some of {list(CONFIGS)}, repeats >= 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = measure(name, Path(tmp), repeats)
            rows.append(row)
            print(f"  {name}: estimate {row['estimate_seconds']:.3f} s", file=sys.stderr)
    print_table(
        "confide sim estimate: 1,000 sites x 500 rounds x 100M parameters (seconds, median)",
        [
            "config",
            "selected",
            "estimate() s",
            "1st call s",
            "CLI s",
            "import s",
            "round p50/p95 s",
            "total h",
            "USD",
        ],
        [
            [
                r["config"],
                r["selected_per_round"],
                r["estimate_seconds"],
                r["estimate_seconds_first"],
                r["cli_seconds"],
                r["import_seconds"],
                f"{r['round_seconds_p50']:.0f} / {r['round_seconds_p95']:.0f}",
                r["total_hours_mean"],
                f"{r['usd_total']:,.0f}",
            ]
            for r in rows
        ],
    )
    write_json(
        args.json,
        {"benchmark": "sim_estimate", "settings": {"repeats": repeats}, "results": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
