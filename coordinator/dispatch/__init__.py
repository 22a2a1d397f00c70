"""Who gets which work: the dispatch policy (order and portions, decided per batch) and the
connected workers' sessions (what each takes, its outbox of messages to send)."""
