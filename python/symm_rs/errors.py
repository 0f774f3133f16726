"""Every exception and warning symm_rs raises, in one place.

The Rust core raises the first four (``symm_rs._native`` imports them from here); nothing here
imports torch or the native module, so ``import symm_rs`` can warn about a bad setting before
either is loaded.
"""

from __future__ import annotations


class SymmetricMemoryError(RuntimeError):
    """Base class of the errors symm_rs raises about NCCL and symmetric memory."""


class NcclLibraryError(SymmetricMemoryError):
    """libnccl is missing, too old, or lacks a symbol symm_rs needs."""


class NcclError(SymmetricMemoryError):
    """An NCCL call returned an error."""


class RegistrationError(SymmetricMemoryError):
    """A symmetric window could not be registered (NULL window, or ranks that disagree)."""


class AgreementError(RegistrationError):
    """Ranks of a group did not agree, or not all of them arrived, within the timeout."""


class SettingError(ValueError):
    """A ``SYMM_RS_*`` value symm_rs cannot use, under ``SYMM_RS_STRICT=1``: raised by
    ``import symm_rs``."""


class SettingWarning(UserWarning):
    """A ``SYMM_RS_*`` variable whose value symm_rs cannot use, or whose name it does not know:
    issued once, at ``import symm_rs``."""


class NcclVersionWarning(UserWarning):
    """The NCCL in use has a known defect that affects symmetric memory (once per process)."""


class NoSymmetricKernelsWarning(UserWarning):
    """A group's communicator cannot run NCCL's symmetric kernels, so symm_rs does not register
    its buffers (once per communicator)."""


class NotSymmetricWarning(UserWarning):
    """A Communicator collective ran on a buffer outside this communicator's windows, so NCCL
    could not use its symmetric kernels (``SYMM_RS_DEBUG=1`` reports it)."""


__all__ = [
    "AgreementError",
    "NcclError",
    "NcclLibraryError",
    "NcclVersionWarning",
    "NoSymmetricKernelsWarning",
    "NotSymmetricWarning",
    "RegistrationError",
    "SettingError",
    "SettingWarning",
    "SymmetricMemoryError",
]
