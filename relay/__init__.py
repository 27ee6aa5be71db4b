"""relay party (see docs/DESIGN.md)."""
