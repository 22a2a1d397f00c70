-- Events (issue 18). Webhooks: per-tenant subscriptions, the durable outbox of the events owed to
-- them and the attempts made to deliver each.
--
-- An outbox row is written in the same statement as the state change that causes it (the
-- "webhook_events" fragment of store/transitions.py): a task's state cannot change without
-- the event being owed, and a coordinator crash loses none. The leader's deliverer
-- (coordinator/webhooks/delivery.py) sends what is due, signed, and records each attempt.

CREATE TABLE webhook_subscriptions (
    id          uuid PRIMARY KEY,
    tenant      text NOT NULL,
    url         text NOT NULL,
    -- The signing secret (whsec_<base64>): the coordinator must sign with it, so it is
    -- stored as is, like the payloads it protects.
    secret      text NOT NULL,
    -- The event filter: a task's transition matches when its new state, queue and type are
    -- each in the list, or the list is empty (any).
    states      smallint[] NOT NULL DEFAULT '{}',
    queues      text[] NOT NULL DEFAULT '{}',
    types       text[] NOT NULL DEFAULT '{}',
    description text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now()
);
-- The fragment joins each changed task to its tenant's subscriptions.
CREATE INDEX webhook_subscriptions_tenant ON webhook_subscriptions (tenant);

CREATE TABLE webhook_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    tenant          text NOT NULL,
    task_id         uuid NOT NULL,
    queue           text NOT NULL,
    type            text NOT NULL,
    from_state      smallint NOT NULL,
    to_state        smallint NOT NULL,
    attempt         int NOT NULL,
    event_time      timestamptz NOT NULL DEFAULT now(),
    -- 0 pending, 1 delivered, 2 failed (retries ran out); WebhookDelivery.Status.
    status          smallint NOT NULL DEFAULT 0,
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    -- Retries stop once this is older than the retry window; a replay moves it to now.
    retry_from      timestamptz NOT NULL DEFAULT now(),
    last_status_code int,
    last_error      text NOT NULL DEFAULT '',
    delivered_time  timestamptz
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_time) WHERE status = 0;
CREATE INDEX webhook_outbox_subscription ON webhook_outbox (subscription_id, id);
-- A submit that takes back rows it inserted takes back their events too (tasks.take_back).
CREATE INDEX webhook_outbox_task ON webhook_outbox (task_id);

CREATE TABLE webhook_attempts (
    outbox_id   bigint NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
    attempt     int NOT NULL,
    tenant      text NOT NULL,
    time        timestamptz NOT NULL DEFAULT now(),
    -- The HTTP status of the response; NULL when there was none (refused, timed out).
    status_code int,
    error       text NOT NULL DEFAULT '',
    duration_ms int NOT NULL DEFAULT 0,
    PRIMARY KEY (outbox_id, attempt)
);

-- Task-type definitions (issue 18): per tenant and type, the defaults a submit that
-- leaves a field unset gets. NULL: not set (the coordinator's own default applies).
CREATE TABLE task_types (
    tenant           text NOT NULL,
    type             text NOT NULL,
    queue            text,
    priority         int,
    max_attempts     int,
    timeout_ms       bigint,
    retry_initial_ms bigint,
    retry_max_ms     bigint,
    retry_multiplier float8,
    retry_jitter     float8,
    version          bigint NOT NULL,
    update_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, type)
);

-- One counter over every definition: each change takes the next version in its
-- transaction, and coordinators say which version their cache holds (tenancy of the
-- cache: coordinator/lifecycle/task_types.py).
CREATE TABLE task_types_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
INSERT INTO task_types_version (version) VALUES (0);
