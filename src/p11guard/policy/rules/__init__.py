"""Policy units: one module per filter.conf option (see docs/filter.md)."""
