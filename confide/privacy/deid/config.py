"""The de-identification config (TOML, pydantic v2): a role for every column, a profile, the gate.

Profiles expand to per-column defaults chosen by column name; explicit ``[columns]``
entries override them; a column that ends without a role is an error
(:class:`~confide.privacy.deid.errors.UnknownColumnError`), never silently kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from confide.config import first_error, fix, load_toml, no_nul
from confide.errors import ConfigError
from confide.privacy.deid.errors import UnknownColumnError

Role = Literal["direct", "quasi", "sensitive", "free_text", "keep"]
Generalize = Literal["value", "band", "year", "month", "shift", "zip3"]
Profile = Literal["hipaa-safe-harbor", "gdpr-pseudonymise"]
ROLES: tuple[str, ...] = ("direct", "quasi", "sensitive", "free_text", "keep")
MIN_SECRET_BYTES = 32

_COLUMN_FIX = (
    'give each column a role: "direct", "quasi", "sensitive", "free_text" or "keep", '
    'or a table such as { role = "quasi", generalize = "year" }'
)


class ColumnSpec(BaseModel):
    """What happens to one column. Fields that do not apply to the role are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(json_schema_extra=fix(_COLUMN_FIX))
    # direct
    action: Literal["drop", "pseudonym"] = Field(
        "drop", json_schema_extra=fix('use "drop" or "pseudonym" (keyed HMAC-SHA256)')
    )
    domain: str | None = Field(
        None,
        min_length=1,
        json_schema_extra=fix('name the identifier space, e.g. domain = "patient"'),
    )
    length: int = Field(
        20, ge=16, le=64, json_schema_extra=fix("use 16..64 hex characters of the pseudonym")
    )
    # quasi
    generalize: Generalize = Field(
        "value",
        json_schema_extra=fix("use value, band, year, month, shift or zip3"),
    )
    width: int = Field(10, ge=1, json_schema_extra=fix("use a positive band width, e.g. 10"))
    top_code: int = Field(
        90,
        ge=0,
        json_schema_extra=fix('values >= top_code become "<top_code>+"; 0 turns it off'),
    )
    aggregate_over_89: bool = Field(
        False, json_schema_extra=fix("use true for birth dates (HIPAA: ages over 89 as 90+)")
    )
    max_level: int | None = Field(
        None,
        ge=0,
        json_schema_extra=fix("use 0 (never generalize further) up to the hierarchy height"),
    )
    # free_text
    scrub: Literal["placeholder", "pseudonym"] = Field(
        "placeholder", json_schema_extra=fix('use "placeholder" or "pseudonym"')
    )

    def misplaced(self) -> list[tuple[str, str]]:
        """Fields set that do not apply: (field, the role/generalization they belong to)."""
        belongs = {
            "action": ("direct", None),
            "domain": ("direct", None),
            "length": ("direct", None),
            "generalize": ("quasi", None),
            "max_level": ("quasi", None),
            "width": ("quasi", "band"),
            "top_code": ("quasi", "band"),
            "aggregate_over_89": ("quasi", "year|month|shift"),
            "scrub": ("free_text", None),
        }
        out = []
        for name in sorted(self.model_fields_set - {"role"}):
            role, gen = belongs[name]
            if role != self.role:
                out.append((name, f'role = "{role}"'))
            elif gen is not None and self.generalize not in gen.split("|"):
                out.append((name, f'generalize = "{gen}"'))
        return out


class KAnonymity(BaseModel):
    """The gate: k-anonymity, optional distinct ℓ-diversity, the suppression budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(5, ge=1, json_schema_extra=fix("use a whole number >= 1 (1 turns it off)"))
    l_diversity: int = Field(
        1, ge=1, json_schema_extra=fix("use a whole number >= 1 (1 turns it off)")
    )
    max_suppression: float = Field(
        0.05, ge=0, lt=1, json_schema_extra=fix("use a fraction of rows in [0, 1), e.g. 0.05")
    )
    max_nodes: int = Field(
        200_000, ge=1, json_schema_extra=fix("use a positive lattice size limit")
    )


class DeidConfig(BaseModel):
    """The whole ``deid.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _no_nul = field_validator("*")(no_nul)

    profile: Profile | None = Field(
        None, json_schema_extra=fix('use "hipaa-safe-harbor" or "gdpr-pseudonymise", or omit it')
    )
    secret_file: Path | None = Field(
        None,
        json_schema_extra=fix(
            "name a file of >= 32 random bytes that stays at the site, e.g. "
            "`head -c 32 /dev/urandom > site-secret.key`"
        ),
    )
    person_id: str | None = Field(
        None, min_length=1, json_schema_extra=fix("name the column that identifies a person")
    )
    date_shift_days: int = Field(365, ge=1, le=3650, json_schema_extra=fix("use 1..3650 days"))
    reference_date: date | None = Field(
        None,
        json_schema_extra=fix("use a TOML date such as 2025-01-01 (default: today)"),
    )
    k_anonymity: KAnonymity = Field(
        default_factory=KAnonymity, json_schema_extra=fix("see docs/deidentification.md")
    )
    columns: dict[str, ColumnSpec] = Field(default_factory=dict, json_schema_extra=fix(_COLUMN_FIX))
    base_dir: Path | None = Field(None, exclude=True)

    @field_validator("columns", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"role": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base_dir: Path | None = None) -> DeidConfig:
        """Validate a parsed TOML table; any problem becomes one :class:`ConfigError`."""
        try:
            cfg = cls(**raw, base_dir=base_dir)
        except ValidationError as e:
            raise _config_error(e) from None
        cfg.check()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> DeidConfig:
        """Read and validate ``deid.toml``; ``secret_file`` is relative to its folder."""
        p = Path(path)
        return cls.from_dict(load_toml(p), base_dir=p.resolve().parent)

    def check(self) -> None:
        """Cross-field rules pydantic cannot express per field."""
        for name, spec in self.columns.items():
            for field, belongs in spec.misplaced():
                raise ConfigError(
                    f"columns.{name}.{field}",
                    f'does not apply to role = "{spec.role}"'
                    + (f', generalize = "{spec.generalize}"' if spec.role == "quasi" else ""),
                    f"remove it; it only applies with {belongs}",
                )
        if self.person_id is not None and self.person_id not in self.columns and not self.profile:
            raise ConfigError(
                "person_id",
                f"{self.person_id!r} is not in [columns]",
                "name a column of the input, and give it a role in [columns]",
            )

    # -- resolution against an input header ----------------------------------------------

    def resolve(self, header: Sequence[str], *, has_secret: bool = False) -> dict[str, ColumnSpec]:
        """The role of every input column: explicit entries, then the profile's defaults.

        Raises :class:`UnknownColumnError` if a column ends without a role, and
        :class:`ConfigError` if ``[columns]`` names a column the input does not have or a
        setting needs a secret or a person id that is missing.
        """
        dupes = sorted({c for c in header if list(header).count(c) > 1})
        if dupes:
            raise ConfigError(
                "--in", f"duplicate column names {dupes}", "rename the columns so each is unique"
            )
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise ConfigError(
                f"columns.{missing[0]}",
                f"not a column of the input (it has {', '.join(header)})",
                "fix the spelling or remove the entry",
            )
        out: dict[str, ColumnSpec] = {}
        unknown: list[str] = []
        for col in header:
            spec = self.columns.get(col) or (
                profile_default(self.profile, col) if self.profile else None
            )
            if spec is None:
                unknown.append(col)
            else:
                out[col] = spec
        if unknown:
            raise UnknownColumnError(unknown, header)
        needs_secret = [
            c
            for c, s in out.items()
            if (s.role == "direct" and s.action == "pseudonym")
            or (s.role == "quasi" and s.generalize == "shift")
            or (s.role == "free_text" and s.scrub == "pseudonym")
        ]
        if needs_secret and self.secret_file is None and not has_secret:
            raise ConfigError(
                "secret_file",
                f"missing, but {', '.join(needs_secret)} need the site secret "
                "(keyed pseudonyms / date shifts)",
                'set secret_file = "site-secret.key", a file of >= 32 random bytes kept at the '
                "site (`head -c 32 /dev/urandom > site-secret.key`)",
            )
        shifted = [c for c, s in out.items() if s.role == "quasi" and s.generalize == "shift"]
        if shifted and self.person_id is None:
            raise ConfigError(
                "person_id",
                f'missing, but {", ".join(shifted)} use generalize = "shift" '
                "(one shift per person)",
                'set person_id = "<the column that identifies a person>", e.g. person_id = "Id"',
            )
        if self.person_id is not None and self.person_id not in header:
            raise ConfigError(
                "person_id",
                f"{self.person_id!r} is not a column of the input",
                "name a column of the input that identifies a person",
            )
        return out

    def secret_path(self) -> Path | None:
        if self.secret_file is None:
            return None
        p = self.secret_file.expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def sha256(self) -> str:
        """Hash of the validated config (canonical JSON), for the report and the ledger."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _config_error(err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    if len(loc) >= 3 and loc[0] == "columns":
        field = ColumnSpec.model_fields.get(loc[2])
        label = f"columns.{loc[1]}.{loc[2]}"
        if e["type"] == "extra_forbidden":
            valid = ", ".join(ColumnSpec.model_fields)
            return ConfigError(label, "unknown setting", f"remove it; valid here: {valid}")
        extra = field.json_schema_extra if field is not None else None
        advice = str(extra["fix"]) if isinstance(extra, dict) and "fix" in extra else _COLUMN_FIX
        msg = str(e["msg"]).removeprefix("Value error, ")
        problem = f"{msg} (got {e['input']!r})" if e["type"] != "missing" else msg
        return ConfigError(label, problem, advice)
    if len(loc) == 2 and loc[0] == "columns":
        return ConfigError(f"columns.{loc[1]}", f"{e['msg']} (got {e.get('input')!r})", _COLUMN_FIX)
    return first_error(err, DeidConfig)


# -- profiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    identifier: str  # which of the 18 HIPAA identifiers (or demographic) it covers
    tokens: frozenset[str]
    names: frozenset[str]
    hipaa: ColumnSpec
    gdpr: ColumnSpec


def _r(
    identifier: str, tokens: Iterable[str], names: Iterable[str], hipaa: Any, gdpr: Any
) -> _Rule:
    def spec(v: Any) -> ColumnSpec:
        return ColumnSpec(role=v) if isinstance(v, str) else ColumnSpec(**v)

    return _Rule(identifier, frozenset(tokens), frozenset(names), spec(hipaa), spec(gdpr))


_DROP = {"role": "direct"}
_PSEUDO = {"role": "direct", "action": "pseudonym"}
_YEAR = {"role": "quasi", "generalize": "year"}
_SHIFT = {"role": "quasi", "generalize": "shift"}

# Order matters: the first rule that matches a column wins (dates before names, so that
# LAST_VISIT_DATE is a date and not a name).
RULES: tuple[_Rule, ...] = (
    _r(
        "3 dates (birth)",
        ["DOB", "BIRTHDATE"],
        ["BIRTHDATE", "DATEOFBIRTH"],
        {**_YEAR, "aggregate_over_89": True},
        {**_SHIFT, "aggregate_over_89": True},
    ),
    _r(
        "3 dates",
        [
            "DATE",
            "DATETIME",
            "TIMESTAMP",
            "DEATHDATE",
            "DOD",
            "START",
            "STOP",
            "ADMITTED",
            "DISCHARGED",
            "ADMISSION",
            "DISCHARGE",
        ],
        [],
        _YEAR,
        _SHIFT,
    ),
    _r(
        "3 ages over 89",
        ["AGE"],
        [],
        {"role": "quasi", "generalize": "band", "width": 10},
        {"role": "quasi", "generalize": "band", "width": 10},
    ),
    _r(
        "1 names",
        [
            "NAME",
            "NAMES",
            "FIRST",
            "LAST",
            "MIDDLE",
            "MAIDEN",
            "SUFFIX",
            "PREFIX",
            "SURNAME",
            "FORENAME",
            "FIRSTNAME",
            "LASTNAME",
            "FULLNAME",
            "INITIALS",
        ],
        [],
        _DROP,
        _PSEUDO,
    ),
    _r(
        "2 geographic (ZIP)",
        ["ZIP", "ZIPCODE", "POSTCODE", "POSTALCODE", "ZIP5"],
        [],
        {"role": "quasi", "generalize": "zip3"},
        {"role": "quasi", "generalize": "zip3"},
    ),
    _r(
        "2 geographic (coordinates)",
        ["LAT", "LON", "LNG", "LATITUDE", "LONGITUDE", "GEOCODE", "COORDINATES"],
        [],
        _DROP,
        _DROP,
    ),
    _r(
        "2 geographic (address)",
        [
            "ADDRESS",
            "ADDRESS1",
            "ADDRESS2",
            "STREET",
            "CITY",
            "TOWN",
            "COUNTY",
            "BIRTHPLACE",
            "PRECINCT",
            "DISTRICT",
        ],
        [],
        _DROP,
        _PSEUDO,
    ),
    _r(
        "4/5 phone, fax", ["PHONE", "TEL", "TELEPHONE", "MOBILE", "CELL", "FAX"], [], _DROP, _PSEUDO
    ),
    _r("6 e-mail", ["EMAIL", "MAIL"], ["EMAILADDRESS"], _DROP, _PSEUDO),
    _r(
        "7 social security number",
        ["SSN", "SOCIAL", "NINO", "NHS", "NHSNUMBER"],
        [],
        _DROP,
        _PSEUDO,
    ),
    _r(
        "8 medical record number", ["MRN", "MEDICALRECORD"], ["MEDICALRECORDNUMBER"], _DROP, _PSEUDO
    ),
    _r(
        "9 health plan beneficiary number",
        ["PLAN", "MEMBER", "BENEFICIARY", "INSURANCE", "POLICY", "PAYER", "SUBSCRIBER"],
        [],
        _DROP,
        _PSEUDO,
    ),
    _r("10 account number", ["ACCOUNT", "ACCT", "IBAN", "CARD", "PAN"], [], _DROP, _PSEUDO),
    _r(
        "11 certificate/licence number",
        ["LICENSE", "LICENCE", "DRIVERS", "PASSPORT", "CERTIFICATE"],
        [],
        _DROP,
        _PSEUDO,
    ),
    _r("12 vehicle identifier", ["VIN", "VEHICLE", "PLATE", "REGISTRATION"], [], _DROP, _PSEUDO),
    _r("13 device identifier", ["DEVICE", "SERIAL", "UDI", "IMEI", "MAC"], [], _DROP, _PSEUDO),
    _r("14 URL", ["URL", "URI", "WEBSITE", "HOMEPAGE"], [], _DROP, _PSEUDO),
    _r("15 IP address", ["IP", "IPV4", "IPV6", "IPADDRESS"], [], _DROP, _PSEUDO),
    _r(
        "16 biometric identifier",
        ["BIOMETRIC", "FINGERPRINT", "VOICEPRINT", "RETINA", "IRIS"],
        [],
        _DROP,
        _DROP,
    ),
    _r(
        "17 full-face photograph",
        ["PHOTO", "PHOTOGRAPH", "IMAGE", "FACE", "PICTURE"],
        [],
        _DROP,
        _DROP,
    ),
    _r(
        "18 any other unique number",
        ["ID", "UUID", "GUID", "IDENTIFIER", "NUMBER", "NO"],
        [],
        _DROP,
        _PSEUDO,
    ),
    _r(
        "demographic quasi-identifier",
        ["GENDER", "SEX", "RACE", "ETHNICITY", "MARITAL", "STATE", "COUNTRY"],
        [],
        "quasi",
        "quasi",
    ),
)


def _tokens(name: str) -> tuple[list[str], str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    toks = [t.upper() for t in re.split(r"[^A-Za-z0-9]+", spaced) if t]
    stripped = [re.sub(r"\d+$", "", t) or t for t in toks]
    return stripped, "".join(toks)


def profile_rule(column: str) -> _Rule | None:
    """The profile rule that a column name matches, if any."""
    toks, joined = _tokens(column)
    for rule in RULES:
        if joined in rule.names or joined in rule.tokens or any(t in rule.tokens for t in toks):
            return rule
    return None


def profile_default(profile: str | None, column: str) -> ColumnSpec | None:
    """The role a profile gives a column by its name, or None if the profile has no rule."""
    rule = profile_rule(column)
    if rule is None or profile is None:
        return None
    return rule.hipaa if profile == "hipaa-safe-harbor" else rule.gdpr


__all__ = [
    "ROLES",
    "RULES",
    "ColumnSpec",
    "DeidConfig",
    "KAnonymity",
    "profile_default",
    "profile_rule",
]
