"""The coordinator's configuration (`federation.toml`), validated before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from confide.config import first_error, fix, load_toml, no_nul
from confide.errors import ConfigError
from confide.privacy.crypto import SealKey
from confide.privacy.dp.federated import DpSettings
from confide.privacy.secagg.federated import SecAggSettings

Scalar = int | float | bool | str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _no_nul = field_validator("*")(no_nul)


class FederationSection(_Section):
    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        json_schema_extra=fix("use the federation name given to `confide pki init`"),
    )
    model: str = Field(
        "cnn",
        json_schema_extra=fix(
            "use a built-in model (cnn, cnn-small, char-lstm, char-transformer, seq-lstm, "
            "seq-transformer) or module:attribute of a function returning a torch module"
        ),
    )
    rounds: int = Field(3, ge=1, json_schema_extra=fix("use a whole number of rounds >= 1"))
    strategy: Literal["fedavg", "fedadam"] = Field(
        "fedavg", json_schema_extra=fix("fedavg or fedadam")
    )
    server_lr: float | None = Field(None, gt=0, json_schema_extra=fix("use a positive rate"))
    seed: int = Field(0, ge=0, json_schema_extra=fix("use a non-negative integer"))
    secure_aggregation: Literal["none", "secagg+"] = Field(
        "none",
        json_schema_extra=fix(
            "use none, or secagg+ (the coordinator learns only the sum; [secagg] tunes it)"
        ),
    )


class SelectionSection(_Section):
    min_sites: int = Field(2, ge=1, json_schema_extra=fix("use a whole number >= 1"))
    fraction: float = Field(1.0, gt=0, le=1, json_schema_extra=fix("use a fraction in (0, 1]"))
    expected_sites: int = Field(
        0,
        ge=0,
        json_schema_extra=fix(
            "use the number of sites to wait for before the first round (0: just min_sites)"
        ),
    )
    over_selection: float = Field(
        0.0,
        ge=0,
        le=1,
        json_schema_extra=fix("use 0 (none) up to 1 (select twice as many as needed)"),
    )
    deadline_seconds: float = Field(600.0, gt=0, json_schema_extra=fix("use seconds > 0"))
    max_attempts: int = Field(
        3, ge=1, json_schema_extra=fix("use >= 1 tries per round before the federation stops")
    )
    wait_for_sites_seconds: float = Field(
        600.0, gt=0, json_schema_extra=fix("use seconds > 0 to wait for min_sites to connect")
    )


class EvaluationSection(_Section):
    fraction: float = Field(1.0, ge=0, le=1, json_schema_extra=fix("use a fraction in [0, 1]"))
    every: int = Field(1, ge=1, json_schema_extra=fix("evaluate every N rounds, N >= 1"))
    deadline_seconds: float = Field(300.0, gt=0, json_schema_extra=fix("use seconds > 0"))


class ServerSection(_Section):
    address: str = Field(
        "127.0.0.1:50051",
        pattern=r"^[^\s:]+:\d+$|^\[[0-9a-fA-F:]+\]:\d+$",
        json_schema_extra=fix("use HOST:PORT, e.g. 0.0.0.0:50051"),
    )
    coordinator_dir: Path = Field(
        Path("pki/coordinator"),
        json_schema_extra=fix("point at the coordinator/ folder made by `confide pki init`"),
    )
    state_dir: Path = Field(Path("state"), json_schema_extra=fix("give a writable folder"))
    chunk_mb: float = Field(4.0, gt=0, le=64, json_schema_extra=fix("use 1 to 4 MB"))
    max_update_mb: float = Field(
        2048.0, gt=0, json_schema_extra=fix("use a size above the model's size in MB")
    )
    heartbeat_seconds: float = Field(5.0, gt=0, json_schema_extra=fix("use seconds > 0"))
    site_timeout_seconds: float = Field(
        30.0, gt=0, json_schema_extra=fix("use seconds > 0; a silent site counts as gone after it")
    )
    max_poll_seconds: float = Field(10.0, gt=0, le=60, json_schema_extra=fix("use 1 to 60"))
    workers: int = Field(64, ge=4, json_schema_extra=fix("use >= 4 (one per connected site)"))
    log_json: bool = Field(False, json_schema_extra=fix("true or false"))
    seal_key_file: Path | None = Field(
        None,
        json_schema_extra=fix(
            "name a 32-byte key file of mode 0600, made by `confide coordinator seal-key --out "
            "PATH` (docs/security.md#data-at-rest)"
        ),
    )
    seal_passphrase_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        json_schema_extra=fix(
            "name an environment variable that holds the passphrase, e.g. CONFIDE_SEAL_PASSPHRASE "
            "(never the passphrase itself)"
        ),
    )


class FederationConfig(_Section):
    """`federation.toml`: the federation, its round schedule, the training config, the server."""

    federation: FederationSection
    selection: SelectionSection = Field(default_factory=SelectionSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    train: dict[str, Scalar] = Field(
        default_factory=dict,
        json_schema_extra=fix("use key = value pairs of numbers, booleans or strings"),
    )
    server: ServerSection = Field(default_factory=ServerSection)
    secagg: SecAggSettings = Field(
        default_factory=SecAggSettings,
        json_schema_extra=fix("see docs/secure-aggregation.md for the [secagg] keys"),
    )
    dp: DpSettings = Field(
        default_factory=DpSettings,
        json_schema_extra=fix("see docs/privacy.md for the [dp], [dp.example], [dp.client] keys"),
    )
    base_dir: Path = Field(Path("."), exclude=True)

    @field_validator("train")
    @classmethod
    def _flower_scalars(cls, v: dict[str, Scalar]) -> dict[str, Scalar]:
        for key in v:
            if not key:
                raise ValueError("empty key")
        return v

    def resolve(self, path: Path) -> Path:
        """A path from the file, relative to the file's folder."""
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def coordinator_dir(self) -> Path:
        return self.resolve(self.server.coordinator_dir)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.server.state_dir)

    def seal_key(self) -> SealKey | None:
        """The key that seals checkpoints at rest (docs/security.md), or None: plaintext."""
        if self.server.seal_key_file is not None:
            return SealKey.from_file(self.resolve(self.server.seal_key_file))
        if self.server.seal_passphrase_env is not None:
            return SealKey.from_env(self.server.seal_passphrase_env)
        return None

    @classmethod
    def load(cls, path: Path, **overrides: Any) -> FederationConfig:
        raw = load_toml(path)
        raw["base_dir"] = path.resolve().parent
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, key = dotted.split(".", 1)
            raw.setdefault(section, {})[key] = value
        try:
            cfg = cls(**raw)
        except ValidationError as e:
            raise first_error(e, cls) from None
        if cfg.server.seal_key_file is not None and cfg.server.seal_passphrase_env is not None:
            raise ConfigError(
                "server.seal_key_file",
                "set together with server.seal_passphrase_env",
                "choose one: a key file, or a passphrase from the environment",
            )
        if cfg.federation.secure_aggregation != "none" and cfg.selection.min_sites < 3:
            raise ConfigError(
                "selection.min_sites",
                f"secure aggregation needs at least 3 sites per round (got "
                f"{cfg.selection.min_sites})",
                "set min_sites >= 3, or federation.secure_aggregation = none",
            )
        return cfg
