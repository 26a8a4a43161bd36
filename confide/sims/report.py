"""Reports of a federation and of its cost: PNG plots, one self-contained HTML page, JSON.

* :func:`plot_history` draws accuracy and loss per round (``metrics.png``).
* :func:`run_report` turns a :class:`~confide.server.history.History` (a simulation's or
  a coordinator's ``history.json``) and, optionally, a cost estimate (the ``to_json()``
  of :class:`confide.sims.cost.Estimate`) into a JSON-able dict: accuracy, ε and bytes
  per round, and what the run costs. :func:`write_run_report` writes it as
  ``report.html`` + ``report.json``.
* :func:`write_estimate_report` does the same for ``confide sim estimate`` alone.

Bytes per round are the coordinator's gRPC meter for a networked federation and the
wire model (:mod:`confide.sims.wirebytes`) for a simulation; the report says which.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI machines have no display

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from confide.htmlpage import bullets, esc, num, page_head, png_img, table, write_html_json
from confide.server.history import History

REPORT_FORMAT = "confide-run-report/1"

_SERIES = (
    ("train", "train_accuracy", "train_loss"),
    ("federated eval", "eval_accuracy", "eval_loss"),
    ("central test", "test_accuracy", "test_loss"),
)


def plot_history(history: History, path: Path) -> Path:
    """Write accuracy and loss against round number to ``path`` (PNG) and return it."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, acc_key, loss_key in _SERIES:
        xs, ys = history.series(acc_key)
        if xs:
            ax_acc.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
        xs, ys = history.series(loss_key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title=f"{history.task}: accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title=f"{history.task}: loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the run report ---------------------------------------------------------------------


def _round_row(r: Any) -> dict[str, Any]:
    traffic = r.traffic or {}
    dp = r.dp or {}
    return {
        "round": r.round,
        "sites_selected": r.sites_selected,
        "sites_succeeded": r.sites_succeeded,
        "train_loss": r.train_loss,
        "train_accuracy": r.train_accuracy,
        "eval_accuracy": r.eval_accuracy,
        "test_accuracy": r.test_accuracy,
        "epsilon_max_site": dp.get("epsilon_max_site"),
        "bytes_down": traffic.get("down_bytes"),
        "bytes_up": traffic.get("up_bytes"),
        "seconds": r.seconds,
        "failures": len(r.failures),
    }


def run_report(history: History, estimate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a run did and what it costs, as plain JSON-able data."""
    rows = [_round_row(r) for r in history.rounds]
    sources = {str(r.traffic.get("source", "meter")) for r in history.rounds if r.traffic}
    last = history.last()
    trained = [r for r in rows if r["round"] > 0]
    return {
        "format": REPORT_FORMAT,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "task": history.task,
        "strategy": history.strategy,
        "meta": history.meta,
        "rounds": rows,
        "bytes_source": ", ".join(sorted(sources)) if sources else None,
        "totals": {
            "rounds": len(trained),
            "seconds": sum(r["seconds"] for r in trained),
            "bytes_down": sum(r["bytes_down"] or 0 for r in rows),
            "bytes_up": sum(r["bytes_up"] or 0 for r in rows),
            "final_test_accuracy": last.test_accuracy if last else None,
            "final_eval_accuracy": last.eval_accuracy if last else None,
            "epsilon_max_site": max(
                (r["epsilon_max_site"] for r in rows if r["epsilon_max_site"] is not None),
                default=None,
            ),
        },
        "estimate": dict(estimate) if estimate is not None else None,
    }


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_run(report: Mapping[str, Any]) -> bytes:
    """Accuracy, ε and bytes against round number, side by side (PNG bytes)."""
    rows = report["rounds"]
    fig, (ax_acc, ax_eps, ax_bytes) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for label, key in (
        ("train", "train_accuracy"),
        ("federated eval", "eval_accuracy"),
        ("central test", "test_accuracy"),
    ):
        pts = [(r["round"], 100 * r[key]) for r in rows if r[key] is not None]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title="accuracy")
    eps = [(r["round"], r["epsilon_max_site"]) for r in rows if r["epsilon_max_site"] is not None]
    if eps:
        ax_eps.plot(*zip(*eps, strict=True), marker="o", markersize=3, label="most-spent site")
        ax_eps.set_ylim(bottom=0)
    else:
        ax_eps.text(0.5, 0.5, "no differential privacy", ha="center", va="center")
    ax_eps.set(xlabel="round", ylabel="ε (PRV)", title="privacy spent")
    byte_rows = [r for r in rows if r["bytes_down"] is not None]
    if byte_rows:
        xs = [r["round"] for r in byte_rows]
        ax_bytes.bar(xs, [r["bytes_down"] / 1e6 for r in byte_rows], label="down")
        ax_bytes.bar(
            xs,
            [r["bytes_up"] / 1e6 for r in byte_rows],
            bottom=[r["bytes_down"] / 1e6 for r in byte_rows],
            label="up",
        )
    else:
        ax_bytes.text(0.5, 0.5, "no traffic recorded", ha="center", va="center")
    ax_bytes.set(xlabel="round", ylabel="MB", title=f"bytes ({report['bytes_source'] or '-'})")
    for ax in (ax_acc, ax_eps, ax_bytes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


def plot_cost(estimate: Mapping[str, Any]) -> bytes:
    """Dollars by category and by site group (PNG bytes)."""
    fig, (ax_cat, ax_grp) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    cats = {k: v for k, v in estimate["cost_by_category_usd"].items() if v}
    ax_cat.barh(list(cats), list(cats.values()))
    ax_cat.set(xlabel="USD per run", title="cost by category")
    groups = estimate["per_site_group"]
    names = [g["name"] for g in groups]
    left = [0.0] * len(groups)
    for key, label in (
        ("usd_compute", "compute"),
        ("usd_energy", "energy"),
        ("usd_network", "network"),
    ):
        vals = [g[key] for g in groups]
        ax_grp.barh(names, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax_grp.set(xlabel="USD per run, all sites of the group", title="cost by site group")
    for ax in (ax_cat, ax_grp):
        ax.grid(alpha=0.3, axis="x")
    if groups:
        ax_grp.legend(fontsize=8)
    return _png(fig)


def _mb(v: Any) -> str:
    return num(v / 1e6, ".3f") if isinstance(v, (int, float)) else num(None)


def _pct(v: Any) -> str:
    return num(100 * v, ".1f") if isinstance(v, (int, float)) else num(None)


def _estimate_html(est: Mapping[str, Any], add: Callable[[str], None]) -> None:
    fed, t, usd = est["federation"], est["time"], est["usd"]
    add(
        f"<p>{esc(fed['sites'])} sites, {esc(fed['rounds'])} rounds, "
        f"{esc(fed['selected_sites_per_round'])} selected per round "
        f"(target {esc(fed['target_sites_per_round'])}); secure aggregation "
        f"{esc(fed['secure_aggregation'])}; DP factor {num(fed['dp_factor'], '.2f')} "
        f"({esc(fed['dp_factor_source'])}).</p>"
    )
    rnd, total = t["round"], t["total"]
    add(
        table(
            ["figure", "value"],
            [
                [
                    "round time p50 / p95 (s)",
                    f"{num(rnd['seconds_p50'], '.2f')} / {num(rnd['seconds_p95'], '.2f')}",
                ],
                [
                    "run time p50 / p95 (h)",
                    f"{num(total['seconds_p50'] / 3600, '.2f')} / "
                    f"{num(total['seconds_p95'] / 3600, '.2f')}",
                ],
                [
                    "bytes down / up per site and round (MB)",
                    f"{_mb(est['traffic']['bytes_down_per_site_round'])} / "
                    f"{_mb(est['traffic']['bytes_up_per_site_round'])}",
                ],
                ["energy (kWh)", num(est["energy"]["kwh"], ".3g")],
                ["CO2 (kg)", num(est["co2"]["kg_co2"], ".3g")],
                [
                    "USD sites / datacenter / total",
                    f"{num(usd['usd_sites'], ',.2f')} / "
                    f"{num(usd['usd_datacenter'], ',.2f')} / {num(usd['usd_total'], ',.2f')}",
                ],
            ],
            {1},
        )
    )
    add(png_img(plot_cost(est), "cost by category and by site group"))
    add("<h3>Site groups</h3>")
    add(
        table(
            ["group", "sites", "hardware", "network", "region", "compute s/round",
             "transfer s/round", "kWh", "kg CO2", "USD"],
            [
                [esc(g["name"]), num(g["sites"]), esc(g["hardware"]), esc(g["network"]),
                 esc(g["region"]), num(g["compute_seconds_per_site_round"], ".3g"),
                 num(g["transfer_seconds_per_site_round"], ".3g"), num(g["kwh"], ".3g"),
                 num(g["kg_co2"], ".3g"), num(g["usd_total"], ",.2f")]
                for g in est["per_site_group"]
            ],
            {1, 5, 6, 7, 8, 9},
        )
    )  # fmt: skip
    dc = est["datacenter"]
    add("<h3>Datacenter</h3>")
    add(
        f"<p>{esc(dc['servers'])} × {esc(dc['server'])} ({esc(dc['mode'])}), "
        f"{num(dc['storage_gb'], '.3g')} GB stored, USD {num(dc['usd_total'], ',.2f')} per run "
        f"(servers {num(dc['usd_servers'], ',.2f')}, energy {num(dc['usd_energy'], ',.2f')}, "
        f"storage {num(dc['usd_storage'], ',.2f')}, egress {num(dc['usd_egress'], ',.2f')}).</p>"
    )
    if est["tco"]:
        add(
            table(
                ["years", "federated USD", "central USD", "savings USD", "ROI"],
                [
                    [num(x["years"]), num(x["federated_usd"], ",.0f"),
                     num(x["central_usd"], ",.0f"), num(x["savings_usd"], ",.0f"),
                     num(x["roi"], ".2f")]
                    for x in est["tco"]
                ],
                {0, 1, 2, 3, 4},
            )
        )  # fmt: skip
    if est["assumptions"]:
        add("<h3>Assumptions</h3>" + bullets(est["assumptions"]))
    if est["sources"]:
        add("<details><summary>Sources of the catalog numbers used</summary>")
        add(
            table(
                ["number", "source"], [[esc(k), esc(v)] for k, v in est["sources"].items()], set()
            )
        )
        add("</details>")


def render_run_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: the run's curves and table, then its cost."""
    parts: list[str] = []
    add = parts.append
    add(page_head(f"Confide run report: {report['task']}"))
    add(f"<h1>Federation report: {esc(report['task'])}</h1>")
    add(f"<p class='muted'>Generated {esc(report['generated'])} ({esc(report['format'])}).</p>")
    tot = report["totals"]
    add(
        table(
            ["figure", "value"],
            [
                ["rounds", num(tot["rounds"])],
                ["final central test accuracy (%)", _pct(tot["final_test_accuracy"])],
                ["final federated eval accuracy (%)", _pct(tot["final_eval_accuracy"])],
                ["ε of the most-spent site", num(tot["epsilon_max_site"], ".3f")],
                ["wall time of the rounds (s)", num(tot["seconds"], ".1f")],
                [f"bytes down / up (MB, {esc(report['bytes_source'] or '-')})",
                 f"{_mb(tot['bytes_down'])} / {_mb(tot['bytes_up'])}"],
            ],
            {1},
        )
    )  # fmt: skip
    add(png_img(plot_run(report), "accuracy, epsilon and bytes per round"))
    add("<h2>Rounds</h2>")
    add(
        table(
            ["round", "sites", "train loss", "train acc %", "eval acc %", "test acc %", "ε max",
             "MB down", "MB up", "seconds", "failures"],
            [
                [num(r["round"]), f"{r['sites_succeeded']}/{r['sites_selected']}",
                 num(r["train_loss"], ".4f"), _pct(r["train_accuracy"]), _pct(r["eval_accuracy"]),
                 _pct(r["test_accuracy"]), num(r["epsilon_max_site"], ".3f"),
                 _mb(r["bytes_down"]), _mb(r["bytes_up"]), num(r["seconds"], ".2f"),
                 num(r["failures"])]
                for r in report["rounds"]
            ],
            set(range(11)),
        )
    )  # fmt: skip
    if report["estimate"] is not None:
        add("<h2>What this federation costs (confide.sims.cost)</h2>")
        add(
            "<p class='muted'>An analytic estimate for the run's configuration with the "
            "catalog's default profiles; see docs/cost-model.md. "
            "<code>confide sim estimate</code> prices other hardware, networks and sizes.</p>"
        )
        _estimate_html(report["estimate"], add)
    add("</body></html>\n")
    return "\n".join(parts)


def render_estimate_html(estimate: Mapping[str, Any]) -> str:
    """One self-contained page for ``confide sim estimate``."""
    parts: list[str] = []
    add = parts.append
    add(page_head("Confide cost estimate"))
    add("<h1>Cost estimate</h1>")
    model = estimate["model"]
    add(
        f"<p class='muted'>Model {esc(model.get('name'))}: "
        f"{num(model.get('parameters'))} parameters. Every catalog number names its source "
        "(below); docs/cost-model.md gives the formulas.</p>"
    )
    _estimate_html(estimate, add)
    add("</body></html>\n")
    return "\n".join(parts)


def write_run_report(
    history: History,
    out_dir: Path,
    estimate: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``report.html`` and ``report.json`` of a run under ``out_dir``."""
    report = run_report(history, estimate)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    write_html_json(render_run_html(report), html_path, report, json_path)
    return html_path, json_path


def write_estimate_report(
    estimate: Mapping[str, Any], html_path: Path | None, json_path: Path | None
) -> Sequence[Path]:
    """The estimate as a page and/or JSON."""
    return write_html_json(render_estimate_html(estimate), html_path, estimate, json_path)


__all__ = [
    "REPORT_FORMAT",
    "plot_cost",
    "plot_history",
    "plot_run",
    "render_estimate_html",
    "render_run_html",
    "run_report",
    "write_estimate_report",
    "write_run_report",
]
