-- Counters bumped in the same transaction as a change, so that services
-- keeping a copy of some table (the DHCP listener's inventory addresses)
-- learn with one primary-key read whether their copy is stale.
CREATE TABLE generations (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO generations (name, value) VALUES ('machines', 0);
