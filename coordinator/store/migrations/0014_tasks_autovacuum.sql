-- The tasks table is a queue (issue 19, a deep backlog): every claim moves ready rows out
-- of the partial index tasks_ready (state 1 -> 3, never a HOT update: state is in the
-- indexes' predicates), and their index entries stay, dead, at the head of the index that
-- the next claim scans first, until VACUUM removes them. Nothing else does: inserts go to
-- the other end of the index (new ids), so no page split ever cleans the head.
--
-- With the default scale factor (0.2), autovacuum waits for 20 % of the table to be dead:
-- with 10,000,000 tasks waiting, 2,000,000 dead rows. Measured (docs/performance.md,
-- "Issue 19: a deep backlog"): after 1,050,000 tasks dispatched from a backlog of
-- 10,000,000, 2.17 million dead tuples and no autovacuum since the load; the claim's head
-- scan read 9,132 index pages for 500 tasks (52.8 ms; 1.2 ms before) and dispatch fell to
-- 75 % of its rate. A fixed threshold instead vacuums after every 50,000 dead rows,
-- whatever the depth (at most once per autovacuum_naptime, a server setting), and a higher
-- cost limit lets a pass over a deep table finish within that time.
ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 50000,
    autovacuum_vacuum_cost_limit = 2000,
    -- Statistics stay fresh as well: the ready index's estimates drive the claim's plan.
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 100000
);
