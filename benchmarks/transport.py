"""Transport: model download/upload throughput over mutual TLS, and the overhead of a round.

Everything runs on 127.0.0.1 with real mutual TLS, made by the project's own PKI
(``init_ca`` / ``issue``) in a temporary folder.

1. Throughput. A real :class:`Coordinator` (``start()`` + ``run()``) holds a 1M- or
   10M-parameter float32 model (4 / 40 MB). One site joins and pulls the round-1 TRAIN
   task, which publishes the model under a model id (only public API and the wire
   contract are used, no private method). It then times ``DownloadModel`` of that model
   (stream decoded and SHA-256-checked by ``confide.wire.decode``, as the site agent does)
   and ``UploadResult`` of the same arrays from a ``confide.wire.frames`` stream (both
   through ``confide.rpc.CoordinatorClient``, the agent's client); the
   upload names an unknown task, so the coordinator reads and decodes the whole stream,
   then rejects it (its ``bytes_received`` is checked against what was sent). Chunks of
   1 and 4 MiB. Next to it, raw grpcio on the same TLS credentials, chunk size and
   process layout: a generic client-streaming (upload) / server-streaming (download)
   handler of plain bytes, no protobuf message, no hashing. The client runs in its own
   process (a site is one) unless ``--client-in-process``. MB = 10^6 bytes; MB/s is
   payload bytes / wall seconds, median of ``--repeats`` after one warm-up.
   Target: >= 300 MB/s with 4 MiB chunks. Raw grpcio here: 510-700 MB/s (1 MiB),
   750-950 MB/s (4 MiB) per TARGETS.md.

2. Round overhead: everything but local training. A federation on a 1,001,000-parameter
   model (``nn.Linear(1000, 1000)``), ``min_sites`` = N sites, 3 rounds, FedAvg; every
   site runs a Flower ``ClientApp`` that returns the received arrays unchanged with
   ``num-examples`` = 1 (train) and only metrics (evaluate). The round time is the
   coordinator's own ``RoundRecord.seconds`` (median over rounds). Sites are real
   ``SiteAgent`` objects, either in threads of this process (sharing its GIL with the
   coordinator) or in ``--agent-procs`` helper processes (threads there); both are run
   so the distortion of the first is measured. Per-phase times come from wrappers set
   on the coordinator *instance* from outside (no change to its code); when the target
   (<= 1 s per round at 50 sites) is missed, one more run is profiled with cProfile
   (CPU time per thread, coordinator process only) and its top entries printed.
   With ``CONFIDE_BENCH_AGENT_PROFILE=DIR`` each agent helper process also writes its
   merged per-thread profile to ``DIR/agents-PID.pstats`` (read it with ``pstats``).

3. The raw grpcio floor of a round (unless ``--skip-raw-floor``): for each site count,
   the same round's bytes (every site downloads the model and uploads as much, 4 MiB
   chunks, the same TLS credentials) with plain grpcio handlers and clients, the sites
   in ``--agent-procs`` helper processes; a round is timed from opening it to the last
   upload received. Printed beside the round overhead with the ratio.

    python benchmarks/transport.py                    # full: a few minutes on 2 cores
    python benchmarks/transport.py --quick            # smoke run (CI), seconds
    python benchmarks/transport.py --json benchmarks/results/transport.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Light imports only at the top: the throughput client process needs neither torch nor flwr.
import grpc
import numpy as np
from _federation import (  # shared with load.py: PKI, config, models, site agents
    MODEL_1M,
    MODEL_10M,
    AgentLog,
    AgentProcs,
    AgentThreads,
    HelperProcs,
    ThreadProfiles,
    background,
    federation_config,
    load_average,
    make_pki,
    print_environment,
)

from confide import wire
from confide.privacy.crypto import UpdateSigner, load_kit
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient
from confide.tuning import keep_large_buffers

MiB = 1024 * 1024
MB = 1e6
TARGET_MB_S = 300.0  # with 4 MiB chunks
TARGET_ROUND_S = 1.0  # per round, 50 sites, 1M parameters
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
    ("grpc.enable_http_proxy", 0),
]
RAW_SERVICE = "bench.Raw"
RPC_TIMEOUT = 120.0


# --------------------------------------------------------------------------- models, app


FACTORIES = {1: MODEL_1M, 10: MODEL_10M}


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- coordinator


class Served:
    """A real Coordinator: gRPC server started, its round loop in a thread; always stopped."""

    def __init__(self, cfg: Any, log_file: Path) -> None:
        from confide.server.coordinator import Coordinator

        self.c = Coordinator(cfg)
        self.port = 0
        self.code: int | None = None
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        self.log_handler = logging.FileHandler(log_file)
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.warnings = _Count(logging.WARNING)
        logger = logging.getLogger("confide.coordinator")
        logger.setLevel(logging.INFO)  # as `confide coordinator start` logs: to a file here
        logger.propagate = False
        logger.addHandler(self.log_handler)
        logger.addHandler(self.warnings)

    def start(self) -> int:
        self.port = self.c.start()
        self.thread = threading.Thread(target=self._run, name="bench-coordinator-loop", daemon=True)
        self.thread.start()
        return self.port

    def _run(self) -> None:
        try:
            self.code = self.c.run()
        except Exception as e:  # reported in the results, never swallowed silently
            self.error = f"{type(e).__name__}: {e}"

    def wait(self, timeout: float) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.thread is None or not self.thread.is_alive()

    def stop(self) -> None:
        self.c.stop_event.set()
        self.c.board.finish()
        self.wait(15.0)
        self.c.shutdown(grace=1.0)
        logger = logging.getLogger("confide.coordinator")
        logger.removeHandler(self.log_handler)
        logger.removeHandler(self.warnings)
        self.log_handler.close()


class _Count(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --------------------------------------------------------------------------- raw grpcio


class RawServer:
    """Plain-bytes gRPC handlers on the coordinator's TLS credentials: the transport floor.

    ``Wait`` gates rounds for the round floor (:func:`run_raw_rounds`): a client asks for
    round r and is answered once the driver opens it (round 0: "connected", at once)."""

    def __init__(
        self, credentials: grpc.ServerCredentials, data: bytes, max_chunk: int, workers: int = 4
    ) -> None:
        self.data = data
        self._pieces: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()
        self._gate = threading.Condition()
        self._round = self._ready = self._uploads = 0
        limit = 2 * max_chunk + MiB  # the coordinator's own message limits
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        handler = grpc.method_handlers_generic_handler(
            RAW_SERVICE,
            {
                "Upload": grpc.stream_unary_rpc_method_handler(self._upload),
                "Download": grpc.unary_stream_rpc_method_handler(self._download),
                "Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
                "Wait": grpc.unary_unary_rpc_method_handler(self._wait),
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = int(self.server.add_secure_port("127.0.0.1:0", credentials))

    def pieces(self, chunk: int) -> list[bytes]:
        with self._lock:
            if chunk not in self._pieces:
                d = self.data
                self._pieces[chunk] = [d[i : i + chunk] for i in range(0, len(d), chunk)]
            return self._pieces[chunk]

    def _upload(self, it: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        n = 0
        for b in it:
            n += len(b)
        with self._gate:
            self._uploads += 1
            self._gate.notify_all()
        return n.to_bytes(8, "little")

    def _wait(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        want = int.from_bytes(request, "little")
        with self._gate:
            if want == 0:
                self._ready += 1
                self._gate.notify_all()
            opened = self._gate.wait_for(lambda: self._round >= want, timeout=RPC_TIMEOUT)
        return b"\x01" if opened else b"\x00"

    def wait_ready(self, clients: int, timeout: float) -> bool:
        with self._gate:
            return self._gate.wait_for(lambda: self._ready >= clients, timeout=timeout)

    def run_round(self, rnd: int, clients: int, timeout: float) -> float | None:
        """Open round ``rnd``; seconds until ``clients`` uploads are in (None: timed out)."""
        with self._gate:
            self._uploads = 0
            t0 = time.perf_counter()
            self._round = rnd
            self._gate.notify_all()
            done = self._gate.wait_for(lambda: self._uploads >= clients, timeout=timeout)
            return time.perf_counter() - t0 if done else None

    def _download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.pieces(int.from_bytes(request, "little"))

    def start(self) -> int:
        self.server.start()
        return self.port

    def stop(self) -> None:
        self.server.stop(1.0).wait(3.0)


# --------------------------------------------------------------------------- throughput client


def throughput_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs where the site would: joins, takes the TRAIN task, times transfers both ways."""
    keep_large_buffers()  # as the site agent does when it starts
    kit = load_kit(Path(spec["kit"]))
    creds = kit.channel_credentials()
    chunks_mb: list[int] = spec["chunks_mb"]
    repeats: int = spec["repeats"]
    with (
        grpc.secure_channel(f"127.0.0.1:{spec['port']}", creds, options=CLIENT_OPTIONS) as ch,
        grpc.secure_channel(f"127.0.0.1:{spec['raw_port']}", creds, options=CLIENT_OPTIONS) as rch,
    ):
        stub = CoordinatorClient(ch)  # what the site agent uses: raw frames for the streams
        session = stub.Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION, software="transport-bench"),
            timeout=15,
        ).session_id
        model_id = ""
        rnd = 0
        for _ in range(30):  # bounded: the loop publishes the round-1 task within seconds
            task = stub.PullTask(pb.PullTaskRequest(session_id=session, wait_seconds=2), timeout=15)
            if task.kind == pb.Task.TRAIN:
                model_id, rnd = task.model_id, task.round
                break
        if not model_id:
            raise RuntimeError("the coordinator published no TRAIN task")

        def download(chunk: int, check: bool) -> tuple[float, wire.Payload]:
            """One DownloadModel, decoded and verified as the agent does; ``check`` (warm-up
            only: it copies every chunk) also verifies the chunk size the coordinator used."""
            sizes: list[int] = []

            def watched(stream: Iterator[bytes]) -> Iterator[bytes]:
                for c in stream:
                    part = pb.Chunk.FromString(c)
                    if part.WhichOneof("part") == "data":
                        sizes.append(len(part.data))
                    yield c

            t0 = time.perf_counter()
            stream = stub.DownloadModel(
                pb.DownloadModelRequest(session_id=session, model_id=model_id, chunk_bytes=chunk),
                timeout=RPC_TIMEOUT,
            )
            payload = wire.decode(watched(stream) if check else stream, max_bytes=1 << 31)
            dt = time.perf_counter() - t0
            if check and max(sizes) != min(chunk, payload.nbytes):
                raise RuntimeError(f"asked for {chunk}-byte chunks, got up to {max(sizes)}")
            return dt, payload

        _, model = download(4 * MiB, True)
        nbytes = model.nbytes
        if nbytes != spec["nbytes"]:
            raise RuntimeError(f"downloaded {nbytes} bytes, expected {spec['nbytes']}")
        upload_payload = wire.Payload(
            "bench-not-a-task", model.names, model.arrays, {"num-examples": 1}, {}
        )
        raw_data = b"".join(np.ascontiguousarray(a).tobytes() for a in model.arrays)
        raw_up = rch.stream_unary(f"/{RAW_SERVICE}/Upload")
        raw_down = rch.unary_stream(f"/{RAW_SERVICE}/Download")
        raw_ping = rch.unary_unary(f"/{RAW_SERVICE}/Ping")

        def upload(chunk: int, expected: int, check: bool) -> float:
            """One UploadResult of a signed ``wire.frames`` stream, as the agent sends it
            (signed with the kit's key, a fresh nonce each); the coordinator must have read
            all of it (``bytes_received``), and on the warm-up (``check``) exactly the bytes
            sent on this very stream. A DER signature is 70-72 bytes: ``expected`` is exact
            to those few bytes."""
            sent = 0
            signer = UpdateSigner.for_task(kit, rnd, upload_payload.task_id)

            def counted() -> Iterator[bytes]:
                nonlocal sent
                for c in wire.frames(upload_payload, chunk, signer=signer):
                    sent += len(c)
                    yield c

            t0 = time.perf_counter()
            reply = stub.UploadResult(counted(), timeout=RPC_TIMEOUT)
            dt = time.perf_counter() - t0
            if reply.accepted or "unknown task" not in reply.reason:
                raise RuntimeError(f"unexpected upload reply: {reply}")
            if abs(reply.bytes_received - expected) > 2 or (check and sent != reply.bytes_received):
                raise RuntimeError(
                    f"sent {expected} bytes, coordinator read {reply.bytes_received}"
                )
            return dt

        def raw_upload(pieces: list[bytes]) -> float:
            t0 = time.perf_counter()
            n = int.from_bytes(raw_up(iter(pieces), timeout=RPC_TIMEOUT), "little")
            dt = time.perf_counter() - t0
            if n != len(raw_data):
                raise RuntimeError(f"raw upload: {n} of {len(raw_data)} bytes")
            return dt

        def raw_download(chunk: int) -> float:
            t0 = time.perf_counter()
            n = sum(len(b) for b in raw_down(chunk.to_bytes(8, "little"), timeout=RPC_TIMEOUT))
            dt = time.perf_counter() - t0
            if n != len(raw_data):
                raise RuntimeError(f"raw download: {n} of {len(raw_data)} bytes")
            return dt

        rows = []
        for mb in chunks_mb:
            chunk = mb * MiB
            # What the coordinator should report reading: the same stream (to the signature's
            # length, 70-72 bytes).
            signer = UpdateSigner.for_task(kit, rnd, upload_payload.task_id)
            expected = sum(len(c) for c in wire.frames(upload_payload, chunk, signer=signer))
            pieces = [raw_data[i : i + chunk] for i in range(0, len(raw_data), chunk)]
            times: dict[str, list[float]] = {k: [] for k in ("cd", "rd", "cu", "ru")}
            for rep in range(repeats + 1):  # the first is the warm-up; Confide and raw alternate
                cd = download(chunk, rep == 0)[0]
                rd = raw_download(chunk)
                cu = upload(chunk, expected, rep == 0)
                ru = raw_upload(pieces)
                if rep:
                    for k, v in zip(("cd", "rd", "cu", "ru"), (cd, rd, cu, ru), strict=True):
                        times[k].append(v)
            for direction, c_key, r_key in (("download", "cd", "rd"), ("upload", "cu", "ru")):
                rows.append(
                    {
                        "direction": direction,
                        "chunk_mib": mb,
                        "payload_bytes": nbytes,
                        "confide_seconds": times[c_key],
                        "raw_seconds": times[r_key],
                        "confide_mb_s": nbytes / MB / med(times[c_key]),
                        "raw_mb_s": nbytes / MB / med(times[r_key]),
                    }
                )

        def rtt(call: Callable[[], Any], n: int) -> float:
            for _ in range(10):
                call()
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                samples.append(time.perf_counter() - t0)
            return 1e3 * med(samples)

        hb = pb.HeartbeatRequest(session_id=session)
        unary = {
            "confide_heartbeat_ms": rtt(lambda: stub.Heartbeat(hb, timeout=10), spec["pings"]),
            "raw_unary_ms": rtt(lambda: raw_ping(b"x", timeout=10), spec["pings"]),
        }
    return {"rows": rows, "unary": unary, "model_id": model_id}


def run_throughput(
    args: argparse.Namespace, tmp: Path, coordinator_dir: Path, kit_dir: Path
) -> list[dict[str, Any]]:
    results = []
    for params_m in args.sizes:
        cfg = federation_config(
            coordinator_dir,
            tmp / f"throughput-{params_m}m",
            model=FACTORIES[params_m],
            sites=1,
            rounds=1,
            eval_fraction=0.0,
            long_lived=True,
        )
        served = Served(cfg, tmp / f"throughput-{params_m}m.log")
        raw: RawServer | None = None
        try:
            weights = served.c.weights
            data = b"".join(np.ascontiguousarray(w).tobytes() for w in weights)
            raw = RawServer(served.c.files.server_credentials(), data, served.c.chunk_bytes)
            spec = {
                "kit": str(kit_dir),
                "port": served.start(),
                "raw_port": raw.start(),
                "chunks_mb": args.chunks,
                "repeats": args.repeats,
                "nbytes": len(data),
                "pings": 50 if args.quick else 300,
            }
            if args.client_in_process:
                out = throughput_client(spec)
            else:
                out = _client_process(spec, tmp / f"throughput-{params_m}m.json")
            traffic = served.c.traffic_bytes()
        finally:
            if raw is not None:
                raw.stop()
            served.stop()
        if served.error:
            raise RuntimeError(f"coordinator failed: {served.error}")
        for row in out["rows"]:
            row["params"] = sum(int(w.size) for w in weights)
        results.append(
            {
                "params_m": params_m,
                "params": sum(int(w.size) for w in weights),
                "rows": out["rows"],
                "unary": out["unary"],
                "coordinator_traffic_bytes": traffic,
                "coordinator_warnings": len(served.warnings.messages),
            }
        )
    return results


def _client_process(spec: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--throughput-client", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"throughput client failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- raw round floor


def raw_round_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Helper process: one thread and channel per site kit; each round, every thread waits
    for the round to open, downloads the model and uploads it back (raw bytes, the same
    chunks and TLS credentials as the coordinator's): the bytes of a Confide round, with
    nothing else."""
    keep_large_buffers()
    chunk, rounds, nbytes = spec["chunk"], spec["rounds"], spec["nbytes"]
    errors: list[str] = []

    def site(kit_dir: str) -> None:
        creds = load_kit(Path(kit_dir)).channel_credentials()
        try:
            with grpc.secure_channel(
                f"127.0.0.1:{spec['port']}", creds, options=CLIENT_OPTIONS
            ) as ch:
                wait = ch.unary_unary(f"/{RAW_SERVICE}/Wait")
                down = ch.unary_stream(f"/{RAW_SERVICE}/Download")
                up = ch.stream_unary(f"/{RAW_SERVICE}/Upload")
                wait((0).to_bytes(8, "little"), timeout=RPC_TIMEOUT)  # connected
                for rnd in range(1, rounds + 1):
                    if wait(rnd.to_bytes(8, "little"), timeout=RPC_TIMEOUT) != b"\x01":
                        raise RuntimeError(f"round {rnd} never opened")
                    data = b"".join(down(chunk.to_bytes(8, "little"), timeout=RPC_TIMEOUT))
                    if len(data) != nbytes:
                        raise RuntimeError(f"downloaded {len(data)} of {nbytes} bytes")
                    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
                    n = int.from_bytes(up(iter(pieces), timeout=RPC_TIMEOUT), "little")
                    if n != nbytes:
                        raise RuntimeError(f"uploaded {n} of {nbytes} bytes")
        except Exception as e:  # reported in the summary; the driver's round times out
            errors.append(f"{kit_dir}: {type(e).__name__}: {e}")

    cpu = time.process_time()
    threads = [threading.Thread(target=site, args=(k,), daemon=True) for k in spec["kits"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=RPC_TIMEOUT * (rounds + 1))
    return {"cpu_seconds": time.process_time() - cpu, "errors": errors[:5]}


def run_raw_rounds(
    *,
    sites: int,
    rounds: int,
    kits: Sequence[Path],
    coordinator_dir: Path,
    tmp: Path,
    procs: int,
) -> dict[str, Any]:
    """The transport floor of a round: what raw grpcio needs here to move a Confide round's
    bytes (every site downloads the 1M-parameter model and uploads as much), in the same
    layout as the ``procs`` run (this process serves, ``procs`` helpers hold the sites)."""
    from confide.privacy.crypto import load_coordinator

    data = np.random.default_rng(0).standard_normal(1_001_000).astype(np.float32).tobytes()
    chunk = 4 * MiB  # the benchmark federation's chunk_mb
    raw = RawServer(
        load_coordinator(coordinator_dir).server_credentials(), data, chunk, workers=sites + 8
    )
    port = raw.start()
    helpers = HelperProcs(
        [sys.executable, str(Path(__file__).resolve()), "--raw-round-client"],
        [
            (
                tmp / f"raw-rounds-{sites}-{g}.json",
                {
                    "port": port,
                    "kits": [str(k) for k in kits[:sites][g::procs]],
                    "chunk": chunk,
                    "rounds": rounds,
                    "nbytes": len(data),
                },
            )
            for g in range(procs)
        ],
        missing={"cpu_seconds": 0.0, "errors": ["no summary"]},
    )
    seconds: list[float] = []
    cpu: list[float] = []
    try:
        helpers.start()
        if not raw.wait_ready(sites, 120.0):
            raise RuntimeError(
                f"raw round floor: not all {sites} clients connected: {helpers.stderr_tails()}"
            )
        for rnd in range(1, rounds + 1):
            c0 = time.process_time()
            took = raw.run_round(rnd, sites, RPC_TIMEOUT)
            if took is None:
                raise RuntimeError(f"raw round floor: round {rnd} did not complete")
            seconds.append(took)
            cpu.append(time.process_time() - c0)
        helpers.wait(60.0)
    finally:
        helpers.stop()
        raw.stop()
    summaries = helpers.results()
    client_cpu = sum(r["cpu_seconds"] for r in summaries)
    errors = [e for r in summaries for e in r["errors"]]
    if errors:
        raise RuntimeError(f"raw round floor: {errors[:3]}")
    return {
        "sites": sites,
        "procs": procs,
        "round_seconds": seconds,
        "round_median_s": med(seconds),
        "server_cpu_s_per_round": med(cpu),
        "clients_cpu_s_per_round": client_cpu / rounds,
    }


# --------------------------------------------------------------------------- round overhead


class PhaseClock:
    """Times the coordinator loop's steps by wrapping methods on the instance, from outside."""

    def __init__(self, served: Served) -> None:
        self.rows: list[tuple[int, str, float]] = []
        self.cpu: dict[int, float] = {}
        self.round = 0
        self.in_eval = False
        c = served.c
        self.served = served
        self._wrap(c, "_run_round", self._round)
        self._wrap(c, "_evaluate", self._evaluate)
        self._wrap(c, "_publish_model", self._timed(lambda a: f"publish ({self._which()} model)"))
        self._wrap(c.board, "wait_phase", self._timed(lambda a: f"{a[0].kind.value} phase"))
        self._wrap(c.strategy, "aggregate", self._timed(lambda a: "aggregate (FedAvg)"))
        self._wrap(c.store, "save_checkpoint", self._timed(lambda a: "checkpoint (npz+fsync)"))
        for name in ("round_started", "round_finished", "event"):
            self._wrap(c.store, name, self._timed(lambda a: "state.db writes"))

    def _which(self) -> str:
        return "eval" if self.in_eval else "train"

    def _loop(self) -> bool:
        return threading.current_thread() is self.served.thread

    @staticmethod
    def _wrap(
        obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        setattr(obj, name, make(getattr(obj, name)))

    def _timed(
        self, label: Callable[[tuple[Any, ...]], str]
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(orig: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*a: Any, **k: Any) -> Any:
                if not self._loop():
                    return orig(*a, **k)
                t0 = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    self.rows.append((self.round, label(a), time.perf_counter() - t0))

            return wrapper

        return make

    def _round(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(rnd: int) -> Any:
            self.round = rnd
            cpu = time.process_time()
            try:
                return orig(rnd)
            finally:
                self.cpu[rnd] = time.process_time() - cpu
                self.round = -1  # what runs after the rounds (_finish) counts for none

        return wrapper

    def _evaluate(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(rnd: int) -> Any:
            self.in_eval = True
            try:
                return orig(rnd)
            finally:
                self.in_eval = False

        return wrapper

    def per_round(self, rounds: Sequence[int], seconds: dict[int, float]) -> dict[str, float]:
        """Median over rounds of each step's seconds, plus what no step accounts for."""
        labels = sorted({lab for _, lab, _ in self.rows}, key=_PHASE_ORDER.index)
        out: dict[str, float] = {}
        for lab in labels:
            out[lab] = med(
                [sum(s for r, la, s in self.rows if r == rnd and la == lab) for rnd in rounds]
            )
        others = [seconds[rnd] - sum(s for r, _, s in self.rows if r == rnd) for rnd in rounds]
        out["other (selection, metrics, locks)"] = med(others)
        return out


_PHASE_ORDER = [
    "publish (train model)",
    "train phase",
    "aggregate (FedAvg)",
    "publish (eval model)",
    "evaluate phase",
    "checkpoint (npz+fsync)",
    "state.db writes",
]


_IDLE = ("SimpleQueue", "'acquire'", "time.sleep", "threading.py", "futures/thread.py")


def top_entries(profiler: ThreadProfiles, n: int) -> dict[str, list[dict[str, Any]]]:
    """The ``n`` busiest functions by self time, and ours by cumulative time."""
    stats = profiler.stats()
    if stats is None:
        return {"self": [], "confide": []}
    entries = []
    for (path, line, func), (_, calls, tt, ct, _) in stats.stats.items():
        where = _short(path)
        entries.append(
            {
                "function": f"{func} ({where}:{line})",
                "calls": calls,
                "self_s": tt,
                "cum_s": ct,
                "path": path,
            }
        )
    # Blocked waits, and thread frames still open at the snapshot (their times are bogus).
    busy = [e for e in entries if not any(m in e["function"] for m in _IDLE)]
    by_self = sorted(busy, key=lambda e: -e["self_s"])[:n]
    ours = [e for e in entries if "/confide/" in e["path"]]
    by_cum = sorted(ours, key=lambda e: -e["cum_s"])[:n]
    for e in entries:
        e.pop("path")
    return {"self": by_self, "confide": by_cum}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/confide/", "/lib/python"):
        if marker in path:
            return (
                path.split(marker, 1)[1]
                if marker != "/confide/"
                else "confide/" + path.split(marker, 1)[1]
            )
    return path


def run_federation(
    *,
    sites: int,
    mode: str,
    eval_fraction: float,
    rounds: int,
    kits: Sequence[Path],
    coordinator_dir: Path,
    tmp: Path,
    agent_procs: int,
    profile: bool = False,
) -> dict[str, Any]:
    label = f"{sites}-{mode}-eval{eval_fraction:g}{'-profiled' if profile else ''}"
    work = tmp / label
    work.mkdir()
    cfg = federation_config(
        coordinator_dir,
        work / "state",
        model=MODEL_1M,
        sites=sites,
        rounds=rounds,
        eval_fraction=eval_fraction,
    )
    served = Served(cfg, work / "coordinator.log")
    clock = PhaseClock(served)
    agent_log = AgentLog()
    threads: AgentThreads | None = None
    procs: AgentProcs | None = None
    # In-process site agents are not the coordinator.
    profiler = ThreadProfiles(skip=("bench-site", "confide-site")) if profile else None
    budget = 240.0 + 30.0 * rounds * (2 if eval_fraction else 1)
    started = time.perf_counter()
    finished = False
    try:
        if profiler is not None:  # every thread the coordinator starts from here on
            profiler.install()
        port = served.start()
        address = f"127.0.0.1:{port}"
        if mode == "threads":
            agent_log.install()
            threads = AgentThreads(kits[:sites], address, range(sites), sites)
            threads.start()
        else:
            procs = AgentProcs(kits[:sites], address, agent_procs, work, deadline=budget)
            procs.start()
        finished = served.wait(budget)
        if threads is not None:
            threads.wait(30.0)
        if procs is not None:
            procs.wait(30.0)
    finally:
        if profiler is not None:
            profiler.uninstall()
        if threads is not None:
            threads.stop()
            agent_log.uninstall()
        if procs is not None:
            procs.stop()
        served.stop()
    wall = time.perf_counter() - started
    if not finished or served.error or served.code != 0:
        raise RuntimeError(
            f"federation {label} did not finish (code {served.code}, error {served.error}); "
            f"coordinator warnings: {served.warnings.messages[:5]}"
        )
    timings = agent_log.timings
    problems = list(agent_log.problems)
    late_cancels = agent_log.late_cancels
    agent_cpu = None
    codes = list(threads.codes) if threads is not None else []
    if procs is not None:
        timings = {k: [] for k in timings}
        agent_cpu = 0.0
        for r in procs.results():
            codes += r.get("codes", [])
            problems += r.get("problems", [])
            late_cancels += r.get("late_cancels", 0)
            agent_cpu += r.get("cpu_seconds", 0.0)
            for k, v in r.get("timings", {}).items():
                timings[k] += v
    records = [r for r in served.c.history.rounds if r.round >= 1]
    seconds = {r.round: r.seconds for r in records}
    rnds = sorted(seconds)
    result: dict[str, Any] = {
        "label": label,
        "sites": sites,
        "agents": mode if mode == "threads" else f"{agent_procs} procs",
        "eval_fraction": eval_fraction,
        "rounds": rounds,
        "round_seconds": [seconds[r] for r in rnds],
        "round_median_s": med([seconds[r] for r in rnds]),
        "baseline_eval_s": next((r.seconds for r in served.c.history.rounds if r.round == 0), None),
        "sites_succeeded_min": min((r.sites_succeeded for r in records), default=0),
        "coordinator_cpu_s_per_round": med([clock.cpu[r] for r in rnds if r in clock.cpu]),
        "agents_cpu_s_total": agent_cpu,  # helper processes, from the agents' start to exit
        "agents_cpu_s_per_round": agent_cpu / rounds if agent_cpu is not None else None,
        "agent_median_s": {k: med(v) for k, v in timings.items()},
        "agent_max_s": {k: max(v) if v else float("nan") for k, v in timings.items()},
        "phases_median_s": clock.per_round(rnds, seconds),
        "agent_exit_codes_ok": all(c == 0 for c in codes) and len(codes) == sites,
        "problems": problems[:10],
        "late_cancel_replies": late_cancels,
        "coordinator_warnings": served.warnings.messages[:10],
        "traffic_bytes": served.c.traffic_bytes(),
        "wall_s": wall,
    }
    if profiler is not None:
        result["profile"] = top_entries(profiler, 15)
    return result


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10], choices=sorted(FACTORIES))
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 4], help="chunk sizes in MiB")
    p.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--eval", type=float, nargs="+", default=[0.0, 1.0], help="evaluation fractions")
    p.add_argument(
        "--agents", nargs="+", default=["threads", "procs"], choices=["threads", "procs"]
    )
    p.add_argument("--agent-procs", type=int, default=2, help="helper processes for procs mode")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--client-in-process", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rounds", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: seconds")
    p.add_argument("--json", default=None)
    p.add_argument("--skip-raw-floor", action="store_true", help="skip the raw grpcio round floor")
    p.add_argument("--throughput-client", help=argparse.SUPPRESS)
    p.add_argument("--raw-round-client", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.throughput_client:
        spec = json.loads(Path(args.throughput_client).read_text())
        print(json.dumps(throughput_client(spec)), flush=True)
        return 0
    if args.raw_round_client:
        spec = json.loads(Path(args.raw_round_client).read_text())
        print(json.dumps(raw_round_client(spec)), flush=True)
        return 0
    if args.quick:
        args.repeats, args.sizes, args.chunks = 2, [1], [1, 4]
        args.sites, args.rounds, args.eval, args.agents = [3], 2, [0.0], ["threads"]
        args.profile = "never"

    os.environ.setdefault("COLUMNS", "150")  # rich tables: wide enough when not on a TTY
    from _common import print_table, write_json

    busy_before, load_before = background(), load_average()
    n_kits = max(args.sites) if not args.skip_rounds else 1
    with tempfile.TemporaryDirectory(prefix="confide-transport-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        coordinator_dir, kits = make_pki(tmp / "pki", n_kits)
        pki_s = time.perf_counter() - t0

        throughput: list[dict[str, Any]] = []
        if not args.skip_throughput:
            throughput = run_throughput(args, tmp, coordinator_dir, kits[0])
        runs: list[dict[str, Any]] = []
        if not args.skip_rounds:
            for sites in args.sites:
                for mode in args.agents:
                    for ev in args.eval:
                        runs.append(
                            run_federation(
                                sites=sites,
                                mode=mode,
                                eval_fraction=ev,
                                rounds=args.rounds,
                                kits=kits,
                                coordinator_dir=coordinator_dir,
                                tmp=tmp,
                                agent_procs=args.agent_procs,
                            )
                        )
        floors: dict[int, dict[str, Any]] = {}
        if not args.skip_rounds and not args.skip_raw_floor:
            for sites in args.sites:
                floors[sites] = run_raw_rounds(
                    sites=sites,
                    rounds=args.rounds,
                    kits=kits,
                    coordinator_dir=coordinator_dir,
                    tmp=tmp,
                    procs=min(args.agent_procs, sites),
                )
        biggest = [r for r in runs if r["sites"] == max(args.sites)]
        missed = any(r["round_median_s"] > TARGET_ROUND_S for r in biggest)
        profiled = None
        if runs and (args.profile == "always" or (args.profile == "auto" and missed)):
            profiled = run_federation(
                sites=max(args.sites),
                mode="procs" if "procs" in args.agents else args.agents[0],
                eval_fraction=0.0,
                rounds=2,
                kits=kits,
                coordinator_dir=coordinator_dir,
                tmp=tmp,
                agent_procs=args.agent_procs,
                profile=True,
            )
    busy_after, load_after = background(), load_average()

    print(f"PKI: CA + {n_kits} site kits in {pki_s:.1f} s (temporary folder, mutual TLS)")
    print_environment(load_before, load_after, busy_before, busy_after)
    where = "in this process" if args.client_in_process else "in its own process"
    for t in throughput:
        print_table(
            f"Throughput, {t['params']:,} float32 parameters, loopback mutual TLS "
            f"(client {where}; MB = 1e6 B; median of {args.repeats} after a warm-up)",
            [
                "direction",
                "chunk",
                "Confide MB/s",
                "raw grpcio MB/s",
                "Confide / raw",
                "Confide min-max MB/s",
                "target",
            ],
            [
                (
                    r["direction"],
                    f"{r['chunk_mib']} MiB",
                    r["confide_mb_s"],
                    r["raw_mb_s"],
                    r["confide_mb_s"] / r["raw_mb_s"],
                    f"{r['payload_bytes'] / MB / max(r['confide_seconds']):.0f}-"
                    f"{r['payload_bytes'] / MB / min(r['confide_seconds']):.0f}",
                    ("met" if r["confide_mb_s"] >= TARGET_MB_S else "MISSED")
                    if r["chunk_mib"] == 4
                    else "-",
                )
                for r in t["rows"]
            ],
        )
        u = t["unary"]
        print(
            f"  unary round trip: Confide Heartbeat {u['confide_heartbeat_ms']:.2f} ms, "
            f"raw grpcio {u['raw_unary_ms']:.2f} ms"
        )
    if runs:
        print_table(
            f"Round overhead, 1,001,000-parameter model, no training, {args.rounds} rounds "
            "(RoundRecord.seconds, median over rounds)",
            [
                "sites",
                "site agents",
                "eval",
                "round s",
                "rounds s",
                "coord. CPU s/round",
                "agents CPU s/round",
                "agent download s",
                "agent app s",
                "agent upload s",
                "raw grpcio round s",
                "Confide / raw",
                "target",
            ],
            [
                (
                    r["sites"],
                    r["agents"],
                    f"{r['eval_fraction']:g}",
                    r["round_median_s"],
                    " ".join(f"{s:.2f}" for s in r["round_seconds"]),
                    r["coordinator_cpu_s_per_round"],
                    "-" if r["agents_cpu_s_per_round"] is None else r["agents_cpu_s_per_round"],
                    r["agent_median_s"]["download"],
                    r["agent_median_s"]["app"],
                    r["agent_median_s"]["upload"],
                    floors[r["sites"]]["round_median_s"] if r["sites"] in floors else "-",
                    r["round_median_s"] / floors[r["sites"]]["round_median_s"]
                    if r["sites"] in floors
                    else "-",
                    ("met" if r["round_median_s"] <= TARGET_ROUND_S else "MISSED")
                    if r["sites"] == 50
                    else "-",
                )
                for r in runs
            ],
        )
        print(
            "  site agents: 'threads' = SiteAgent objects in threads of the coordinator's "
            "process (one GIL); 'N procs' = N helper processes with threads. coord. CPU = "
            "CPU of the coordinator's process during the round (includes in-process agents); "
            "agents CPU = the helper processes' CPU from start to exit / rounds (includes join "
            "and stop). agent download/app/upload = medians of the agents' own timings. "
            "raw grpcio round s = the floor: the same round's bytes (every site downloads "
            "the model and uploads as much, 4 MiB chunks, same TLS credentials) with plain "
            "grpcio handlers and clients, sites in the same helper processes (median over "
            "rounds)."
        )
        for f in floors.values():
            print(
                f"  raw grpcio floor, {f['sites']} sites: rounds "
                + " ".join(f"{x:.2f}" for x in f["round_seconds"])
                + f" s; server CPU {f['server_cpu_s_per_round']:.2f} s/round, clients CPU "
                f"{f['clients_cpu_s_per_round']:.2f} s/round ({f['procs']} procs)"
            )
        for r in runs:
            if r["sites"] == 50:
                verdict = "met" if r["round_median_s"] <= TARGET_ROUND_S else "MISSED"
                print(
                    f"  target <= {TARGET_ROUND_S:g} s/round at 50 sites ({r['agents']}, eval "
                    f"{r['eval_fraction']:g}): {r['round_median_s']:.2f} s -> {verdict}; the "
                    f"coordinator's process used {r['coordinator_cpu_s_per_round']:.2f} CPU s "
                    "per round"
                    + (" (the 50 agents included)" if r["agents"] == "threads" else " (alone)")
                )
        phases = [lab for lab in _PHASE_ORDER if any(lab in r["phases_median_s"] for r in runs)]
        phases.append("other (selection, metrics, locks)")
        print_table(
            "Where a round's time goes (coordinator loop, median seconds per round)",
            ["step", *[f"{r['sites']} {r['agents']} eval {r['eval_fraction']:g}" for r in runs]],
            [(lab, *[r["phases_median_s"].get(lab, float("nan")) for r in runs]) for lab in phases],
        )
        for r in runs:
            ok = r["agent_exit_codes_ok"] and r["sites_succeeded_min"] == r["sites"]
            if not ok or r["problems"]:
                print(f"  {r['label']}: every site ok: {ok}; problems: {r['problems'][:3]}")
    if profiled is not None:
        prof = profiled["profile"]
        print(
            f"Profiled run ({profiled['sites']} sites, {profiled['agents']}, eval 0, 2 rounds, "
            f"round s {profiled['round_seconds']}): cProfile, CPU time, coordinator process"
        )
        print_table(
            "Top functions by own CPU time (all coordinator threads, whole run)",
            ["function", "calls", "own CPU s", "cum CPU s"],
            [(e["function"], e["calls"], e["self_s"], e["cum_s"]) for e in prof["self"]],
        )
        print_table(
            "Confide functions by cumulative CPU time",
            ["function", "calls", "own CPU s", "cum CPU s"],
            [(e["function"], e["calls"], e["self_s"], e["cum_s"]) for e in prof["confide"]],
        )
    write_json(
        args.json,
        {
            "benchmark": "transport",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "environment": {
                "load_before": load_before,
                "load_after": load_after,
                "busy_before": busy_before,
                "busy_after": busy_after,
                "pki_seconds": pki_s,
            },
            "throughput": throughput,
            "rounds": runs,
            "raw_round_floor": list(floors.values()),
            "profiled": profiled,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
