"""The algorithms a run can train, by name: `register`, `get`, `names`, `unregister`."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm

_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Make `algorithm` trainable as ``algorithm: <algorithm.name>``; returns it. A name that is
    already registered is refused unless `replace`."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register() takes an Algorithm, got {type(algorithm).__name__}")
    if algorithm.name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def unregister(name: str) -> None:
    """Remove a registered algorithm (tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Algorithm:
    """The algorithm registered as `name`; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """The registered names, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def all_algorithms() -> tuple[Algorithm, ...]:
    """The registered algorithms, in registration order."""
    return tuple(_REGISTRY.values())


def markdown_table() -> str:
    """The registered algorithms as the table in docs/algorithms.md ("Adding an algorithm")."""

    def cells(items) -> str:
        return ", ".join(f"`{item}`" for item in items)

    rows = []
    for a in all_algorithms():
        reference = ("yes (a model)" if not a.reference_from_data else "yes") if a.needs_reference else "no"
        rows.append(
            f"| `{a.name}` | {'yes' if a.needs_value else 'no'} | {reference} | `{a.batch_mode}` | "
            f"{a.rows_per_item} | {cells(a.config_keys)} | {cells(a.metrics)} |"
        )
    return "\n".join(rows)
