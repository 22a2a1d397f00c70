-- Edge values and bad rows (docs/architecture.md, "Edge values and bad rows").

-- Timestamps are finite. asyncpg writes datetime's first and last microsecond (the
-- smallest and the largest protobuf Timestamp) as -infinity and infinity, which read back
-- as naive datetimes that nothing can compare; validation now keeps every timestamp
-- within 1970..9000 (coordinator/bounds.py), and these constraints keep plain SQL from
-- storing what cannot be read back. Infinities stored before mean "no bound", and become
-- that; a schedule that could never fire (a start at infinity, an end at -infinity) is
-- set aside with the reason (the fault column below).
ALTER TABLE schedules ADD COLUMN fault text;
COMMENT ON COLUMN schedules.fault IS
    'Why the schedule firer set this schedule aside (a stored value it cannot use); NULL '
    'while it fires. UpdateSchedule and ResumeSchedule give it a fresh start.';

UPDATE schedules SET start_time = NULL WHERE start_time = '-infinity';
UPDATE schedules SET end_time = NULL WHERE end_time = 'infinity';
UPDATE schedules SET
    fault = 'stored with a time at infinity, which it can never reach; give it new start '
        || 'and end times with UpdateSchedule',
    start_time = NULL, end_time = NULL, next_fire_time = NULL, wake_time = NULL,
    buffered_tick = NULL
WHERE NOT (isfinite(coalesce(start_time, now())) AND isfinite(coalesce(end_time, now()))
    AND isfinite(coalesce(next_fire_time, now())) AND isfinite(coalesce(wake_time, now()))
    AND isfinite(coalesce(buffered_tick, now())));
ALTER TABLE schedules ADD CONSTRAINT schedules_finite_times CHECK (
    isfinite(start_time) AND isfinite(end_time) AND isfinite(next_fire_time)
    AND isfinite(wake_time) AND isfinite(buffered_tick));

UPDATE api_keys SET expire_time = NULL WHERE expire_time = 'infinity';
UPDATE api_keys SET expire_time = create_time WHERE expire_time = '-infinity';
UPDATE api_keys SET revoke_time = now() WHERE NOT isfinite(revoke_time);
UPDATE api_keys SET create_time = now() WHERE NOT isfinite(create_time);
ALTER TABLE api_keys ADD CONSTRAINT api_keys_finite_times CHECK (
    isfinite(create_time) AND isfinite(expire_time) AND isfinite(revoke_time));

-- Ticks a schedule did not fire because its tenant was over a limit at the tick (a firing
-- is a submit: max_backlog, submit_rate). They are shown among the schedule's recent
-- firings; the firer keeps the latest few per schedule.
CREATE TABLE schedule_refusals (
    schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    tick        timestamptz NOT NULL,
    tenant      text NOT NULL,
    limit_name  text NOT NULL,
    refuse_time timestamptz NOT NULL,
    PRIMARY KEY (schedule_id, tick)
);
