"""gateway party (see docs/DESIGN.md)."""
