-- Task dependencies (docs/architecture.md, "Dependencies").

-- Dependencies a BLOCKED task still waits for. A counter on the dependent's own row, not
-- a count of its edges: two dependencies finishing in concurrent transactions each
-- decrement it under the row's lock, so the second sees the first's decrement and
-- releases the task (a count of edges read from each statement's snapshot would not).
ALTER TABLE tasks ADD COLUMN deps_left integer NOT NULL DEFAULT 0;

-- One row per dependency a task still waits for. The release deletes the edges of the
-- tasks that finished (by after_id: the index below), so a task finishing twice (DEAD,
-- RetryTask, SUCCEEDED) releases its dependents once, and what is left is what waits.
CREATE TABLE task_edges (
    task_id           uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    after_id          uuid NOT NULL,
    tenant            text NOT NULL,
    -- DEPENDENCY_POLICY_CANCEL: the dependent is cancelled when after_id ends DEAD or
    -- CANCELLED; otherwise that counts as finished.
    cancel_on_failure boolean NOT NULL,
    PRIMARY KEY (task_id, after_id)
);
CREATE INDEX task_edges_after ON task_edges (after_id);

-- BLOCKED tasks count towards a tenant's unfinished tasks (tenancy quotas).
CREATE INDEX tasks_blocked ON tasks (tenant) WHERE state = 7;
