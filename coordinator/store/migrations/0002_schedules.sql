-- Schedules: cron expressions that submit a task at every tick.
-- Policies are stored as the conveyor.v1 enum numbers (OverlapPolicy: 1 ALLOW, 2 SKIP,
-- 3 BUFFER_ONE; CatchUpPolicy: 1 SKIP, 2 FIRE_ONCE, 3 FIRE_ALL).
--
-- Each firing is a task with idempotency key 'schedule:<id>:<tick, UTC ISO 8601>', inserted
-- in the same transaction that moves next_fire_time past the tick (and checks the leader's
-- epoch), so a tick is fired once across crashes and failovers.
CREATE TABLE schedules (
    id              uuid PRIMARY KEY,
    tenant          text NOT NULL,
    name            text NOT NULL,
    cron            text NOT NULL,
    time_zone       text NOT NULL,
    -- The conveyor.v1.TaskTemplate, serialized (validated when written).
    template        bytea NOT NULL,
    overlap_policy  smallint NOT NULL,
    catch_up_policy smallint NOT NULL,
    catch_up_limit  integer NOT NULL,
    paused          boolean NOT NULL DEFAULT false,
    start_time      timestamptz,
    end_time        timestamptz,
    -- The cursor: the earliest tick not handled yet; NULL when no tick is left.
    next_fire_time  timestamptz,
    -- When the firer looks at the schedule next: next_fire_time, or sooner while a tick
    -- is buffered (BUFFER_ONE) waiting for the previous firing to finish.
    wake_time       timestamptz,
    buffered_tick   timestamptz,
    -- The latest firing's task, for the overlap policies. (The other recent firings are
    -- found by their idempotency keys: rewriting a list here at every tick would multiply
    -- the WAL each firing costs.)
    last_task_id    uuid,
    -- Bumped by every change a client makes (not by firing); the etag.
    version         bigint NOT NULL DEFAULT 1,
    create_time     timestamptz NOT NULL,
    update_time     timestamptz NOT NULL
);

CREATE UNIQUE INDEX schedules_name ON schedules (tenant, name);
-- The firer's one query: schedules due by wake_time, earliest first.
CREATE INDEX schedules_due ON schedules (wake_time) WHERE NOT paused AND wake_time IS NOT NULL;
