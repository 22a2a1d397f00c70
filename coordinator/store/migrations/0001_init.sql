-- Conveyor schema, version 1.
-- Task states and attempt outcomes are stored as the conveyor.v1 enum numbers
-- (TaskState: 1 PENDING, 2 SCHEDULED, 3 RUNNING, 4 SUCCEEDED, 5 DEAD, 6 CANCELLED;
--  AttemptOutcome: 1 RUNNING, 2 SUCCEEDED, 3 FAILED, 4 TIMED_OUT, 5 LEASE_EXPIRED, 6 CANCELLED).

-- One row per cluster: the epoch of the current leader. Every dispatch-side transaction
-- reads it FOR SHARE and checks it is still its own (the fencing token), so a new leader's
-- UPDATE waits for in-flight writes of the old one and all later ones see the new epoch.
CREATE TABLE leadership (
    cluster     text PRIMARY KEY,
    epoch       bigint NOT NULL,
    leader_id   text NOT NULL,
    address     text NOT NULL DEFAULT '',
    -- etcd revision at which the current term was won (0 in single-node mode): a
    -- candidate may only take office with a newer one.
    term_revision bigint NOT NULL DEFAULT 0,
    update_time timestamptz NOT NULL DEFAULT now()
);

-- The fencing check. Dispatch-side statements call it as an uncorrelated sub-select, which
-- PostgreSQL runs once, before touching any row; it takes the leadership row FOR SHARE
-- until the statement's transaction ends and fails with SQLSTATE CVF01 when p_epoch is no
-- longer the cluster's. One statement then carries its own fence: no separate round trip.
CREATE FUNCTION conveyor_fence(p_cluster text, p_epoch bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    current_epoch bigint;
BEGIN
    SELECT epoch INTO current_epoch FROM leadership WHERE cluster = p_cluster FOR SHARE;
    IF current_epoch IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION 'fenced: epoch % of cluster % is not current (current: %)',
            p_epoch, p_cluster, current_epoch
            USING ERRCODE = 'CVF01';
    END IF;
    RETURN true;
END
$$;

-- Every term, as it began: the history operators (and the failover checker) read to see
-- which leader held which epoch when.
CREATE TABLE leadership_terms (
    cluster       text NOT NULL,
    epoch         bigint NOT NULL,
    leader_id     text NOT NULL,
    address       text NOT NULL,
    term_revision bigint NOT NULL,
    start_time    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (cluster, epoch)
);

CREATE TABLE tasks (
    id                uuid PRIMARY KEY,
    tenant            text NOT NULL,
    queue             text NOT NULL,
    type              text NOT NULL,
    payload           bytea NOT NULL,
    content_type      text NOT NULL,
    state             smallint NOT NULL,
    priority          integer NOT NULL,
    -- Attempts started, monotonic over the task's life (also across RetryTask), so that
    -- (lease_epoch, attempt) never names two different attempts.
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    -- attempt at the last RetryTask: attempts left = max_attempts - (attempt - attempt_base).
    attempt_base      integer NOT NULL DEFAULT 0,
    idempotency_key   text,
    -- sha256 of the normalised request, to tell a retry from a different request.
    request_hash      bytea,
    run_at            timestamptz NOT NULL,
    timeout_ms        bigint NOT NULL,
    retry_initial_ms  bigint NOT NULL,
    retry_max_ms      bigint NOT NULL,
    retry_multiplier  double precision NOT NULL,
    retry_jitter      double precision NOT NULL,
    labels            jsonb NOT NULL DEFAULT '{}',
    traceparent       text NOT NULL DEFAULT '',
    result            bytea,
    last_error        text NOT NULL DEFAULT '',
    worker_id         text,
    -- The current (or last) lease: who granted it, when it started and when it runs out.
    lease_epoch       bigint,
    lease_start_time  timestamptz,
    lease_expire_time timestamptz,
    create_time       timestamptz NOT NULL,
    update_time       timestamptz NOT NULL,
    finish_time       timestamptz
);

CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The dispatch order: highest priority first, then oldest (ids are time-ordered).
CREATE INDEX tasks_ready ON tasks (tenant, queue, priority DESC, id) WHERE state = 1;
CREATE INDEX tasks_scheduled ON tasks (run_at) WHERE state = 2;
CREATE INDEX tasks_leased ON tasks (lease_expire_time) WHERE state = 3;
CREATE INDEX tasks_dead ON tasks (tenant, queue) WHERE state = 5;
-- No (tenant, id) index: every state change is a non-HOT update that writes to every
-- index, so each index costs on the hot path. Listing walks the primary key instead.

-- Finished attempts only: the running attempt is the task row itself (attempt, worker_id,
-- lease_start_time), so a task costs one attempt write, not an insert and an update.
CREATE TABLE task_attempts (
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,
    tenant     text NOT NULL,
    worker_id  text NOT NULL,
    epoch      bigint NOT NULL,
    start_time timestamptz NOT NULL,
    end_time   timestamptz,
    outcome    smallint NOT NULL,
    error      text NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, attempt)
);

-- Results that were refused (stale lease, task not held, task finished): recorded, never applied.
CREATE TABLE refused_results (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    task_id     uuid NOT NULL,
    attempt     integer NOT NULL,
    epoch       bigint NOT NULL,
    worker_id   text NOT NULL,
    outcome     smallint NOT NULL,
    reason      text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
