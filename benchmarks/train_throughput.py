"""Measure local training throughput (samples/s) of every registered model, without and with DP-SGD.

One step is forward + backward + optimizer step on a fixed in-memory batch,
so the figure is compute only (no data loading). Each model is timed three
ways:

* ``plain``: the non-private model (fused ``nn.LSTM`` for the LSTMs), plain SGD;
* ``dp-sgd``: the ``dp=True`` model wrapped by ``opacus.PrivacyEngine.make_private``
  (per-sample gradients, clipping, noise), which is what a private site runs;
* ``dp-layers`` (LSTMs only): the ``dp=True`` model (``DPLSTM``) trained with
  plain SGD, which splits the LSTMs' slowdown into "lost the fused kernel"
  and "per-sample gradients".

Warm-up steps are discarded, then a time budget (``--seconds``, at least
three steps) or a fixed number of steps (``--steps``) is timed; this is
repeated ``--repeats`` times and the median is reported. The machine is
shared, so repeats matter.

``--grad-sample-mode ghost`` times Opacus' ghost clipping (per-sample
gradient *norms* without materialising per-sample gradients) instead of the
default ``hooks``.

    python benchmarks/train_throughput.py                # full run, a few minutes
    python benchmarks/train_throughput.py --quick        # smoke run, seconds (CI)
    python benchmarks/train_throughput.py --json out.json --models cnn,char-lstm
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
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from confide.client.models import MODELS, build_model, count_parameters

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


def make_trainer(case: Case, mode: str, grad_sample_mode: str) -> Callable[[], None]:
    """Build the model and optimizer for ``mode`` and return a one-step closure."""
    torch.manual_seed(0)
    model: nn.Module = build_model(case.model, dp=mode != "plain", **model_kwargs(case))
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion: Any = nn.CrossEntropyLoss()
    x, y = make_batch(case)
    ghost = mode == "dp-sgd" and grad_sample_mode == "ghost"
    if mode == "dp-sgd":
        loader = DataLoader(TensorDataset(x, y), batch_size=case.batch_size)
        # Poisson sampling only changes which samples form a batch, not the
        # per-sample gradient cost being measured, so fixed batches are used.
        wrapped = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=grad_sample_mode,
            **({"criterion": criterion} if ghost else {}),
        )
        model, optimizer = wrapped[0], wrapped[1]
        if ghost:
            # Ghost clipping runs its second backward pass inside this loss's backward().
            criterion = wrapped[2]
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        flat = (logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if ghost and logits.dim() == 3:
            # Ghost clipping needs one loss per sample, so it is told how to
            # fold the flattened (B*T) per-token losses back into (B, T).
            criterion(*flat, shape=logits.shape).backward()
        else:
            criterion(*flat).backward()
        optimizer.step()

    return step


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


def measure(case: Case, mode: str, args: argparse.Namespace) -> Result:
    step = make_trainer(case, mode, args.grad_sample_mode)
    for _ in range(args.warmup):
        step()
    rates: list[float] = []
    counts: list[int] = []
    for _ in range(args.repeats):
        done, elapsed = time_steps(step, args.steps, args.seconds)
        rates.append(done * case.batch_size / elapsed)
        counts.append(done)
    torch.manual_seed(0)
    params = count_parameters(build_model(case.model, **model_kwargs(case)))
    return Result(
        case.model,
        case.batch_size,
        case.seq_len,
        mode,
        params,
        statistics.median(rates),
        rates,
        counts,
    )


def modes_for(model: str) -> list[str]:
    return ["plain", "dp-layers", "dp-sgd"] if "lstm" in model else ["plain", "dp-sgd"]


def machine_info() -> dict[str, Any]:
    return {**machine(), "opacus": opacus.__version__}


def print_table(
    results: list[Result], cases: list[Case], info: dict[str, Any], grad_sample_mode: str
) -> None:
    by_key = {(r.model, r.batch_size, r.seq_len, r.mode): r for r in results}
    header = ["model", "params", "plain /s", "DP-SGD /s", "DP slowdown", "DPLSTM, plain SGD /s"]
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
        choices=["hooks", "ghost"],
        default="hooks",
        help="Opacus per-sample gradient method for the DP-SGD runs",
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = set(args.models.split(","))
    cases = [c for c in default_cases(args.seq_len) if c.model in wanted]
    info = machine_info()
    results: list[Result] = []
    # Opacus warns about its non-cryptographic RNG and hook internals; the
    # timing is unaffected and the warnings would bury the table.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            for mode in modes_for(case.model):
                result = measure(case, mode, args)
                results.append(result)
                print(
                    f"  {case.label:<32} {mode:<9} {result.samples_per_s:10.1f} samples/s",
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
