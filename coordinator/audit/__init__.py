"""The audit log: the hash chain (pure) and the appender that writes it."""
