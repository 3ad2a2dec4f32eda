"""What the CLI's environment says, handed to the library (which reads no environment):

    PROPER_FED_CACHE        the cache folder: converted models, received bases, default device stores
                            (default ~/.cache/proper-fed)
    PROPER_FED_DEVICE_KEY   a device key (64 hex digits) in place of the store's device.key

`main` reads PROPER_FED_LOG (the log level). The processes the CLI starts (`flwr run`, SuperLink, SuperNode)
inherit the whole environment and read what they need at their own edges (the Flower app entry points).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def configure_library(env: Mapping[str, str] = os.environ) -> None:
    """Hand the library this process's settings from `env`. Every command that reaches the library calls it
    first; not at import, because the library's imports are heavy and `--help` must stay fast."""
    from client.store import DEVICE_KEY_ENV, use_device_key
    from proper_fed.model.backbone import cache_root, use_cache_dir

    use_cache_dir(cache_root(env))
    use_device_key(env.get(DEVICE_KEY_ENV, ""))
