-- Queue operations (issue 17): what an operator set on a queue of a tenant. A row exists
-- only for a queue something was set on; a queue without one is not paused. Read by the
-- leader when it takes office (paused queues) and written only by the leader, fenced, so
-- a pause holds across a failover. Small: one row per configured queue, never per task.
CREATE TABLE queue_settings (
    tenant      text NOT NULL,
    queue       text NOT NULL,
    paused      boolean NOT NULL DEFAULT false,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, queue)
);
