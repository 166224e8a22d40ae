"""A sibling module of context.py: imported by name, as agents import their own modules."""

GREETING = "hello from a sibling module"
