"""Measure this machine for the cost model: training throughput, DP-SGD factor, aggregation.

:func:`calibrate` times real training steps of a built-in model with the very loops a
site runs (:func:`confide.client.training.train` for plain SGD and
:func:`confide.privacy.dp.sgd.train_private`, Opacus DP-SGD, for private training) on a
synthetic in-memory data set, and the coordinator's FedAvg aggregation
(:class:`confide.server.strategy.FedAvg`) on synthetic updates. From those it fits what
:func:`confide.sims.cost.estimate` needs:

* ``utilization`` = achieved FLOP/s (the model's FLOPs per example x examples / s) over
  the peak FLOP/s of the hardware profile (``local``: this machine, from
  ``/proc/cpuinfo``);
* ``dp_factor`` = seconds per example with DP-SGD / without;
* the aggregation cost ``a + b x sites`` seconds per parameter, from two site counts.

Repeats interleave the modes (plain, DP) so a shared machine's load drift stays out of
their ratio, and the median is kept, as ``benchmarks/train_throughput.py`` does.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from confide.errors import ConfigError
from confide.sims.catalog import LOCAL, Catalog, default_catalog, detect_local
from confide.sims.cost import Calibration, builtin_train_flops, example_batch

__all__ = ["Progress", "calibrate", "save_calibration", "time_aggregation"]

Progress = Callable[[str], None]
"""Called once per finished unit of work with a short description of the next one."""


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_aggregation(
    parameters: int = 1_000_000, sites: tuple[int, int] = (2, 8), repeats: int = 3
) -> tuple[float, float]:
    """FedAvg's cost ``(a, b)``: aggregating ``n`` updates takes ``parameters x (a + b n)`` s."""
    from confide.server.strategy import FedAvg, SiteResult

    rng = np.random.default_rng(0)
    strategy = FedAvg()
    global_weights = [np.zeros(parameters, dtype=np.float32)]
    seconds = []
    for n in sites:
        results = [
            SiteResult([rng.random(parameters, dtype=np.float32)], 100 + i) for i in range(n)
        ]
        strategy.aggregate(global_weights, results)  # warm-up
        seconds.append(
            _median_time(functools.partial(strategy.aggregate, global_weights, results), repeats)
        )
    (n0, n1), (t0, t1) = sites, seconds
    b = max(0.0, (t1 - t0) / (n1 - n0) / parameters)
    a = max(0.0, t0 / parameters - b * n0)
    return a, b


def _parallel_worker(
    model: str, batch_size: int, steps: int, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """One of ``parallel`` trainers started together: seconds per example, one thread."""
    import torch

    from confide.client.data import ArrayDataset
    from confide.client.models import MODELS, build_model
    from confide.client.training import train

    torch.set_num_threads(1)
    x, y = example_batch(MODELS[model].input_kind, batch_size * steps)
    data = ArrayDataset(x.numpy(), y.numpy())
    torch.manual_seed(0)
    net = build_model(model)
    train(net, data, epochs=1, batch_size=batch_size, lr=0.01, max_steps=2)  # warm-up
    barrier.wait(timeout=300)
    result = train(net, data, epochs=1, batch_size=batch_size, lr=0.01, max_steps=steps)
    results.put(result.seconds / (result.steps * batch_size))


def time_parallel(model: str, batch_size: int, steps: int, workers: int) -> list[float]:
    """Seconds per example of each of ``workers`` single-threaded trainers run at once.

    Separate processes, as colocated sites are, started behind a barrier so they train
    at the same time.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter each: no fork of torch's threads
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_parallel_worker, args=(model, batch_size, steps, barrier, results))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        times = [float(results.get(timeout=600)) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return times


def calibrate(
    model: str,
    *,
    batch_size: int | None = None,
    steps: int = 20,
    repeats: int = 3,
    warmup: int = 2,
    dp: bool = False,
    hardware: str = LOCAL,
    catalog: Catalog | None = None,
    aggregation_parameters: int = 1_000_000,
    threads: int | None = None,
    parallel: int | None = None,
    progress: Progress | None = None,
) -> Calibration:
    """Time ``model`` on this machine and fit the estimator's factors (see the module doc).

    ``steps`` optimizer steps of ``batch_size`` examples (default: the batch size of the
    model's task) are timed ``repeats`` times per mode; ``dp`` adds DP-SGD (noise
    multiplier 1, clip 1, Poisson rate batch / examples, ``grad_sample_mode`` auto).
    ``threads`` sets torch's intra-op threads for the measurement (default: torch's
    choice, what a site process gets). ``parallel`` (>= 2, with ``threads`` = 1) also
    times that many single-threaded trainers in separate processes at once and stores
    their combined speed over one's as ``parallel_speedup``: the capacity a host of
    colocated sites really has (``[[cost.sites]] colocated``).
    """
    import torch

    from confide.client.data import ArrayDataset
    from confide.client.models import MODELS, build_model
    from confide.client.tasks import TASKS
    from confide.client.training import train
    from confide.privacy.dp.sgd import train_private

    if model not in MODELS:
        raise ConfigError("--model", f"unknown model {model!r}", f"use one of: {', '.join(MODELS)}")
    for name, value, least in (("--steps", steps, 1), ("--repeats", repeats, 1)):
        if value < least:
            raise ConfigError(name, f"must be at least {least} (got {value})", f"use {name} 3")
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads", f"must be at least 1 (got {threads})", "use e.g. 1")
        torch.set_num_threads(threads)
    if batch_size is None:
        batch_size = next((t.batch_size for t in TASKS.values() if model in t.models), 32)
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1 (got {batch_size})", "use e.g. 32")
    catalog = catalog if catalog is not None else default_catalog()
    machine = detect_local()
    if hardware == LOCAL:
        peak, peak_source = machine.peak_flops, machine.peak_source
    else:
        profile = catalog.hardware_profile(hardware, "--hardware")
        peak, peak_source = profile.flops.value, profile.flops.cite

    def step(what: str) -> None:
        if progress is not None:
            progress(what)

    step("counting FLOPs")
    flops_per_example, flops_source = builtin_train_flops(model)
    x, y = example_batch(MODELS[model].input_kind, batch_size * steps)
    data = ArrayDataset(x.numpy(), y.numpy())
    n = len(data)
    torch.manual_seed(0)
    plain_model = build_model(model)
    dp_model = build_model(model, dp=True) if dp else None

    def run_plain(k: int) -> float:
        result = train(plain_model, data, epochs=1, batch_size=batch_size, lr=0.01, max_steps=k)
        return result.seconds / (result.steps * batch_size)

    def run_dp(k: int) -> tuple[float, str]:
        assert dp_model is not None
        result = train_private(
            dp_model,
            data,
            noise_multiplier=1.0,
            sample_rate=batch_size / n,
            steps=k,
            clip_norm=1.0,
            lr=0.01,
        )
        return result.seconds / max(1, result.examples_seen), result.grad_sample_mode

    plain_times: list[float] = []
    dp_times: list[float] = []
    grad_sample_mode = ""
    # Opacus warns about its own internals; the timing is unaffected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step("warming up")
        run_plain(warmup)
        if dp:
            run_dp(warmup)
        for r in range(repeats):
            step(f"timing plain SGD ({r + 1}/{repeats})")
            plain_times.append(run_plain(steps))
            if dp:
                step(f"timing DP-SGD ({r + 1}/{repeats})")
                seconds, grad_sample_mode = run_dp(steps)
                dp_times.append(seconds)
    speedup = None
    parallel_times: list[float] = []
    if parallel is not None:
        if parallel < 2 or threads != 1:
            raise ConfigError(
                "--parallel",
                f"needs at least 2 trainers and --threads 1 (got {parallel}, threads {threads})",
                "use --threads 1 --parallel N, N the number of sites the host will run",
            )
        step(f"timing {parallel} trainers at once")
        parallel_times = time_parallel(model, batch_size, steps, parallel)
        speedup = sum(statistics.median(plain_times) / t for t in parallel_times)
    step("timing FedAvg aggregation")
    agg_a, agg_b = time_aggregation(aggregation_parameters)
    per_example = statistics.median(plain_times)
    achieved = flops_per_example / per_example
    dp_factor = statistics.median(dp_times) / per_example if dp_times else None
    return Calibration(
        hardware=hardware,
        model=model,
        peak_flops=peak,
        peak_source=peak_source,
        utilization=achieved / peak,
        achieved_flops=achieved,
        dp_factor=dp_factor,
        aggregation_seconds_per_parameter=agg_a,
        aggregation_seconds_per_parameter_site=agg_b,
        cpu=machine.cpu,
        cores=machine.cores,
        ghz=machine.ghz,
        flops_per_cycle=machine.flops_per_cycle,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        parallel_speedup=speedup,
        extra={
            "batch_size": batch_size,
            "steps": steps,
            "repeats": repeats,
            "train_flops_per_example": flops_per_example,
            "flops_source": flops_source,
            "plain_seconds_per_example": plain_times,
            "dp_seconds_per_example": dp_times,
            "parallel_seconds_per_example": parallel_times,
            "grad_sample_mode": grad_sample_mode or None,
            "aggregation_parameters": aggregation_parameters,
            "machine": _machine(),
        },
    )


def _machine() -> dict[str, Any]:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def save_calibration(calibration: Calibration, path: Path) -> Path:
    """Write ``calibration`` as JSON (what ``[cost] calibration`` and ``--calibration`` read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_json(), indent=2) + "\n")
    return path
