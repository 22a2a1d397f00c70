-- The end-to-end encryption key a task's payload is sealed with (issue 15, item 5): the key
-- id its envelope names, read from the envelope's header at submit (no cryptography; only
-- for the content type application/vnd.conveyor.encrypted), NULL for any other payload.
-- The claim gives a worker only tasks whose key it holds (Hello.encryption_keys), so a
-- worker without a key neither burns attempts nor drains the queue.
ALTER TABLE tasks ADD COLUMN encryption_key text;

-- Tasks already stored that may still run (ready, scheduled, running, or dead and so
-- redrivable): the key id from the envelope's header (magic "\x00CVE" | version | key id
-- length | key id), when it is a well-formed key id. The outer CASE keeps get_byte within
-- the payload.
UPDATE tasks SET encryption_key = k.key_id
FROM (
    SELECT id, CASE WHEN octet_length(payload) >= 6 THEN CASE
        WHEN substring(payload FROM 1 FOR 4) = '\x00435645'::bytea
            AND octet_length(payload) >= 6 + get_byte(payload, 5)
        THEN encode(substring(payload FROM 7 FOR get_byte(payload, 5)), 'escape')
    END END AS key_id
    FROM tasks
    WHERE content_type = 'application/vnd.conveyor.encrypted' AND state IN (1, 2, 3, 5)
) k
WHERE tasks.id = k.id AND k.key_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$';
