"""Generate the configuration reference (docs/configuration.md) from the dataclasses themselves.

Field docs are the string literal under each field (read from the source), so the reference cannot
drift from the code: `tests/test_config.py` checks the committed file equals this output.
Regenerate with `python -m dqo_megatron.config.reference > docs/configuration.md`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from dqo_megatron.config.run import RunConfig


def field_docs(cls) -> dict[str, str]:
    """``{field name: docstring}`` for a dataclass defined with a string under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`" if f.default is not None else "`None`"
    return "(section)"


def markdown_reference() -> str:
    """The whole reference as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `dqo_megatron/config/` by `python -m dqo_megatron.config.reference`;",
        "do not edit by hand. A run config is one YAML file with these sections; any key can be",
        "overridden on the command line as `section.key=value` (values are parsed as YAML).",
        "",
    ]
    # Sections in RunConfig's field order, whichever module defines each: the reference reads like a config file.
    sections = [(None, RunConfig)] + [
        (f.name, f.default_factory)
        for f in dataclasses.fields(RunConfig)
        if dataclasses.is_dataclass(f.default_factory)
    ]
    for name, cls in sections:
        lines += [
            f"## `{name}`" if name else "## top level",
            "",
            (cls.__doc__ or "").strip(),
            "",
            "| key | default | meaning |",
            "| --- | --- | --- |",
        ]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}" if name else f.name
            lines.append(f"| `{key}` | {_default(f)} | {docs.get(f.name, '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_reference(), end="")
