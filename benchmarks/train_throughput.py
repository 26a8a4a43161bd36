"""Measure local training throughput (samples/s) of every registered model, without and with DP-SGD.

One step is forward + backward + optimizer step on a fixed in-memory batch,
so the figure is compute only (no data loading). Each model is timed three
ways:

* ``plain``: the non-private model (fused ``nn.LSTM`` for the LSTMs), plain SGD;
* ``dp-sgd``: the ``dp=True`` model stepped by ``confide.privacy.dp.sgd.DpSgdStepper``,
  the step of ``train_private`` that a private site runs (per-sample clipping,
  noise, division by the expected batch size), with the ``grad_sample_mode``
  it resolves (``auto`` by default; the table shows which mode ran);
* ``dp-layers`` (LSTMs only): the ``dp=True`` model (``PerSampleLSTM``) trained
  with plain SGD, which splits the LSTMs' slowdown into "lost the fused
  kernel" and "per-sample clipping".

Poisson sampling only changes which examples form a batch, not the cost
per example being measured, so batches are fixed. Warm-up steps are
discarded, then a time budget (``--seconds``, at least three steps) or a
fixed number of steps (``--steps``) is timed for each mode in turn, and that
round is repeated ``--repeats`` times; the median is reported. Interleaving
the modes keeps a shared machine's load drift out of the DP/plain ratio.

    python benchmarks/train_throughput.py                # full run, a few minutes
    python benchmarks/train_throughput.py --quick        # smoke run, seconds (CI)
    python benchmarks/train_throughput.py --json out.json --models cnn,char-lstm
    python benchmarks/train_throughput.py --grad-sample-mode hooks   # force one Opacus mode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import opacus
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from confide.client.models import MODELS, build_model, count_parameters
from confide.privacy.dp.sgd import GRAD_SAMPLE_MODES, DpSgdStepper

VOCAB = 97


@dataclass(frozen=True)
class Case:
    """One model at one batch shape."""

    model: str
    batch_size: int
    seq_len: int = 0  # only for character models

    @property
    def label(self) -> str:
        shape = f"B={self.batch_size}" + (f", T={self.seq_len}" if self.seq_len else "")
        return f"{self.model} ({shape})"


@dataclass
class Result:
    """Throughput of one case in one mode: the median and every repeat."""

    model: str
    batch_size: int
    seq_len: int
    mode: str
    parameters: int
    samples_per_s: float
    repeats: list[float] = field(default_factory=list)
    steps_per_repeat: list[int] = field(default_factory=list)
    grad_sample_mode: str | None = None  # the Opacus mode that ran (dp-sgd only)


def default_cases(char_seq_len: int) -> list[Case]:
    """Batch shapes a site would really train with (McMahan's B=10, and a larger B)."""
    return [
        Case("cnn", 10),
        Case("cnn", 64),
        Case("cnn-small", 10),
        Case("cnn-small", 64),
        Case("char-lstm", 10, char_seq_len),
        Case("char-transformer", 10, char_seq_len),
        Case("seq-lstm", 64),
        Case("seq-transformer", 64),
    ]


def make_batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    kind = MODELS[case.model].input_kind
    b = case.batch_size
    if kind == "image":
        return torch.randn(b, 1, 28, 28, generator=gen), torch.randint(0, 10, (b,), generator=gen)
    if kind == "chars":
        tokens = torch.randint(0, VOCAB, (b, case.seq_len + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    return torch.randn(b, 6, 8, generator=gen), torch.randint(0, 2, (b,), generator=gen)


def model_kwargs(case: Case) -> dict[str, Any]:
    # The char Transformer's position table must cover the benchmarked length.
    if case.model == "char-transformer":
        return {"max_len": max(128, case.seq_len)}
    return {}


@dataclass
class Trainer:
    """A one-step closure for one mode, and the Opacus mode it runs (dp-sgd only)."""

    step: Callable[[], None]
    grad_sample_mode: str | None = None
    close: Callable[[], None] = lambda: None


def make_trainer(case: Case, mode: str, grad_sample_mode: str) -> Trainer:
    """Build the model (and optimizer) for ``mode`` and return its one-step closure."""
    torch.manual_seed(0)
    model: nn.Module = build_model(case.model, dp=mode != "plain", **model_kwargs(case))
    x, y = make_batch(case)
    if mode == "dp-sgd":
        # The stepper stays open for the whole run: its hooks are the cost being measured.
        stepper = DpSgdStepper(
            model,
            noise_multiplier=1.0,
            clip_norm=1.0,
            expected_batch_size=float(case.batch_size),
            lr=0.01,
            grad_sample_mode=grad_sample_mode,
            example=x,
        )

        def private_step() -> None:
            stepper.step(x, y)

        return Trainer(private_step, stepper.grad_sample_mode, stepper.close)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        optimizer.step()

    return Trainer(step)


MIN_STEPS = 3


def time_steps(step: Callable[[], None], steps: int | None, seconds: float) -> tuple[int, float]:
    """Run ``steps`` steps, else >= ``seconds`` and >= MIN_STEPS; return (steps, elapsed s)."""
    done = 0
    start = time.perf_counter()
    while True:
        step()
        done += 1
        elapsed = time.perf_counter() - start
        if steps is not None:
            if done >= steps:
                return done, elapsed
        elif elapsed >= seconds and done >= MIN_STEPS:
            return done, elapsed


def measure(case: Case, args: argparse.Namespace) -> list[Result]:
    """Time every mode of ``case``, interleaved round by round."""
    modes = modes_for(case.model)
    trainers = {mode: make_trainer(case, mode, args.grad_sample_mode) for mode in modes}
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.step()
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    counts: dict[str, list[int]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode, trainer in trainers.items():
            done, elapsed = time_steps(trainer.step, args.steps, args.seconds)
            rates[mode].append(done * case.batch_size / elapsed)
            counts[mode].append(done)
    for trainer in trainers.values():
        trainer.close()
    torch.manual_seed(0)
    params = count_parameters(build_model(case.model, **model_kwargs(case)))
    return [
        Result(
            case.model,
            case.batch_size,
            case.seq_len,
            mode,
            params,
            statistics.median(rates[mode]),
            rates[mode],
            counts[mode],
            trainers[mode].grad_sample_mode,
        )
        for mode in modes
    ]


def modes_for(model: str) -> list[str]:
    return ["plain", "dp-layers", "dp-sgd"] if "lstm" in model else ["plain", "dp-sgd"]


def machine_info() -> dict[str, Any]:
    return {**machine(), "opacus": opacus.__version__}


def print_table(
    results: list[Result], cases: list[Case], info: dict[str, Any], grad_sample_mode: str
) -> None:
    by_key = {(r.model, r.batch_size, r.seq_len, r.mode): r for r in results}
    header = [
        "model",
        "params",
        "plain /s",
        "DP-SGD /s",
        "DP slowdown",
        "DP mode",
        "DP layers, plain SGD /s",
    ]
    rows: list[list[str]] = []
    for case in cases:
        key = (case.model, case.batch_size, case.seq_len)
        plain, dp = by_key[(*key, "plain")], by_key[(*key, "dp-sgd")]
        layers = by_key.get((*key, "dp-layers"))
        rows.append(
            [
                case.label,
                f"{plain.parameters:,}",
                f"{plain.samples_per_s:,.0f}",
                f"{dp.samples_per_s:,.1f}",
                f"{plain.samples_per_s / dp.samples_per_s:.1f}x",
                dp.grad_sample_mode or "",
                f"{layers.samples_per_s:,.1f}" if layers else "",
            ]
        )
    title = (
        f"Local training throughput, samples/s (median): {info['cpu']}, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, opacus {info['opacus']}, "
        f"grad_sample_mode={grad_sample_mode}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for line in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        return
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # CI logs are not terminals and would default to 80 columns, wrapping every row.
    console = Console()
    Console(width=max(console.width, 120)).print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="time budget per repeat (at least 3 steps)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="a fixed number of timed steps instead of --seconds"
    )
    parser.add_argument(
        "--grad-sample-mode",
        choices=list(GRAD_SAMPLE_MODES),
        default="auto",
        help="per-sample gradient method for the DP-SGD runs (auto: what train_private picks)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy machine)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported")
    parser.add_argument("--seq-len", type=int, default=80, help="character sequence length")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 steps, 1 repeat, T=16 (a few seconds)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 1
        args.seq_len = min(args.seq_len, 16)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; use some of: {', '.join(MODELS)}")
    if (args.steps is not None and args.steps < 1) or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wanted = set(args.models.split(","))
    cases = [c for c in default_cases(args.seq_len) if c.model in wanted]
    info = machine_info()
    results: list[Result] = []
    # Opacus' hook internals warn; the timing is unaffected and the warnings
    # would bury the table.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            for result in measure(case, args):
                results.append(result)
                print(
                    f"  {case.label:<32} {result.mode:<9} {result.samples_per_s:10.1f} samples/s"
                    + (f" ({result.grad_sample_mode})" if result.grad_sample_mode else ""),
                    file=sys.stderr,
                    flush=True,
                )
    print_table(results, cases, info, args.grad_sample_mode)
    if args.json is not None:
        payload = {
            "benchmark": "train_throughput",
            "machine": info,
            "settings": {
                "steps": args.steps,
                "seconds": None if args.steps is not None else args.seconds,
                "grad_sample_mode": args.grad_sample_mode,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "seq_len": args.seq_len,
                "quick": args.quick,
            },
            "results": [asdict(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
