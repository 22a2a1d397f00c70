"""Webhooks: where deliveries may go (guard), and the leader's deliverer (delivery)."""
