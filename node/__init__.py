"""node party (see docs/DESIGN.md)."""
