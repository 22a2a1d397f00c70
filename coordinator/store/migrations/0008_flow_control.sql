-- Rate limits at dispatch (issue 17): a token bucket per (tenant, queue, type) that the
-- leader's dispatcher spends from when it claims. tenant '*' is a limit across all
-- tenants (set by an admin); queue '' is every queue, type '' every type. The leader
-- keeps the buckets in memory and writes their level back about once a second (tokens,
-- tokens_time), so that ListQueues on any coordinator shows it. A new leader does not
-- trust the written level: it starts every bucket empty (see dispatch/rate_limits.py).
CREATE TABLE rate_limits (
    tenant text NOT NULL,
    queue text NOT NULL DEFAULT '',
    type text NOT NULL DEFAULT '',
    rate float8 NOT NULL CHECK (rate > 0),
    burst bigint NOT NULL CHECK (burst >= 1),
    tokens float8 NOT NULL DEFAULT 0,
    tokens_time timestamptz,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, queue, type)
);

-- Concurrency keys: at most concurrency_limit tasks with the same key (per tenant) run
-- at once. The claim counts the RUNNING rows of a key (tasks_running_keyed), so the limit
-- holds across workers and failover with nothing in memory. Both indexes are partial:
-- a task without a key costs them nothing.
ALTER TABLE tasks ADD COLUMN concurrency_key text, ADD COLUMN concurrency_limit int,
    ADD COLUMN deadline timestamptz;
CREATE INDEX tasks_ready_keyed ON tasks (tenant, queue, type, priority DESC, deadline, id)
    WHERE state = 1 AND concurrency_key IS NOT NULL;
CREATE INDEX tasks_running_keyed ON tasks (tenant, concurrency_key)
    WHERE state = 3 AND concurrency_key IS NOT NULL;

-- Circuit breakers per (tenant, task type) that are not closed, written by the leader when
-- one changes (dispatch/breakers.py), read back by the next leader, so that a failover
-- never closes a breaker early. A closed breaker has no row.
CREATE TABLE circuit_breakers (
    tenant text NOT NULL,
    type text NOT NULL,
    state smallint NOT NULL,
    opened_time timestamptz NOT NULL,
    PRIMARY KEY (tenant, type)
);

-- Deadlines: within a priority, the earliest deadline first. NULL (no deadline) sorts
-- last, so without deadlines the order, and the claim's plan, are what they were; the
-- index keeps its name. A task still waiting when its deadline passes is made DEAD by
-- the leader's sweep, which reads tasks_deadline.
DROP INDEX tasks_ready;
CREATE INDEX tasks_ready ON tasks (tenant, queue, priority DESC, deadline, id) WHERE state = 1;
CREATE INDEX tasks_deadline ON tasks (deadline)
    WHERE deadline IS NOT NULL AND state IN (1, 2);
