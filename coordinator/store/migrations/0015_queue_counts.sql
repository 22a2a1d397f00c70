-- Counting a queue's tasks at any depth (issue 19, seventh round, docs/performance.md).
-- ListQueues, PauseQueue and ResumeQueue count each queue's PENDING, SCHEDULED and DEAD
-- tasks exactly up to a cap: each count reads at most cap + 1 entries of a partial index
-- led by (tenant, queue), in the order of the index's next column, and a tenant's queues
-- are found by a loose index scan (one probe per queue) over the same indexes. The order
-- matters: without an ORDER BY that only the index supplies, the planner may take a
-- bitmap scan, which reads every entry of the queue before the LIMIT applies (measured:
-- all 16,667 entries for a count capped at 1,001).
--
-- tasks_ready (tenant, queue, priority DESC, deadline, id) already fits. tasks_scheduled
-- is ordered by run_at alone, for the promoter, so a tenant's SCHEDULED tasks could only
-- be found by reading those of every tenant: this index adds them by (tenant, queue,
-- run_at). It gains an entry only when a task becomes SCHEDULED (a delayed submit, a
-- retry's backoff, UpdateTask to a later run_at), never on the path of a task submitted
-- ready.
CREATE INDEX tasks_scheduled_queue ON tasks (tenant, queue, run_at) WHERE state = 2;
-- tasks_dead was (tenant, queue): id is added so the count has an order to follow (and
-- ListDeadTasks of one queue, newest first, can read it in order).
DROP INDEX tasks_dead;
CREATE INDEX tasks_dead ON tasks (tenant, queue, id) WHERE state = 5;
