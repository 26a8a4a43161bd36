"""Data for Confide clients: loaders for the reference data sets, partitioners over sites.

Every loader reads the shared offline copy by default (see :func:`default_data_dir`)
and the same format from any folder or file a site names.
"""

from .arrays import ArrayDataset
from .mnist import load_mnist
from .partition import (
    PartitionSpec,
    label_skew,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_shards,
)
from .paths import default_data_dir, resolve
from .shakespeare import (
    VOCAB,
    VOCAB_SIZE,
    RoleData,
    char_sequences,
    decode,
    encode,
    load_shakespeare_roles,
    parse_speeches,
    role_datasets,
    split_by_role,
)
from .tabular import (
    CREDIT_FEATURES,
    CREDIT_STEPS,
    Standardizer,
    TabularData,
    credit_sequences,
    load_credit,
    load_csv,
    train_test_split,
)

__all__ = [
    "CREDIT_FEATURES",
    "CREDIT_STEPS",
    "VOCAB",
    "VOCAB_SIZE",
    "ArrayDataset",
    "PartitionSpec",
    "RoleData",
    "Standardizer",
    "TabularData",
    "char_sequences",
    "credit_sequences",
    "decode",
    "default_data_dir",
    "encode",
    "label_skew",
    "load_credit",
    "load_csv",
    "load_mnist",
    "load_shakespeare_roles",
    "parse_speeches",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
    "partition_shards",
    "resolve",
    "role_datasets",
    "split_by_role",
    "train_test_split",
]
