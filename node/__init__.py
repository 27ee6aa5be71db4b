"""node party (see ../shared/DESIGN.md)."""
