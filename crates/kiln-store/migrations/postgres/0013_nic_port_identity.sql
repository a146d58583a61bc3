-- Issue 15: a NIC may be enrolled by its switch port alone (option 82
-- circuit-id / remote-id) with no MAC; kiln learns the MAC from the first
-- relayed request. `mac` stays unique (NULLs are distinct): several NICs
-- may wait for their MAC, no two may hold the same one.
ALTER TABLE nics DROP CONSTRAINT nics_pkey;
ALTER TABLE nics ALTER COLUMN mac DROP NOT NULL;
CREATE UNIQUE INDEX nics_mac_uq ON nics (mac);
ALTER TABLE nics ADD CONSTRAINT nics_identity_ck
    CHECK (mac IS NOT NULL OR circuit_id IS NOT NULL OR remote_id IS NOT NULL);

-- A port that showed another MAC than the one on record: the alert (JSON,
-- kiln_types::machine::PortAlert) and the MAC it saw, by which HTTP boot
-- finds the flagged machine (and answers it with its disk) when that MAC
-- asks for its script.
ALTER TABLE machines ADD COLUMN port_alert TEXT;
ALTER TABLE machines ADD COLUMN port_alert_mac TEXT;
CREATE INDEX machines_port_alert_mac_idx ON machines (port_alert_mac);
