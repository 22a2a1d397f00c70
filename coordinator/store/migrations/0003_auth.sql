-- API keys, tenant limits and the audit log (docs/architecture.md, "Tenants and security").

-- An API key is "cvk_<id>_<secret>"; only the SHA-256 of the whole key is kept. The id is
-- the lookup prefix: public, shown in lists and in the audit log.
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    tenant      text NOT NULL,
    -- Scope names: submit, read, operate, worker, admin.
    scopes      text[] NOT NULL,
    description text NOT NULL DEFAULT '',
    -- The admin key that created it, 'dsn' (conveyor keys create --dsn) or 'bootstrap'.
    created_by  text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz,
    revoke_time timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, create_time DESC);

-- Limits of one tenant; NULL: the coordinator's default for that limit, 0: no limit.
CREATE TABLE tenants (
    name              text PRIMARY KEY,
    max_backlog       bigint,
    submit_rate       double precision,
    submit_burst      bigint,
    max_payload_bytes bigint,
    max_schedules     bigint,
    update_time       timestamptz NOT NULL DEFAULT now()
);

-- Every coordinator caches keys and limits in memory; a change, however it is made (the
-- admin API, conveyor keys --dsn, plain SQL), tells them at commit through NOTIFY, with
-- the row's key as the payload.
CREATE FUNCTION conveyor_notify_api_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_api_keys', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_api_key();

CREATE FUNCTION conveyor_notify_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_tenants', CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END
$$;
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_tenant();

-- The audit log, a hash chain: row seq carries the hash of row seq - 1 (prev_hash, 32 zero
-- bytes for row 1) and its own hash over its fields and prev_hash (the encoding is
-- coordinator/audit.py's). Appends are serialized by an advisory lock and batched.
CREATE TABLE audit_events (
    seq        bigint PRIMARY KEY,
    time       timestamptz NOT NULL,
    tenant     text NOT NULL,
    key_id     text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    outcome    text NOT NULL,
    peer       text NOT NULL,
    request_id text NOT NULL,
    detail     text NOT NULL,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);
CREATE INDEX audit_events_tenant ON audit_events (tenant, seq);
