"""Cron schedules: tick arithmetic and policies (pure), validation, and the leader's firer."""
