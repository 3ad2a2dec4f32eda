"""Typed exceptions of the library. Only the CLI turns them into exit codes and one-line messages."""


class ProperFedError(Exception):
    """Base class of every error proper-fed raises on purpose."""


class ConfigError(ProperFedError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class ModelLoadError(ProperFedError):
    """A backbone could not be loaded (not a local folder, missing files, unsupported option)."""


class DataError(ProperFedError, ValueError):
    """Input data is malformed; the message names the file, the record and what to fix."""


class CheckpointError(ProperFedError):
    """A checkpoint or saved adapter does not match the model it is loaded into."""


class BundleError(ProperFedError):
    """A bundle is unsigned, tampered, or does not match the local base model."""


class PrivacyError(ProperFedError):
    """A device tried to send something other than metrics."""


class CryptoError(ProperFedError):
    """A key file is malformed or of the wrong type, or a ciphertext failed authentication."""


class StoreError(ProperFedError):
    """The device's adapter store cannot be read or written (wrong device key, tampered or missing file)."""
