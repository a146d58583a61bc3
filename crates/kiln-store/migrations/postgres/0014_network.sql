-- Issue 15: network configuration from the inventory.
--
-- A subnet's settings are one JSON document (`doc`: the kiln_types Subnet
-- as JSON); `name` and `prefix` are columns for uniqueness and lookups.
-- A machine's interfaces, bonds and VLANs are one JSON document too
-- (`machine_networks.doc`, the MachineNetwork with every static address
-- filled in), and each static address is also a row of `ip_assignments`,
-- whose primary key is what makes "not taken by another machine" hold
-- when two servers assign at once (the loser's insert fails and it picks
-- again). Same in both backends.
CREATE TABLE subnets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX subnets_name ON subnets (name);

CREATE TABLE machine_networks (
    machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
    doc TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE ip_assignments (
    address TEXT PRIMARY KEY,
    subnet_id TEXT NOT NULL REFERENCES subnets (id),
    machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE
);
CREATE INDEX ip_assignments_subnet ON ip_assignments (subnet_id);
CREATE INDEX ip_assignments_machine ON ip_assignments (machine_id);
