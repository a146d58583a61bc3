-- DHCP leases. An acknowledged lease is written (and committed) before the
-- ACK leaves the server, so a restart never forgets one. No foreign key to
-- machines: a lease outlives a deleted machine until it expires.
CREATE TABLE dhcp_leases (
    ip          TEXT PRIMARY KEY,
    mac         TEXT NOT NULL,
    state       TEXT NOT NULL,
    machine_id  TEXT,
    hostname    TEXT,
    expires_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX dhcp_leases_mac_idx ON dhcp_leases (mac);

-- Lease rows that could not be read at start-up are moved here, so the
-- server starts and a human can look at them.
CREATE TABLE dhcp_lease_quarantine (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ip          TEXT,
    row_json    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          TEXT NOT NULL
);

-- Finding a machine by the switch port a relay reports (option 82).
CREATE INDEX nics_option82_lookup_idx ON nics (circuit_id, remote_id);
