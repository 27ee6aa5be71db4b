"""gateway party (see ../shared/DESIGN.md)."""
