"""The site agent: hosts a Flower ClientApp and works for the coordinator over mutual TLS.

`confide site start --kit KIT --config site.toml` runs a :class:`SiteAgent`. The agent
dials *out* to the coordinator (a hospital or bank firewall needs no inbound rule), joins
with the site's startup kit, long-polls for tasks, streams the round's model down, runs
the ClientApp named in site.toml (any Flower ``ClientApp``, as ``module:attribute``, like
``flwr run``), streams the result up and reports progress with heartbeats.

Failure handling, in one place:

* refused at join (revoked or wrong-role certificate, other protocol version): fatal,
  :class:`SiteRefused`; retrying would only hammer the coordinator;
* the coordinator unreachable or timing out: exponential backoff (0.5 s doubling up to
  ``max_backoff_seconds``, with jitter) on a fresh channel, then join again;
* the session gone (NOT_FOUND / UNAUTHENTICATED / PERMISSION_DENIED after join, e.g. the
  coordinator restarted): join again, with the same backoff;
* one task failing (the app raises, replies with an error or an unusable result, the model
  stream is malformed): ``ReportError`` and keep polling. One bad task never stops a site.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import logging
import random
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import grpc
import numpy as np
import numpy.typing as npt
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from confide import __version__, wire
from confide.client.dialect import AppDialect
from confide.client.privacy import PrivacySettings, RoundRefused, SitePrivacy
from confide.config import first_error, fix, load_toml, no_nul
from confide.errors import ConfideError, ConfigError
from confide.logs import JsonFormatter
from confide.privacy.crypto import Kit, UpdateSigner
from confide.privacy.crypto.pki import split_address
from confide.privacy.dp import federated as dpfed
from confide.privacy.secagg import SecAggClient, SecAggError
from confide.privacy.secagg import federated as secagg_fl
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient
from confide.sims.engine import instruction
from confide.tuning import keep_large_buffers

__all__ = [
    "DEFAULT_APP",
    "AgentSettings",
    "CoordinatorUnreachable",
    "SiteAgent",
    "SiteConfig",
    "SiteRefused",
    "configure_logging",
    "load_app",
    "load_site_config",
    "node_id_for",
]

DEFAULT_APP = "confide.client.apps:mnist_cnn"
MiB = 1024 * 1024
GRPC_MAX_MESSAGE = 64 * MiB
# A data chunk must fit in one gRPC message with room for the framing.
MAX_CHUNK_MB = 32
JOIN_TIMEOUT = 15.0
CONTROL_TIMEOUT = 10.0  # Heartbeat, ReportError
PULL_GRACE = 10.0  # PullTask timeout = the long-poll budget + this
STOP_REPORT_TIMEOUT = 2.0
INITIAL_BACKOFF = 0.5
# A coordinator answering WAIT at once (no long poll) must not make the site spin.
MIN_POLL_INTERVAL = 1.0
# Sent to the coordinator when the app raises: the exception's type only. Its message may
# quote the site's data (a value that failed to parse, a patient's row), and raw data never
# leaves the site; the full traceback goes to the site's own log.
ERROR_MESSAGE_LIMIT = 500

FATAL_AT_JOIN = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
SESSION_LOST = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    # A certificate revoked mid-session; joining again turns it into a fatal refusal.
    grpc.StatusCode.PERMISSION_DENIED,
}
# The coordinator refused this one transfer (malformed, too late, too big): the task fails,
# the session is fine.
TASK_LEVEL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
}

log = logging.getLogger("confide.site")

UserValue = bool | int | float | str
_APP_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class SiteRefused(ConfideError):
    """The coordinator refused this site at join; retrying cannot help."""

    def __init__(self, code: str, details: str, message: str) -> None:
        self.code = code
        self.details = details
        super().__init__(message)


class CoordinatorUnreachable(ConfideError):
    """The coordinator stayed unreachable for ``max_attempts`` consecutive attempts."""


@dataclass
class _SecAggRound:
    """A site's secure-aggregation state between the stages of one round (memory only)."""

    round: int
    client: SecAggClient
    update: npt.NDArray[np.float64]
    examples: int


@dataclass
class _Release:
    """The site's last DP release, kept (in memory) so that the same round asked again on
    the same global model (a restarted coordinator resuming from its checkpoint, or a
    retried round) gets the same release back instead of a second training run: sending it
    again is post-processing, so no new ε is spent and the ledger counts the round once.

    Not reused once its masked input left the site in a secure-aggregation session: two
    sessions summing the same inputs over different survivors would difference to one
    site's update; that round is trained afresh and recorded as the release it is.
    """

    plan: dpfed.DpPlan
    model_id: str
    payload: wire.Payload
    masked_sent: bool = False

    def serves(self, plan: dpfed.DpPlan, model_id: str) -> bool:
        return not self.masked_sent and self.plan == plan and self.model_id == model_id


class _Stopped(Exception):
    """The agent was asked to stop; unwinds whatever it was doing."""


class _SessionLost(Exception):
    """The coordinator no longer knows this session; join again."""


class _TaskFailed(Exception):
    """One task cannot be done; reported to the coordinator with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


# --------------------------------------------------------------------------- configuration


class AgentSettings(BaseModel):
    """The ``[agent]`` table of site.toml: how the agent talks to the coordinator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poll_seconds: float = Field(
        10.0, gt=0, le=3600, json_schema_extra=fix("use a number of seconds in (0, 3600]")
    )
    max_backoff_seconds: float = Field(
        30.0, gt=0, le=3600, json_schema_extra=fix("use a number of seconds in (0, 3600]")
    )
    max_model_mb: float = Field(
        1024.0, gt=0, json_schema_extra=fix("use a positive size in MiB, e.g. 1024")
    )
    chunk_mb: float | None = Field(
        None,
        gt=0,
        le=MAX_CHUNK_MB,
        json_schema_extra=fix(
            f"use a size in MiB in (0, {MAX_CHUNK_MB}], or leave it unset for the "
            "coordinator's chunk size"
        ),
    )
    log_json: bool = Field(False, json_schema_extra=fix("use true or false"))
    transfer_timeout_seconds: float = Field(
        3600.0,
        gt=0,
        json_schema_extra=fix("use a positive number of seconds for one model download/upload"),
    )


class DeidSettings(BaseModel):
    """[deid]: de-identify the site's raw export before the ClientApp sees any data."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _no_nul = field_validator("*")(no_nul)

    config: Path = Field(
        json_schema_extra=fix(
            "name the deid.toml with a role for every column (docs/deidentification.md)"
        )
    )
    input: Path = Field(json_schema_extra=fix("name the raw CSV export (.csv or .csv.gz)"))
    output: Path = Field(
        json_schema_extra=fix(
            "name where the de-identified CSV goes (site-private); the app reads only this"
        )
    )
    report: Path | None = Field(
        None,
        json_schema_extra=fix("name a JSON file for the report (default: output + .report.json)"),
    )

    def report_path(self) -> Path:
        return self.report or self.output.with_name(self.output.name + ".report.json")


class SiteConfig(BaseModel):
    """site.toml: which ClientApp to host, where the coordinator is, what the app is told."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _no_nul = field_validator("*")(no_nul)

    app: str = Field(
        DEFAULT_APP,
        json_schema_extra=fix(
            "name a Flower ClientApp as module:attribute, e.g. confide.client.apps:mnist_cnn "
            "(add --app-dir for a module next to site.toml)"
        ),
    )
    coordinator: str | None = Field(
        None,
        json_schema_extra=fix(
            "write it as HOST:PORT, e.g. coordinator.example.org:50051, or leave it unset "
            "to use the address in the kit"
        ),
    )
    node_config: dict[str, UserValue] = Field(
        default_factory=dict,
        json_schema_extra=fix(
            "use flat key = value pairs (numbers, text, booleans), e.g. partition-id = 0"
        ),
    )
    run_config: dict[str, UserValue] = Field(
        default_factory=dict,
        json_schema_extra=fix(
            'use flat key = value pairs (numbers, text, booleans), e.g. seed = 0, data-dir = "…"'
        ),
    )
    agent: AgentSettings = Field(
        default_factory=AgentSettings, json_schema_extra=fix("see the [agent] keys in the docs")
    )
    deid: DeidSettings | None = Field(
        None, json_schema_extra=fix("see the [deid] keys in docs/deidentification.md")
    )
    privacy: PrivacySettings | None = Field(
        None,
        json_schema_extra=fix(
            "see the [privacy] keys (epsilon_max, delta, require_dp) in docs/privacy.md"
        ),
    )
    state_dir: Path = Field(
        Path("site-state"),
        json_schema_extra=fix(
            "name a site-private folder for the site's audit log and keys (relative paths "
            "are read from site.toml's folder)"
        ),
    )

    @field_validator("app")
    @classmethod
    def _app_spec(cls, v: str) -> str:
        if not _APP_SPEC.fullmatch(v):
            raise ValueError(f"{v!r} is not module:attribute")
        return v

    @field_validator("coordinator")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            split_address(v)
        except ConfigError as e:
            raise ValueError(e.problem) from None
        return v.strip()


def load_site_config(path: Path, *, coordinator: str | None = None) -> SiteConfig:
    """Read and validate site.toml; ``coordinator`` (the ``--coordinator`` flag) wins."""
    raw = load_toml(Path(path))
    base = Path(path).resolve().parent
    state_dir = raw.get("state_dir", "site-state")
    if isinstance(state_dir, str) and not Path(state_dir).is_absolute():
        raw["state_dir"] = str(base / state_dir)
    deid = raw.get("deid")
    if isinstance(deid, dict):  # [deid] paths are relative to site.toml's folder
        raw["deid"] = {
            k: str(base / v)
            if k in ("config", "input", "output", "report")
            and isinstance(v, str)
            and not Path(v).is_absolute()
            else v
            for k, v in deid.items()
        }
    flags: set[str] = set()
    if coordinator is not None:
        raw["coordinator"] = coordinator
        flags.add("coordinator")
    return validate_site_config(raw, flag_fields=flags)


def validate_site_config(
    raw: Mapping[str, Any], *, flag_fields: set[str] | None = None
) -> SiteConfig:
    """Validate a site.toml document; the first problem becomes one :class:`ConfigError`."""
    agent = raw.get("agent")
    if isinstance(agent, Mapping):
        # Validated on its own first so the fix comes from the [agent] key itself.
        try:
            AgentSettings.model_validate(agent)
        except ValidationError as err:
            e = first_error(err, AgentSettings)
            raise ConfigError(f"agent.{e.field}", e.problem, e.fix) from None
    try:
        return SiteConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise first_error(err, SiteConfig, flag_fields=flag_fields or ()) from None


_APP_FIX = "name a Flower ClientApp as module:attribute, e.g. confide.client.apps:mnist_cnn"


def load_app(spec: str, *, app_dir: Path | None = None) -> ClientApp:
    """Import the Flower ``ClientApp`` named ``module:attribute`` (``app_dir`` searched first)."""
    obj = load_attribute(spec, app_dir=app_dir)
    if not isinstance(obj, ClientApp):
        raise ConfigError(
            "app",
            f"{spec} is a {type(obj).__name__}, not a flwr.clientapp.ClientApp",
            "point app at a ClientApp object (e.g. `app = ClientApp()` with @app.train())",
        )
    return obj


def load_attribute(
    spec: str,
    *,
    app_dir: Path | None = None,
    field: str = "app",
    fix_name: str = _APP_FIX,
) -> Any:
    """Import the object named ``module:attribute`` (``app_dir`` searched first).

    Errors name ``field`` (the setting that held ``spec``) and say how to fix it.
    """
    if not isinstance(spec, str) or not _APP_SPEC.fullmatch(spec):
        raise ConfigError(field, f"{spec!r} is not module:attribute", fix_name)
    if app_dir is not None:
        folder = Path(app_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(
                "--app-dir", f"no such folder: {app_dir}", "pass the folder that holds the module"
            )
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                field,
                f"no module named {e.name!r} (from {spec!r})",
                "check the spelling, or pass --app-dir with the folder that holds the module",
            ) from None
        raise ConfigError(
            field,
            f"importing {module_name!r} failed: {e}",
            "install the missing package in the site's Python environment",
        ) from None
    except Exception as e:
        raise ConfigError(
            field,
            f"importing {module_name!r} raised {type(e).__name__}: {e}",
            "fix the error in that module (try `python -c 'import " + module_name + "'`)",
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"module {module_name!r} has no attribute {attr!r}", fix_name)
        obj = getattr(obj, part)
    return obj


def node_id_for(site_id: str) -> int:
    """A stable, positive 63-bit Flower node id for a site (0 is the server's)."""
    digest = hashlib.sha256(site_id.encode()).digest()
    return (int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)) or 1


# --------------------------------------------------------------------------- logging


def configure_logging(
    log_json: bool = False, *, stream: TextIO | None = None, verbose: bool = False
) -> logging.Handler:
    """Send ``confide.site`` events to ``stream`` (stderr) as text or JSON lines.

    Returns the handler so a caller (a test) can remove it again.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return handler


def _event(event: str, text: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, text, extra={"event": event, "fields": fields})


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3g} MB"


def _metrics_text(metrics: Mapping[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- heartbeats


class _Heartbeat:
    """Sends Heartbeat every ``interval`` seconds while a task runs; notes a cancellation."""

    def __init__(self, agent: SiteAgent, session_id: str, task_id: str, interval: float) -> None:
        self._agent = agent
        self._session_id = session_id
        self._task_id = task_id
        self._interval = interval
        self._done = threading.Event()
        self.cancelled = threading.Event()
        self.status = "starting"
        self.progress = 0.0
        self._thread: threading.Thread | None = None

    def set(self, status: str, progress: float) -> None:
        self.status, self.progress = status, progress

    def __enter__(self) -> _Heartbeat:
        if self._interval > 0:
            self._thread = threading.Thread(
                target=self._run, name="confide-site-heartbeat", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        stub = self._agent._stub
        while not self._done.wait(self._interval):
            if stub is None or self._agent._stopping.is_set():
                return
            request = pb.HeartbeatRequest(
                session_id=self._session_id,
                task_id=self._task_id,
                progress=self.progress,
                status=self.status,
            )
            try:
                reply = stub.Heartbeat(request, timeout=min(CONTROL_TIMEOUT, self._interval + 5))
            except grpc.RpcError as e:
                _event(
                    "heartbeat_failed",
                    f"heartbeat failed: {e.code().name}: {e.details()}",
                    logging.DEBUG,
                    code=e.code().name,
                )
                continue
            if reply.cancel_task and not self.cancelled.is_set():
                self.cancelled.set()
                _event(
                    "cancelled",
                    f"task {self._task_id}: the coordinator cancelled it",
                    logging.WARNING,
                    task_id=self._task_id,
                )


# --------------------------------------------------------------------------- the agent


class SiteAgent:
    """One site's connection to the coordinator, running one Flower ClientApp.

    ``run()`` blocks until the federation ends (returns 0), :meth:`stop` is called
    (returns the code given to ``stop``), the coordinator refuses the site
    (:class:`SiteRefused`) or ``max_attempts`` consecutive connection attempts fail
    (:class:`CoordinatorUnreachable`). One agent runs once.
    """

    def __init__(self, kit: Kit, config: SiteConfig, *, app: ClientApp | None = None) -> None:
        if kit.role != "site":
            raise ConfigError(
                "--kit",
                f"{kit.path} is the kit of {kit.role} {kit.identity!r}, not of a site",
                "use the kit issued with `confide pki issue --role site`",
            )
        self.kit = kit
        self.config = config
        self.settings = config.agent
        self.app = app if app is not None else load_app(config.app)
        self.dialect = AppDialect.of(self.app)  # message API or a NumPyClient's legacy records
        self.address = config.coordinator or kit.coordinator_address
        self._state = RecordDict()  # the app's Context.state, kept for the agent's lifetime
        self._context: Context | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._exit_code = 0
        self._inflight: Any = None
        self._channel: grpc.Channel | None = None
        self._stub: CoordinatorClient | None = None
        self._session: str | None = None
        self._site_id = kit.identity
        self._heartbeat_seconds = 0.0
        self._chunk_bytes = wire.DEFAULT_CHUNK_BYTES
        self._failures = 0
        self._last_error = ""
        self._secagg: _SecAggRound | None = None
        self._released: _Release | None = None
        self._run_config: dict[str, UserValue] = dict(config.run_config)
        self.deid_report: dict[str, Any] | None = None
        self.privacy = SitePrivacy(
            config.state_dir, kit.identity, config.privacy, self._record_audit
        )
        self._budget_applied = False

    def _client(self) -> CoordinatorClient:
        if self._stub is None:  # the channel was closed under us: stopping or reconnecting
            raise _Stopped
        return self._stub

    # --- control ----------------------------------------------------------------------

    def stop(self, exit_code: int = 0) -> None:
        """Make :meth:`run` return ``exit_code`` soon; the current RPC is abandoned.

        Thread-safe; a ClientApp in the middle of training is left to finish in its own
        (daemon) thread and its result is dropped.
        """
        with self._lock:
            if self._stopping.is_set():
                return
            self._exit_code = exit_code
            self._stopping.set()
            call = self._inflight
        _event("stopping", f"stopping (exit code {exit_code})", exit_code=exit_code)
        if call is not None:
            call.cancel()

    def prepare_data(self) -> dict[str, Any]:
        """De-identify ``[deid] input`` into ``output`` and point the app at it.

        Runs before the agent connects. When the k-anonymity gate (or anything else)
        fails, nothing is written, the error is raised and the site never trains. The
        app's ``data-dir`` becomes the de-identified file, so the ClientApp never reads
        the raw export. The report (no data) is logged and written beside the output.
        """
        from confide.privacy.deid import deidentify_file

        deid = self.config.deid
        assert deid is not None
        _event(
            "deidentifying",
            f"de-identifying {deid.input} with {deid.config} before training",
            input=str(deid.input),
        )
        try:
            report = deidentify_file(deid.config, deid.input, deid.output, deid.report_path())
        except ConfideError as e:
            _event(
                "deid_refused",
                f"refusing to train: de-identification failed: {e}",
                logging.ERROR,
                error=str(e),
            )
            # The reason (column names and counts, never cell values) is kept for audits.
            self._record_audit("deid_refused", {"error": type(e).__name__, "reason": str(e)})
            raise
        summary: dict[str, Any] = {
            "k": report.k_achieved,
            "l": report.l_achieved,
            "rows_in": report.rows_in,
            "rows_out": report.rows_out,
            "suppressed": report.rows_suppressed,
            "config_sha256": report.config_sha256,
            "report": str(deid.report_path()),
        }
        _event(
            "deidentified",
            f"de-identified {report.rows_out} of {report.rows_in} rows: k={report.k_achieved}, "
            f"{report.rows_suppressed} suppressed; the app reads {deid.output} only",
            **summary,
        )
        self._record_audit("deid_report", report.to_dict())
        from confide.privacy.dp import PrivacyLedger

        with PrivacyLedger(self.config.state_dir / "ledger.db", site=self.kit.identity) as ledger:
            ledger.record_report("deid_report", report.to_dict())
        self._run_config["data-dir"] = str(deid.output)
        self.deid_report = summary
        return summary

    def _record_audit(self, kind: str, payload: dict[str, Any]) -> None:
        """Append to the site's own signed, hash-chained audit log (``state_dir``)."""
        from confide.privacy.audit import AuditKey, AuditLog

        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        key = AuditKey.load_or_generate(state / "audit.key")
        with AuditLog(state / "audit.db") as audit:
            entry = audit.append(f"site:{self.kit.identity}", kind, payload, key)
        _event(
            "audited",
            f"{kind} recorded in the site's audit log (entry {entry.seq})",
            kind=kind,
            seq=entry.seq,
            hash=entry.hash,
        )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, max_attempts: int | None = None) -> int:
        """Join, work until the coordinator says STOP, reconnect on the way as needed."""
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 or None")
        keep_large_buffers()  # models move as 1-4 MiB messages: reuse their buffers
        if self.config.deid is not None and self.deid_report is None:
            self.prepare_data()  # fails closed: no de-identified data, no connection
        if not self._budget_applied:
            self.privacy.apply_budget()
            self._budget_applied = True
        self._failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    if self._stub is None:
                        self._open()
                    if self._session is None:
                        self._join()
                    self._serve()
                    _event("finished", "federation finished", site=self._site_id)
                    return 0
                except _Stopped:
                    break
                except _SessionLost as e:
                    self._session = None
                    self._last_error = str(e)
                    _event("session_lost", f"session lost ({e}); joining again", logging.WARNING)
                    self._retry_pause(max_attempts)
                except grpc.RpcError as e:
                    if self._stopping.is_set():
                        break
                    self._session = None
                    self._close()  # a fresh channel skips gRPC's own reconnect backoff
                    self._last_error = f"{e.code().name}: {e.details()}"
                    self._retry_pause(max_attempts)
        except _Stopped:
            pass
        finally:
            self._close()
        _event("stopped", "site agent stopped", exit_code=self._exit_code)
        return self._exit_code

    # --- connection -------------------------------------------------------------------

    def _open(self) -> None:
        options = [
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ("grpc.enable_http_proxy", 0),
        ]
        # Credentials are read from the kit for every channel: a renewed kit is picked up
        # at the next reconnect.
        self._channel = grpc.secure_channel(
            self.address, self.kit.channel_credentials(), options=options
        )
        self._stub = CoordinatorClient(self._channel)

    def _close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def _retry_pause(self, max_attempts: int | None) -> None:
        self._failures += 1
        if max_attempts is not None and self._failures >= max_attempts:
            raise CoordinatorUnreachable(
                f"no working connection to the coordinator at {self.address} after "
                f"{self._failures} attempt(s) (last error: {self._last_error}). Fix: check "
                "that the coordinator runs, the address (kit.json or `coordinator` in "
                "site.toml), DNS and the firewall for outbound connections"
            )
        ceiling = min(
            self.settings.max_backoff_seconds, INITIAL_BACKOFF * 2 ** (self._failures - 1)
        )
        delay = random.uniform(ceiling / 2, ceiling)
        _event(
            "reconnecting",
            f"coordinator at {self.address}: {self._last_error}; reconnecting in {delay:.1f} s "
            f"(attempt {self._failures})",
            logging.WARNING,
            address=self.address,
            error=self._last_error,
            delay_seconds=round(delay, 3),
            attempt=self._failures,
        )
        self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise _Stopped

    @contextmanager
    def _tracked(self, call: Any) -> Iterator[Any]:
        """Register ``call`` so :meth:`stop` can cancel it."""
        with self._lock:
            self._inflight = call
            stopping = self._stopping.is_set()
        if stopping:
            call.cancel()
        try:
            yield call
        finally:
            with self._lock:
                self._inflight = None

    def _unary(self, method: Any, request: Any, timeout: float) -> Any:
        future = method.future(request, timeout=timeout)
        with self._tracked(future):
            try:
                return future.result()
            except grpc.FutureCancelledError:
                raise _Stopped from None
            except grpc.RpcError as e:
                self._raise_for(e)
                raise

    def _raise_for(self, e: grpc.RpcError) -> None:
        """Turn a failed call after join into the right unwinding."""
        if self._stopping.is_set():
            raise _Stopped from None
        if e.code() in SESSION_LOST:
            raise _SessionLost(f"{e.code().name}: {e.details()}") from None

    def _join(self) -> None:
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            software=f"confide {__version__}",
            capabilities={"app": self.config.app, **self.privacy.capabilities()},
        )
        future = self._client().Join.future(request, timeout=JOIN_TIMEOUT)
        with self._tracked(future):
            try:
                reply = future.result()
            except grpc.FutureCancelledError:
                raise _Stopped from None
            except grpc.RpcError as e:
                if self._stopping.is_set():
                    raise _Stopped from None
                if e.code() in FATAL_AT_JOIN:
                    raise self._refused(e.code(), e.details() or "") from None
                raise
        if reply.protocol_version and reply.protocol_version != PROTOCOL_VERSION:
            raise self._refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the coordinator speaks protocol {reply.protocol_version}",
            )
        self._session = reply.session_id
        self._heartbeat_seconds = max(0.0, reply.heartbeat_seconds)
        if self.settings.chunk_mb is not None:
            self._chunk_bytes = int(self.settings.chunk_mb * MiB)
        elif reply.chunk_bytes > 0:
            self._chunk_bytes = min(int(reply.chunk_bytes), MAX_CHUNK_MB * MiB)
        else:
            self._chunk_bytes = wire.DEFAULT_CHUNK_BYTES
        site_id = reply.site_id or self.kit.identity
        if self._context is None or site_id != self._site_id:
            self._context = Context(
                run_id=1,
                node_id=node_id_for(site_id),
                node_config=dict(self.config.node_config),
                state=self._state,
                run_config=dict(self._run_config),
            )
        self._site_id = site_id
        _event(
            "joined",
            f"joined federation {reply.federation or self.kit.federation} as {site_id} at "
            f"{self.address} (session {reply.session_id}, heartbeat "
            f"{self._heartbeat_seconds:g} s, chunks {_mb(self._chunk_bytes)})",
            federation=reply.federation,
            site=site_id,
            address=self.address,
            session_id=reply.session_id,
            heartbeat_seconds=self._heartbeat_seconds,
            chunk_bytes=self._chunk_bytes,
        )

    def _refused(self, code: grpc.StatusCode, details: str) -> SiteRefused:
        where = f"the coordinator at {self.address} refused site {self.kit.identity!r}"
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            fix = (
                f"this site speaks protocol {PROTOCOL_VERSION} (confide {__version__}); install "
                "the confide version the coordinator runs"
            )
        elif code is grpc.StatusCode.UNIMPLEMENTED:
            fix = "check the coordinator address: the server there is not a Confide coordinator"
        else:
            fix = (
                "ask the federation administrator whether this site's certificate was revoked "
                "or issued for another federation or role, and for a new kit "
                "(`confide pki issue --role site --force`)"
            )
        # DEBUG only: the exception is the message (the CLI prints it as its one line).
        _event("refused", f"{where}: {code.name}: {details}", logging.DEBUG, code=code.name)
        return SiteRefused(code.name, details, f"{where} ({code.name}: {details}). Fix: {fix}")

    # --- the work loop ----------------------------------------------------------------

    def _serve(self) -> None:
        """Poll and run tasks until STOP (returns) or a failure (raises)."""
        poll = self.settings.poll_seconds
        while True:
            if self._stopping.is_set():
                raise _Stopped
            started = time.monotonic()
            task = self._unary(
                self._client().PullTask,
                pb.PullTaskRequest(session_id=self._session, wait_seconds=poll),
                timeout=poll + PULL_GRACE,
            )
            self._failures = 0  # a working session: the next outage starts at 0.5 s again
            if task.kind == pb.Task.STOP:
                return
            if task.kind in (pb.Task.TRAIN, pb.Task.EVALUATE, pb.Task.SECAGG):
                self._run_task(task)
                continue
            if task.kind != pb.Task.WAIT:
                _event(
                    "unknown_task",
                    f"task {task.task_id}: unknown kind {task.kind}; ignored",
                    logging.WARNING,
                    kind=int(task.kind),
                )
            if time.monotonic() - started < MIN_POLL_INTERVAL:
                self._sleep(MIN_POLL_INTERVAL)

    def _run_task(self, task: pb.Task) -> None:
        train = task.kind == pb.Task.TRAIN
        kind = {pb.Task.TRAIN: "train", pb.Task.SECAGG: "secure-aggregation"}.get(
            task.kind, "evaluate"
        )
        _event(
            "task",
            f"round {task.round}: {kind} task {task.task_id} received",
            task_id=task.task_id,
            round=task.round,
            kind=kind,
            model_id=task.model_id,
        )
        assert self._session is not None
        heartbeat = _Heartbeat(self, self._session, task.task_id, self._heartbeat_seconds)
        try:
            with heartbeat:
                if task.kind == pb.Task.SECAGG:
                    self._do_secagg(task)
                else:
                    self._do_task(task, train, heartbeat)
        except _TaskFailed as e:
            _event(
                "task_failed",
                f"round {task.round}: {kind} task {task.task_id} failed ({e.code}): {e}",
                logging.ERROR,
                task_id=task.task_id,
                round=task.round,
                code=e.code,
                error=str(e),
            )
            self._report(task, e.code, str(e))
        except _Stopped:
            self._report(
                task, "SITE_STOPPED", "the site agent was stopped", timeout=STOP_REPORT_TIMEOUT
            )
            raise
        except grpc.RpcError as e:
            if e.code() not in TASK_LEVEL or self._stopping.is_set():
                raise
            _event(
                "task_failed",
                f"round {task.round}: {kind} task {task.task_id}: the coordinator refused a "
                f"transfer ({e.code().name}: {e.details()})",
                logging.ERROR,
                task_id=task.task_id,
                code=e.code().name,
                error=e.details(),
            )

    def _do_task(self, task: pb.Task, train: bool, heartbeat: _Heartbeat) -> None:
        plan = self._dp_plan(task) if train else None
        reuse = self._released
        if plan is None or reuse is None or not reuse.serves(plan, task.model_id):
            reuse = None
        if plan is not None and reuse is None:
            self._dp_admit(plan)
        heartbeat.set("downloading", 0.0)
        started = time.monotonic()
        model = self._download(task)
        _event(
            "downloaded",
            f"model {task.model_id} downloaded: {len(model.arrays)} arrays, "
            f"{_mb(model.nbytes)} in {time.monotonic() - started:.1f} s",
            task_id=task.task_id,
            bytes=model.nbytes,
            seconds=round(time.monotonic() - started, 3),
        )
        if heartbeat.cancelled.is_set():
            return
        started = time.monotonic()
        if reuse is not None:
            payload = replace(reuse.payload, task_id=task.task_id)
            self._record_audit(
                "release_resent",
                {"round": int(task.round), "model_id": task.model_id, "new_epsilon": 0},
            )
            _event(
                "release_resent",
                f"round {task.round}: this site already released its update for model "
                f"{task.model_id}; the same release is sent again (no new training, no new ε)",
                task_id=task.task_id,
                round=task.round,
            )
        else:
            heartbeat.set("training" if train else "evaluating", 0.1)
            reply = self._call_app(self._instruction(task, train, model))
            payload = self._result(task, train, model, reply)
            if plan is not None:
                try:
                    payload, _ = self.privacy.release(plan, model, payload)
                except RoundRefused as e:
                    raise _TaskFailed(e.code, str(e)) from None
                self._released = _Release(plan, task.model_id, payload)
        seconds = time.monotonic() - started
        _event(
            "trained" if train else "evaluated",
            f"round {task.round}: {'trained' if train else 'evaluated'} in {seconds:.1f} s: "
            f"{_metrics_text(payload.metrics)}",
            task_id=task.task_id,
            round=task.round,
            seconds=round(seconds, 3),
            metrics=payload.metrics,
        )
        if heartbeat.cancelled.is_set():
            _event(
                "skipped_upload",
                f"task {task.task_id} was cancelled by the coordinator; result not uploaded",
                logging.WARNING,
                task_id=task.task_id,
            )
            return
        if train and task.config and "secagg.site" in task.config:
            payload = self._secagg_begin(task, model, payload)
        heartbeat.set("uploading", 0.9)
        self._upload(task, payload)
        heartbeat.set("done", 1.0)

    def _dp_plan(self, task: pb.Task) -> dpfed.DpPlan | None:
        """The round's DP plan (None: a round without DP, if the site allows that)."""
        try:
            config = wire.decode_records(task.config)
        except wire.WireError as e:
            raise _TaskFailed("TASK_FAILED", f"the task's config is malformed: {e}") from None
        try:
            return self.privacy.plan(config, int(task.round))
        except RoundRefused as e:
            raise _TaskFailed(e.code, str(e)) from None

    def _dp_admit(self, plan: dpfed.DpPlan) -> None:
        """Admit a new release against the site's budget (fail closed)."""
        try:
            self.privacy.admit(plan)
        except RoundRefused as e:
            raise _TaskFailed(e.code, str(e)) from None

    # --- secure aggregation (confide.privacy.secagg) --------------------------------------

    def _secagg_begin(
        self, task: pb.Task, model: wire.Payload, payload: wire.Payload
    ) -> wire.Payload:
        """Keep the update here; send only public keys and the app's training metrics.

        The update and its example count leave the site only masked (stage 3).
        """
        try:
            cfg, site = secagg_fl.config_from_record(wire.decode_records(task.config))
            update = secagg_fl.flatten_update(payload.arrays, model.arrays)
            client = SecAggClient(cfg, site)
        except (SecAggError, ConfigError, wire.WireError) as e:
            raise _TaskFailed("SECAGG_REFUSED", f"secure aggregation setup refused: {e}") from None
        n = int(payload.metrics.get(wire.NUM_EXAMPLES, 0))
        if dpfed.EVENTS in payload.config and dpfed.CLIENT_NOISE in task.config:
            # DP-FedAvg weighs every site equally; the largest equal weight keeps the
            # quantization of the masked vector as fine as it goes.
            n = cfg.max_weight
        self._secagg = _SecAggRound(int(task.round), client, update, n)
        metrics: dict[str, wire.ScalarValue] = {
            k: v for k, v in payload.metrics.items() if k != wire.NUM_EXAMPLES
        }
        metrics.update(secagg_fl.to_record(client.advertise()))
        _event(
            "secagg",
            f"round {task.round}: secure aggregation as site {site} of {cfg.sites} "
            f"(k={cfg.neighbours}, t={cfg.threshold}); keys advertised",
            task_id=task.task_id,
            stage=1,
        )
        return wire.Payload(task.task_id, [], [], metrics, dict(payload.config))

    def _do_secagg(self, task: pb.Task) -> None:
        try:
            config = wire.decode_records(task.config)
        except wire.WireError as e:
            raise _TaskFailed("TASK_FAILED", f"the task's config is malformed: {e}") from None
        stage = config.get("secagg.stage")
        state = self._secagg
        if state is None or state.round != task.round:
            raise _TaskFailed(
                "SECAGG_STATE_LOST",
                f"round {task.round}: this site holds no secure-aggregation state for the "
                "round (it restarted after training); it counts as dropped",
            )
        names: list[str] = []
        arrays: list[npt.NDArray[Any]] = []
        try:
            if stage == 2:
                msg: object = state.client.share_keys(secagg_fl.adverts_from_record(config))
            elif stage == 3:
                masked = state.client.masked_input(
                    secagg_fl.boxes_from_record(config), state.update, state.examples
                )
                msg, names, arrays = masked, ["secagg.masked"], [masked.vector]
                state.update = np.zeros(0)  # the plain update is no longer needed
                if self._released is not None and self._released.plan.round == task.round:
                    self._released.masked_sent = True  # (marked before the upload starts)
            elif stage == 4:
                msg = state.client.unmask(secagg_fl.request_from_record(config))
                self._secagg = None
            else:
                raise _TaskFailed("TASK_FAILED", f"unknown secure-aggregation stage {stage!r}")
        except SecAggError as e:
            self._secagg = None
            raise _TaskFailed("SECAGG_REFUSED", str(e)) from None
        _event(
            "secagg",
            f"round {task.round}: secure aggregation stage {stage} "
            f"({secagg_fl.STAGES.get(int(stage), '?')}) done",
            task_id=task.task_id,
            stage=stage,
        )
        self._upload(task, wire.Payload(task.task_id, names, arrays, secagg_fl.to_record(msg), {}))

    def _download(self, task: pb.Task) -> wire.Payload:
        request = pb.DownloadModelRequest(session_id=self._session, model_id=task.model_id)
        stream = self._client().DownloadModel(
            request, timeout=self.settings.transfer_timeout_seconds
        )
        with self._tracked(stream):
            try:
                return wire.decode(stream, max_bytes=int(self.settings.max_model_mb * MiB))
            except wire.WireError as e:
                raise _TaskFailed("MODEL_REJECTED", f"the model stream was refused: {e}") from None
            except grpc.RpcError as e:
                self._raise_for(e)
                raise
            finally:
                stream.cancel()  # no-op when complete; stops a stream refused half-way

    def _instruction(self, task: pb.Task, train: bool, model: wire.Payload) -> Message:
        try:
            config: dict[str, Any] = {
                k: v
                for k, v in wire.decode_records(task.config).items()
                if not k.startswith("secagg.")
            }
        except wire.WireError as e:
            raise _TaskFailed("TASK_FAILED", f"the task's config is malformed: {e}") from None
        config["server-round"] = int(task.round)
        make = self.dialect.train_content if train else self.dialect.evaluate_content
        content = make(model.names, model.arrays, ConfigRecord(config))
        assert self._context is not None
        return instruction(
            content,
            self._context.node_id,
            MessageType.TRAIN if train else MessageType.EVALUATE,
            int(task.round),
            task.task_id,
        )

    def _call_app(self, message: Message) -> Message:
        """Run the ClientApp in a worker thread so a stop signal need not wait for it."""
        box: dict[str, Any] = {}
        done = threading.Event()
        context = self._context
        assert context is not None

        def work() -> None:
            try:
                box["reply"] = self.app(message, context)
            except BaseException as e:  # a ClientApp's sys.exit() must not end the agent
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=work, name="confide-site-app", daemon=True).start()
        while not done.wait(0.2):
            if self._stopping.is_set():
                raise _Stopped
        if "error" in box:
            e = box["error"]
            log.debug("the ClientApp raised", exc_info=(type(e), e, e.__traceback__))
            log.error(
                "the ClientApp raised %s: %s",
                type(e).__name__,
                e,
                extra={"event": "app_error", "fields": {"error": type(e).__name__}},
            )
            raise _TaskFailed(
                "TASK_FAILED",
                f"the ClientApp raised {type(e).__name__} (details in the site's log)",
            )
        reply: Message = box["reply"]
        if not isinstance(reply, Message):
            raise _TaskFailed(
                "TASK_FAILED", f"the ClientApp returned a {type(reply).__name__}, not a Message"
            )
        if reply.has_error():
            reason = str(reply.error.reason)[:ERROR_MESSAGE_LIMIT]
            raise _TaskFailed(
                "TASK_FAILED", f"the ClientApp replied with error {reply.error.code}: {reason}"
            )
        return reply

    def _result(
        self, task: pb.Task, train: bool, model: wire.Payload, reply: Message
    ) -> wire.Payload:
        try:  # a NumPyClient's legacy records, read as the message API's
            content = self.dialect.modern_reply(reply, train, model.names)
        except Exception as e:
            raise _TaskFailed(
                "TASK_FAILED", f"the ClientApp's reply cannot be read: {type(e).__name__}: {e}"
            ) from None
        metric_record = next(iter(content.metric_records.values()), None)
        metrics: dict[str, wire.ScalarValue] = {}
        for key, value in (metric_record or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue  # lists have no place on the wire's scalar records
            if key == wire.NUM_EXAMPLES:
                metrics[key] = int(value)
            else:
                metrics[key] = int(value) if isinstance(value, (int, np.integer)) else float(value)
        names: list[str] = []
        arrays: list[npt.NDArray[Any]] = []
        if train:
            record = next(iter(content.array_records.values()), None)
            if record is None:
                raise _TaskFailed("TASK_FAILED", "the ClientApp's train reply holds no arrays")
            # Read-only views of the reply's bytes (no copy): nothing below writes into
            # them (DP clipping, secagg masking and framing all build new arrays).
            arrays = self.dialect.ndarrays(record)
            if len(arrays) != len(model.arrays):
                raise _TaskFailed(
                    "TASK_FAILED",
                    f"the ClientApp returned {len(arrays)} arrays for a model of "
                    f"{len(model.arrays)}",
                )
            for name, got, sent in zip(model.names, arrays, model.arrays, strict=True):
                if got.shape != sent.shape:
                    raise _TaskFailed(
                        "TASK_FAILED",
                        f"the ClientApp returned {name!r} with shape {list(got.shape)}, "
                        f"the model's is {list(sent.shape)}",
                    )
            names = list(model.names)
        return wire.Payload(task.task_id, names, arrays, metrics, {})

    def _upload(self, task: pb.Task, payload: wire.Payload) -> None:
        # Every upload is signed with the kit's key: federation, round, task, site, a fresh
        # nonce and the stream's digests (confide.privacy.crypto.signing).
        signer = UpdateSigner(
            self.kit,
            federation=self.kit.federation,
            round=int(task.round),
            task_id=payload.task_id,
            site=self._site_id,
        )
        chunks = wire.frames(payload, self._chunk_bytes, signer=signer)
        try:
            first = next(chunks)  # the manifest: dtypes are checked before anything is sent
        except wire.WireError as e:
            raise _TaskFailed("TASK_FAILED", f"the result cannot be sent: {e}") from None
        started = time.monotonic()
        future = self._client().UploadResult.future(
            itertools.chain([first], chunks), timeout=self.settings.transfer_timeout_seconds
        )
        with self._tracked(future):
            try:
                reply = future.result()
            except grpc.FutureCancelledError:
                raise _Stopped from None
            except grpc.RpcError as e:
                self._raise_for(e)
                raise
        seconds = time.monotonic() - started
        _event(
            "uploaded",
            f"round {task.round}: result uploaded: {_mb(payload.nbytes)} in {seconds:.1f} s",
            task_id=task.task_id,
            bytes=payload.nbytes,
            bytes_received=reply.bytes_received,
            seconds=round(seconds, 3),
        )
        if reply.accepted:
            _event(
                "accepted",
                f"round {task.round}: the coordinator accepted the result",
                task_id=task.task_id,
            )
        else:
            _event(
                "rejected",
                f"round {task.round}: the coordinator rejected the result: {reply.reason}",
                logging.WARNING,
                task_id=task.task_id,
                reason=reply.reason,
            )

    def _report(
        self, task: pb.Task, code: str, message: str, *, timeout: float = CONTROL_TIMEOUT
    ) -> None:
        """Best effort: a failed report is logged; the next PullTask finds any real outage."""
        stub = self._stub
        if stub is None or self._session is None:
            return
        request = pb.SiteError(
            session_id=self._session,
            task_id=task.task_id,
            code=code,
            message=message[:ERROR_MESSAGE_LIMIT],
        )
        try:
            stub.ReportError(request, timeout=timeout)
        except grpc.RpcError as e:
            _event(
                "report_failed",
                f"could not report the failure of task {task.task_id}: {e.code().name}",
                logging.WARNING,
                task_id=task.task_id,
                code=e.code().name,
            )
