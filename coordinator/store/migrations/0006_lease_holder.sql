-- Which worker process holds a lease (issue 15, item 3): the SHA-256 of the resume token
-- that the coordinator gave the process in Welcome. Hello names a worker id, a hostname and
-- a pid, none of which proves anything; a reconnecting worker proves that it is the process
-- that was granted a lease by presenting the token, and only then are the leases it lists
-- kept and those it leaves out taken back as never started. Kept in the row so the proof
-- holds across a restart or a failover. Meaningful while the task is RUNNING, like
-- worker_id; NULL for leases granted before this migration.
ALTER TABLE tasks ADD COLUMN lease_holder bytea;
