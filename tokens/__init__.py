"""tokens party (see docs/DESIGN.md)."""
