"""Typed errors of Confide's cryptography: each names what failed and how to fix it."""

from __future__ import annotations

from confide.errors import ConfideError


class PKIError(ConfideError):
    """Something about the federation's certificates is wrong; the message says what to do."""


class CAExistsError(PKIError, FileExistsError):
    """``init`` would overwrite an existing certificate authority."""


class CANotFoundError(PKIError, FileNotFoundError):
    """The PKI folder holds no certificate authority (or an incomplete one)."""


class InvalidNameError(PKIError, ValueError):
    """An identity, federation, role or host name breaks its rule; the message names the rule."""


class IdentityExistsError(PKIError):
    """The identity already holds a valid certificate and re-issuing was not forced."""


class CertificateNotFoundError(PKIError, LookupError):
    """No certificate in the registry matches the identity or serial asked for."""


class AlreadyRevokedError(PKIError):
    """The certificate asked to be revoked is revoked already."""


class NotAConfideIdentityError(PKIError, ValueError):
    """A certificate carries no Confide identity (no ``confide://`` URI, no usable subject)."""


class CertificateInvalidError(PKIError):
    """A certificate is unreadable, not issued by the expected CA, expired or not yet valid."""


class CertificateRevokedError(PKIError):
    """A peer presented a certificate that is on the federation's revocation list."""


class PeerNotAllowedError(PKIError):
    """A peer authenticated, but its federation or role may not make this call."""


class RevocationListError(PKIError):
    """The CRL is missing, unreadable, or not signed by the federation's CA."""


class KitError(PKIError):
    """A startup kit (or the coordinator folder) is missing a file or holds an invalid one."""


class KeyPermissionsError(KitError, PermissionError):
    """A private key file is readable by other users; the message gives the ``chmod``."""
