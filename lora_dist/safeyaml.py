"""Safe YAML, bounded: a job spec (or a ``--set`` value) is refused, with a ValueError that
``spec`` reports as a SpecError, when its aliases expand to too many nodes (a 352-byte alias bomb
expands to millions) or it nests too deep (PyYAML's composer recurses: a 6 KB document nested
3,000 deep raises RecursionError). No torch, nothing of the package.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 10_000  # YAML nodes after expanding aliases: bounds an alias bomb
MAX_DEPTH = 32  # YAML nesting, aliases expanded: a spec is 4 deep


class TooLarge(ValueError):
    """A YAML document beyond :data:`MAX_NODES` or :data:`MAX_DEPTH`."""


def _too_deep() -> TooLarge:
    return TooLarge(f"nests deeper than {MAX_DEPTH} levels (aliases counted where used): refused")


class _DepthLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops at :data:`MAX_DEPTH` before Python's stack does."""
    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _too_deep()
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load(text: str) -> Any:
    """``yaml.safe_load`` within :data:`MAX_NODES` nodes and :data:`MAX_DEPTH` levels, aliases
    counted as often as they are used.

    Raises:
        TooLarge: beyond either bound; the message (to follow "the spec") says which.
        yaml.YAMLError: not valid YAML, or a tag safe YAML does not read.
    """
    loader = _DepthLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        count, stack = 0, [(root, 1)]
        while stack:
            node, depth = stack.pop()
            count += 1
            if count > MAX_NODES:
                raise TooLarge(f"expands to more than {MAX_NODES:,} YAML nodes (aliases counted where used): refused")
            if depth > MAX_DEPTH:
                raise _too_deep()
            if isinstance(node, yaml.SequenceNode):
                stack.extend((v, depth + 1) for v in node.value)
            elif isinstance(node, yaml.MappingNode):
                stack.extend((n, depth + 1) for pair in node.value for n in pair)
        return loader.construct_document(root)
    finally:
        loader.dispose()
