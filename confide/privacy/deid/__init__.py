"""De-identification of a site's data before training (`confide deid`).

Tables: :func:`deidentify` (roles per column, HIPAA Safe Harbor and GDPR pseudonymisation
profiles, a fail-closed k-anonymity / ℓ-diversity gate). Free text: ``deid.text`` (loaded
only when a ``free_text`` column needs it). See docs/deidentification.md.
"""

from __future__ import annotations

from confide.privacy.deid.config import ColumnSpec, DeidConfig, KAnonymity
from confide.privacy.deid.errors import DeidError, KAnonymityNotReached, UnknownColumnError
from confide.privacy.deid.table import (
    Report,
    Table,
    deidentify,
    deidentify_file,
    pseudonym,
    read_table,
    write_table,
)

__all__ = [
    "ColumnSpec",
    "DeidConfig",
    "DeidError",
    "KAnonymity",
    "KAnonymityNotReached",
    "Report",
    "Table",
    "UnknownColumnError",
    "deidentify",
    "deidentify_file",
    "pseudonym",
    "read_table",
    "write_table",
]
