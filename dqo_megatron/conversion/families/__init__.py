"""One module per model family; each registers a `Family` subclass with `@register`.

Every module in this package is imported by `dqo_megatron.conversion.registry` on first lookup, so a new
family is one new file here.
"""
