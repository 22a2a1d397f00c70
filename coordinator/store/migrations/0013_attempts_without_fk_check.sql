-- The foreign key task_attempts -> tasks checked every attempt row as it was inserted: a
-- trigger per row that looks the task up and locks it FOR KEY SHARE (one more WAL record
-- per row). Measured on the result statement (finish_attempts, 500 successes, EXPLAIN
-- ANALYZE): 28 of its 43 ms, about 56 us of PostgreSQL per finished task, the largest
-- single cost of a task's life (docs/performance.md, issue 19).
--
-- The check can never fail here: every attempt row is written by the statement that
-- updates its task's row (the ``changed`` CTE of store/tasks.py), so the task exists and
-- that statement holds its row lock until it commits; a DELETE of the task waits for the
-- lock, and then takes the attempts with it (below). What the key also did, deleting a
-- task's attempts with the task, is kept: one trigger per DELETE statement on tasks, over
-- the deleted rows at once (retention and DeleteTasks delete in batches), instead of one
-- per inserted attempt.
ALTER TABLE task_attempts DROP CONSTRAINT task_attempts_task_id_fkey;

CREATE FUNCTION conveyor_delete_attempts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM task_attempts a USING gone g WHERE a.task_id = g.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_delete_attempts
    AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_delete_attempts();
