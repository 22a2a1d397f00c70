"""Tenants and their keys: the key format and scopes, authentication, the in-memory
directory of keys and limits, quotas, the backlog count, the bootstrap key."""
