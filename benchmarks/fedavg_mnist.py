"""McMahan et al. 2017 MNIST setting: rounds of FedAvg to 99 % test accuracy.

100 clients, C = 0.1 (10 per round), E = 5 local epochs, B = 10, the 1,663,370-parameter
CNN, IID split; then one pathological non-IID run (two digits per client, McMahan's
shards) reported as far as it gets. Test accuracy is measured on the full 10,000-image
MNIST test set after every round. Paper: about 20 rounds IID (target here <= 30),
about 230 non-IID.

    python benchmarks/fedavg_mnist.py                       # full: tens of minutes on 2 cores
    python benchmarks/fedavg_mnist.py --quick               # smoke run (CI), seconds
    python benchmarks/fedavg_mnist.py --json benchmarks/results/fedavg_mnist.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_json

from confide.server.history import RoundRecord
from confide.sims.config import SimRunConfig
from confide.sims.engine import run_inprocess

TARGET = 0.99


def run(
    label: str, partition: str, rounds: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    cfg = SimRunConfig(
        task="mnist-cnn",
        model=args.model,
        sites=args.clients,
        rounds=rounds,
        partition=partition,
        fraction=args.fraction,
        local_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_fraction=0.0,
        fraction_evaluate=0.01,  # federated eval on one site; the figure is the central test
        max_samples_per_site=args.max_samples_per_site,
        max_test_samples=args.max_test_samples,
        out=out / label,
    )

    def stop(r: RoundRecord) -> bool:
        return args.stop_at_target and r.test_accuracy is not None and r.test_accuracy >= TARGET

    start = time.perf_counter()
    result = run_inprocess(cfg, show_progress=not args.quiet, stop_when=stop)
    seconds = time.perf_counter() - start
    history = result.history
    reached = history.first_round_reaching("test_accuracy", TARGET)
    xs, accs = history.series("test_accuracy")
    return {
        "run": label,
        "partition": partition,
        "rounds_run": xs[-1],
        "rounds_to_99": reached,
        "best_accuracy": max(accs),
        "final_accuracy": accs[-1],
        "seconds": seconds,
        "accuracy_by_round": dict(zip(xs, accs, strict=True)),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--model", default="cnn")
    p.add_argument("--rounds-iid", type=int, default=30)
    p.add_argument("--rounds-noniid", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples-per-site", type=int, default=None)
    p.add_argument("--max-test-samples", type=int, default=None)
    p.add_argument("--no-stop-at-target", dest="stop_at_target", action="store_false")
    p.add_argument("--skip-noniid", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model budget, seconds")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.clients, args.epochs, args.rounds_iid, args.rounds_noniid = 10, 1, 2, 1
        args.max_samples_per_site, args.max_test_samples, args.model = 60, 500, "cnn-small"
        args.fraction, args.quiet = 0.3, True

    with TemporaryDirectory() as tmp:
        runs = [run("iid", "iid", args.rounds_iid, args, Path(tmp))]
        if not args.skip_noniid:
            runs.append(
                run("pathological non-IID", "shards:2", args.rounds_noniid, args, Path(tmp))
            )

    print_table(
        f"FedAvg on MNIST: {args.clients} clients, C={args.fraction}, E={args.epochs}, "
        f"B={args.batch_size}, lr={args.lr}, model {args.model}",
        ["run", "rounds run", "rounds to 99%", "best acc", "final acc", "minutes"],
        [
            (
                r["run"],
                r["rounds_run"],
                r["rounds_to_99"] or "not reached",
                r["best_accuracy"],
                r["final_accuracy"],
                r["seconds"] / 60,
            )
            for r in runs
        ],
    )
    write_json(args.json, {"benchmark": "fedavg_mnist", "settings": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
