-- Exactly-once effects (issue 18): the idempotency ledger of handlers, named locks with
-- fencing tokens, and a version on tasks for UpdateTask.

-- One effect a handler recorded under a key (LedgerService.RecordEffect): written only by
-- the attempt holding the task's lease (checked in the same statement, on the task row),
-- read by later attempts of the task so they skip the effect. First record of a key wins.
CREATE TABLE task_effects (
    task_id       uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    key           text NOT NULL,
    tenant        text NOT NULL,
    result        bytea NOT NULL,
    attempt       integer NOT NULL,
    -- The recording attempt's fencing token: lease_epoch << 32 | attempt.
    fencing_token bigint NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, key)
);

-- Named locks (LockService), one row per name ever taken: the row stays when the lock is
-- released, so fencing_token only grows (each acquisition adds one).
CREATE TABLE locks (
    tenant        text NOT NULL,
    name          text NOT NULL,
    fencing_token bigint NOT NULL,
    -- The holder's secret (AcquireLockResponse.handle); NULL while the lock is free.
    handle        bytea,
    expire_time   timestamptz,
    PRIMARY KEY (tenant, name)
);

-- What UpdateTask compares (Task.etag): bumped by every UpdateTask, and by nothing on the
-- hot path. A constant default: no table rewrite.
ALTER TABLE tasks ADD COLUMN version bigint NOT NULL DEFAULT 1;
