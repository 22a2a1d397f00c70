-- Concurrency keys take turns (docs/architecture.md, "The dispatch rules"): the keyed
-- claim visits a (queue, type)'s keys one by one, a loose scan that needs the key in the
-- ready index, compared byte by byte (COLLATE "C", as the leader compares the key where
-- the last claim stopped), and then each key's head in dispatch order. Same name, same
-- rows (keyed tasks that are ready); the key comes before the dispatch order.
DROP INDEX tasks_ready_keyed;
CREATE INDEX tasks_ready_keyed
    ON tasks (tenant, queue, type, concurrency_key COLLATE "C", priority DESC, deadline, id)
    WHERE state = 1 AND concurrency_key IS NOT NULL;

-- A tenant's share of dispatch beside other tenants (1 to 5; NULL: 1): each of its claims
-- takes up to FAIR_QUANTUM times this while workers of several tenants wait in a round.
ALTER TABLE tenants ADD COLUMN dispatch_weight int;
