"""``conveyor bench``: throughput and pickup latency with real processes on one machine."""
