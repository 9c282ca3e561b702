"""JSON from outside the process, bounded in size and nesting: config.json, a safetensors index
and header, an artifact's manifest, a data file's JSONL rows.

``json.loads`` has no limit of its own: a 6 KB document nested 3,000 deep raises RecursionError
(a traceback, not a message), and a file is read whole however large it says it is. :func:`loads`
and :func:`read` refuse both with a ValueError that each reader turns into its own error type
(ModelError, ArtifactError, DataError) naming the file. Nothing here imports anything heavy.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Nesting a reader ever needs: a manifest's spec is 4 deep, a chat row's message 3, a header 3.
MAX_DEPTH = 64


def loads(text: str | bytes, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that refuses more than ``max_bytes`` and nesting deeper than ``max_depth``.

    Raises:
        ValueError: not JSON (bytes not UTF-8 included), too large or too deeply nested; the
            message says which and the limit.
    """
    if max_bytes is not None and len(text) > max_bytes:
        raise ValueError(f"{len(text):,} bytes; at most {max_bytes:,} are read")
    try:
        value = json.loads(text)
    except RecursionError:  # the C scanner's own guard, at about 1,000 levels
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    _check_depth(value, max_depth)
    return value


def read(path: str | os.PathLike, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON in file ``path``, its size checked before a byte is read (a sparse file may say
    anything), then as :func:`loads`.

    Raises:
        OSError: the file cannot be read.
        ValueError: as :func:`loads`.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{size:,} bytes; at most {max_bytes:,} are read")
        data = f.read(max_bytes + 1)
    return loads(data, max_bytes, max_depth)


def _check_depth(value: Any, max_depth: int) -> None:
    """Walk ``value`` without recursion; refuse a container deeper than ``max_depth``."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise ValueError(f"nested deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))

