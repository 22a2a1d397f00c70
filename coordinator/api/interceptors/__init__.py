"""Cross-cutting concerns of every call, one interceptor each, in one chain (``chain.py``):
the request context, error mapping, authentication, the leader check, the audit log."""
