"""relay party (see ../shared/DESIGN.md)."""
