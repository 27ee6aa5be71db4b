"""tokens party (see ../shared/DESIGN.md)."""
