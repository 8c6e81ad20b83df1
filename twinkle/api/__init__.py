"""Twinkle's own training API: one description (`spec`), its behaviour (`service`), and backends."""
