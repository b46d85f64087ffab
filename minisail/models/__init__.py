"""Model families, one module each (`registry.FAMILIES`), exporting the same names; `registry.py` picks one."""
