"""A task's life: submits, leases (where they begin, are renewed and end), results, and
the one path every state change takes after it commits (``transitions.py``)."""
