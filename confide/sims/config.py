"""Configuration of a simulated federation (`confide sim run`), validated up front."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from confide.client.data import PartitionSpec
from confide.client.tasks import TASKS, DataSettings, Task, get_task
from confide.config import first_error, fix, load_toml
from confide.errors import ConfigError
from confide.privacy.dp.federated import DpSettings
from confide.privacy.secagg.federated import SecAggSettings


class SimRunConfig(BaseModel):
    """Everything `confide sim run` needs; every field has a default but the task (or app)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str | None = Field(
        None,
        json_schema_extra=fix(
            f"use one of: {', '.join(TASKS)} (or give app instead; an estimate may describe "
            "its model in [cost.model] instead)"
        ),
    )
    model: str | None = Field(None, json_schema_extra=fix("see `confide sim tasks`"))
    engine: Literal["inprocess", "ray"] = Field(
        "inprocess",
        json_schema_extra=fix(
            "use inprocess (every site in this process) or ray (Flower's simulation engine; "
            "pip install 'confide[ray]')"
        ),
    )
    app: str | None = Field(
        None,
        json_schema_extra=fix(
            "name a Flower ClientApp as module:attribute, e.g. logreg:app with --app-dir examples"
        ),
    )
    app_dir: Path | None = Field(
        None, json_schema_extra=fix("pass the folder that holds the app's module")
    )
    initial: str | None = Field(
        None,
        json_schema_extra=fix(
            "name a callable returning a torch nn.Module or a list of NumPy arrays, as "
            "module:attribute"
        ),
    )
    ray_cpus: int | None = Field(
        None,
        ge=1,
        json_schema_extra=fix("use a whole number of CPUs >= 1 (default: all of this machine's)"),
    )
    sites: int = Field(10, ge=1, json_schema_extra=fix("use a whole number of sites >= 1"))
    rounds: int = Field(20, ge=1, json_schema_extra=fix("use a whole number of rounds >= 1"))
    partition: str = Field(
        "",
        json_schema_extra=fix("use iid, dirichlet:ALPHA, shards:N or natural"),
    )
    fraction: float = Field(
        1.0, gt=0, le=1, json_schema_extra=fix("use a fraction of sites in (0, 1], e.g. 0.1")
    )
    fraction_evaluate: float | None = Field(
        None, gt=0, le=1, json_schema_extra=fix("use a fraction in (0, 1]; default = fraction")
    )
    min_sites: int = Field(1, ge=1, json_schema_extra=fix("use a whole number >= 1"))
    local_epochs: int | None = Field(None, ge=1, json_schema_extra=fix("use >= 1"))
    batch_size: int | None = Field(None, ge=1, json_schema_extra=fix("use >= 1"))
    lr: float | None = Field(None, gt=0, json_schema_extra=fix("use a positive learning rate"))
    momentum: float | None = Field(None, ge=0, lt=1, json_schema_extra=fix("use [0, 1)"))
    lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        json_schema_extra=fix(
            "use a factor in (0, 1]: round r trains with lr x lr_decay^(r-1) (1: constant)"
        ),
    )
    max_steps: int | None = Field(
        None, ge=1, json_schema_extra=fix("use >= 1 local steps per round, or leave it unset")
    )
    strategy: Literal["fedavg", "fedadam"] = Field(
        "fedavg", json_schema_extra=fix("use fedavg or fedadam")
    )
    server_ema: float | None = Field(
        None,
        ge=0,
        lt=1,
        json_schema_extra=fix(
            "use a decay in [0, 1), e.g. 0.9: evaluate and export a moving average of the "
            "global models (no privacy cost), or leave it unset"
        ),
    )
    server_lr: float | None = Field(None, gt=0, json_schema_extra=fix("use a positive rate"))
    seed: int = Field(0, ge=0, json_schema_extra=fix("use a non-negative integer"))
    data_dir: Path | None = Field(
        None,
        json_schema_extra=fix(
            "pass --data-dir pointing at the folder that holds mnist/, tinyshakespeare/ "
            "and credit-default/, or set CONFIDE_DATA_DIR"
        ),
    )
    out: Path | None = Field(None, json_schema_extra=fix("give a writable folder"))
    max_samples_per_site: int | None = Field(
        None, ge=1, json_schema_extra=fix("use >= 1 or leave it unset for all of a site's data")
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, json_schema_extra=fix("use a fraction in [0, 1), e.g. 0.1")
    )
    central_eval: bool = Field(True, json_schema_extra=fix("use true or false"))
    max_test_samples: int | None = Field(None, ge=1, json_schema_extra=fix("use >= 1"))
    secure_aggregation: Literal["none", "secagg+"] = Field(
        "none",
        json_schema_extra=fix(
            "use none, or secagg+ (the server learns only the sum; [secagg] tunes it)"
        ),
    )
    secagg: SecAggSettings = Field(
        default_factory=SecAggSettings,
        json_schema_extra=fix("see docs/secure-aggregation.md for the [secagg] keys"),
    )

    dp: DpSettings = Field(
        default_factory=DpSettings,
        json_schema_extra=fix("see docs/privacy.md for the [dp], [dp.example], [dp.client] keys"),
    )
    site_epsilon_max: float | None = Field(
        None,
        gt=0,
        json_schema_extra=fix(
            "use every simulated site's ε budget (> 0); sites over it are not selected"
        ),
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        if v is not None and v not in TASKS:
            raise ValueError(f"unknown task {v!r}")
        return v

    @field_validator("model")
    @classmethod
    def _model_of_task(cls, v: str | None, info: ValidationInfo) -> str | None:
        task = info.data.get("task")
        if v is not None and task in TASKS and v not in TASKS[task].models:
            raise ValueError(
                f"{v!r} is not a model of task {task} (use one of: {', '.join(TASKS[task].models)})"
            )
        if v is not None and task is None:
            from confide.client.models import MODELS  # torch: only when a model is named

            if v not in MODELS:
                raise ValueError(f"unknown model {v!r} (use one of: {', '.join(MODELS)})")
        return v

    @field_validator("partition")
    @classmethod
    def _valid_partition(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return v
        try:
            kind = PartitionSpec.parse(v).kind
        except ConfigError as e:
            raise ValueError(e.problem) from None
        task = info.data.get("task")
        if task in TASKS and kind not in TASKS[task].partitions:
            raise ValueError(
                f"does not apply to task {task} (use one of: {', '.join(TASKS[task].partitions)})"
            )
        return v

    @field_validator("min_sites")
    @classmethod
    def _not_more_than_sites(cls, v: int, info: ValidationInfo) -> int:
        sites = info.data.get("sites")
        if isinstance(sites, int) and v > sites:
            raise ValueError(f"exceeds the number of sites ({sites})")
        return v

    def check_secure_aggregation(self) -> None:
        """Secure aggregation hides each update among at least three per round."""
        per_round = min(self.sites, max(self.min_sites, round(self.fraction * self.sites)))
        if self.secure_aggregation != "none" and per_round < 3:
            raise ConfigError(
                "min_sites",
                f"secure aggregation needs at least 3 sites per round, this run selects "
                f"{per_round}",
                "set sites and min_sites to 3 or more, or secure_aggregation = none",
            )

    def check_app(self) -> None:
        """A run needs sites to drive (a task or an app) and a first global model."""
        if self.task is None and self.app is None:
            raise ConfigError(
                "task",
                "missing",
                "pass --task NAME (see `confide sim tasks`) or --app module:attr, your own "
                "Flower ClientApp",
            )
        if self.model is not None and self.initial is not None:
            raise ConfigError(
                "initial", "both model and initial are given", "give one of --model, --initial"
            )
        if self.task is None and self.model is None and self.initial is None:
            from confide.client.models import MODELS

            raise ConfigError(
                "initial",
                "an app without a built-in task needs the initial global model",
                "pass --model NAME (a built-in model: "
                f"{', '.join(MODELS)}) or --initial module:attr (a callable returning a torch "
                "nn.Module or a list of NumPy arrays)",
            )

    @field_validator("data_dir", "app_dir")
    @classmethod
    def _existing_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError("no such folder")
        return v

    # --- derived ------------------------------------------------------------------

    @property
    def task_spec(self) -> Task:
        if self.task is None:
            raise ConfigError("task", "this run has no built-in task", "pass --task NAME")
        return get_task(self.task)

    @property
    def model_name(self) -> str:
        """The built-in model of the run ("" when an app brings its own via ``initial``)."""
        if self.model is not None:
            return self.model
        return self.task_spec.model if self.task is not None and self.initial is None else ""

    @property
    def label(self) -> str:
        """What runs: the task's name, or the app's ``module:attribute``."""
        return self.task or self.app or "?"

    def data_settings(self) -> DataSettings:
        settings = DataSettings(
            data_dir=str(self.data_dir) if self.data_dir else None,
            partition=self.partition,
            num_sites=self.sites,
            seed=self.seed,
            max_samples_per_site=self.max_samples_per_site,
            eval_fraction=self.eval_fraction,
            max_test_samples=self.max_test_samples,
        )
        return self.task_spec.settings(settings) if self.task is not None else settings

    def out_dir(self) -> Path:
        if self.out is not None:
            return self.out
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = self.task or (self.app or "app").split(":", 1)[0].rsplit(".", 1)[-1]
        return Path("runs") / f"{name}-{stamp}"

    @classmethod
    def build(cls, values: dict[str, Any], *, config_file: Path | None = None) -> SimRunConfig:
        """Validate CLI values over an optional TOML file; errors become one ConfigError."""
        merged: dict[str, Any] = {}
        if config_file is not None:
            raw = load_toml(config_file)
            merged.update(raw.get("sim", raw))
        flags = {k: v for k, v in values.items() if v is not None}
        merged.update(flags)
        try:
            cfg = cls(**merged)
        except ValidationError as e:
            raise first_error(e, cls, flag_fields=flags) from None
        cfg.check_app()
        cfg.check_secure_aggregation()
        return cfg


__all__ = ["SimRunConfig"]
