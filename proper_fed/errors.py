"""Typed exceptions of the library. Only the CLI turns them into exit codes and one-line messages.

Each class also carries what a device may tell the server about it: a numeric `code` and a fixed
`public_message` that holds no data (no user id, no field value, no path). The detailed message stays in the
device's own log; `ERROR_TABLE` is the complete list of error replies a device may send.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class ProperFedError(Exception):
    """Base class of every error proper-fed raises on purpose."""

    code: int = 500
    public_message: str = "the device failed with an unexpected error; see the device log"


class ConfigError(ProperFedError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""

    code = 400
    public_message = "the device's configuration does not match the run; see the device log"


class ModelLoadError(ProperFedError):
    """A backbone could not be loaded (not a local folder, missing files, unsupported option)."""

    code = 503
    public_message = "the device could not load the base model; see the device log"


class DataError(ProperFedError, ValueError):
    """Input data is malformed; the message names the file, the record and what to fix."""

    code = 422
    public_message = "the device's data does not fit the run's task; see the device log"


class CheckpointError(ProperFedError):
    """A checkpoint or saved adapter does not match the model it is loaded into."""

    code = 412
    public_message = (
        "a saved adapter or checkpoint on the device does not match the model; see the device log"
    )


class BundleError(ProperFedError):
    """A bundle is unsigned, tampered, or does not match the local base model."""

    code = 409
    public_message = (
        "the device refused the bundle (unsigned, tampered or built for another base); see the device log"
    )


class PrivacyError(ProperFedError):
    """A device tried to send something other than metrics."""

    code = 451
    public_message = "the device's privacy guard blocked a reply outside the run's metric schema"


class CryptoError(ProperFedError):
    """A key file is malformed or of the wrong type, or a ciphertext failed authentication."""

    code = 403
    public_message = "a key or an encrypted file on the device could not be used; see the device log"


class StoreError(ProperFedError):
    """The device's adapter store cannot be read or written (wrong device key, tampered or missing file)."""

    code = 423
    public_message = "the device's adapter store cannot be read or written; see the device log"


class DeployError(ProperFedError):
    """A deployment process (SuperLink, SuperNode, `flwr`) could not be started, reached or stopped; the
    message carries the process's own reason. Raised on the operator's or device owner's machine only, never
    sent over the wire (not in ERROR_CLASSES)."""


UNEXPECTED_CODE = ProperFedError.code
ERROR_CLASSES = (
    ProperFedError,
    ConfigError,
    ModelLoadError,
    DataError,
    CheckpointError,
    BundleError,
    PrivacyError,
    CryptoError,
    StoreError,
)
# code -> the one message a device may send with it.
ERROR_TABLE: Mapping[int, str] = MappingProxyType({cls.code: cls.public_message for cls in ERROR_CLASSES})


def public_error(err: BaseException) -> tuple[int, str]:
    """The code and fixed message a device may send for `err`: its class's, or 500 for anything unexpected."""
    if isinstance(err, ProperFedError):
        return type(err).code, type(err).public_message
    return UNEXPECTED_CODE, ProperFedError.public_message
