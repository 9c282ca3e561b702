"""Signing: the HMAC key from ``$LORA_DIST_SIGNING_KEY`` and the signature over a manifest's
canonical JSON, which artifacts and checkpoints carry (``store`` and ``checkpoint`` check it)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from lora_dist.errors import SettingError

SIGNING_KEY_ENV = "LORA_DIST_SIGNING_KEY"


def signing_key() -> bytes | None:
    """The HMAC key artifacts and checkpoints are signed and checked with (``$LORA_DIST_SIGNING_KEY``),
    if set.

    Raises:
        SettingError: the variable is set but empty or blank: that would silently mean "unsigned".
    """
    key = os.environ.get(SIGNING_KEY_ENV)
    if key is None:
        return None
    if not key.strip():
        raise SettingError(f"{SIGNING_KEY_ENV} is set but empty: artifacts and checkpoints would go unsigned and "
                           f"unchecked. Set it to the key, or unset it to work without signatures")
    return key.encode()


def manifest_signature(manifest: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 over the manifest's canonical JSON (sorted keys, its ``signature`` left out)."""
    import hmac

    body = json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":"))
    return "hmac-sha256:" + hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
