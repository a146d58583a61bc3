-- Issue 15: a NIC may be enrolled by its switch port alone (option 82
-- circuit-id / remote-id) with no MAC; kiln learns the MAC from the first
-- relayed request. `mac` was the primary key, so the table is rebuilt (SQLite
-- cannot drop a primary key) with `mac` nullable and still unique: several
-- NICs may wait for their MAC, no two may hold the same one.
CREATE TABLE nics_new (
    mac        TEXT,
    machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    position   BIGINT NOT NULL,
    name       TEXT,
    switch     TEXT,
    port       TEXT,
    vlan       BIGINT,
    circuit_id TEXT,
    remote_id  TEXT,
    CHECK (mac IS NOT NULL OR circuit_id IS NOT NULL OR remote_id IS NOT NULL)
);
INSERT INTO nics_new (mac, machine_id, position, name, switch, port, vlan, circuit_id, remote_id)
    SELECT mac, machine_id, position, name, switch, port, vlan, circuit_id, remote_id FROM nics;
DROP TABLE nics;
ALTER TABLE nics_new RENAME TO nics;
CREATE UNIQUE INDEX nics_mac_uq ON nics (mac);
CREATE INDEX nics_machine_idx ON nics (machine_id, position);
CREATE UNIQUE INDEX nics_switch_port_uq ON nics (switch, port);
CREATE UNIQUE INDEX nics_option82_uq ON nics (remote_id, circuit_id);
CREATE INDEX nics_option82_lookup_idx ON nics (circuit_id, remote_id);

-- A port that showed another MAC than the one on record: the alert (JSON,
-- kiln_types::machine::PortAlert) and the MAC it saw, by which HTTP boot
-- finds the flagged machine (and answers it with its disk) when that MAC
-- asks for its script.
ALTER TABLE machines ADD COLUMN port_alert TEXT;
ALTER TABLE machines ADD COLUMN port_alert_mac TEXT;
CREATE INDEX machines_port_alert_mac_idx ON machines (port_alert_mac);
