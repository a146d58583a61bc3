-- kiln inventory, SQLite dialect. Keep in step with ../postgres/0001_inventory.sql:
-- same tables, columns, index names; only types and identity syntax differ.
-- Timestamps are RFC 3339 UTC text with microseconds (sortable as text);
-- IDs are UUID text; JSON documents are text.

CREATE TABLE sites (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT,
    created_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX sites_name_uq ON sites (name);

CREATE TABLE racks (
    id          TEXT PRIMARY KEY,
    site_id     TEXT NOT NULL REFERENCES sites (id),
    name        TEXT NOT NULL,
    row_name    TEXT,
    node_group  TEXT,
    created_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX racks_site_name_uq ON racks (site_id, name);
CREATE INDEX racks_name_idx ON racks (name);

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT,
    created_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX tenants_name_uq ON tenants (name);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'tenant')),
    tenant_id   TEXT REFERENCES tenants (id),
    hash        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT,
    CHECK ((role = 'tenant') = (tenant_id IS NOT NULL))
);
CREATE UNIQUE INDEX tokens_hash_uq ON tokens (hash);

CREATE TABLE machines (
    id                 TEXT PRIMARY KEY,
    hostname           TEXT NOT NULL,
    fqdn               TEXT,
    kind               TEXT NOT NULL,
    state              TEXT NOT NULL,
    owner_id           TEXT REFERENCES tenants (id),
    rack_id            TEXT REFERENCES racks (id),
    protected          INTEGER NOT NULL DEFAULT FALSE, -- 0|1: sqlx Any reads no SQLite BOOLEAN
    maintenance        INTEGER NOT NULL DEFAULT FALSE,
    maintenance_reason TEXT,
    bmc_driver         TEXT,
    bmc_address        TEXT,
    bmc_username       TEXT,
    bmc_password       TEXT, -- sealed (encrypted) by the server, never plaintext
    ipv4               TEXT,
    ipv6               TEXT,
    hardware           TEXT,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);
CREATE UNIQUE INDEX machines_hostname_uq ON machines (hostname);
CREATE UNIQUE INDEX machines_fqdn_uq ON machines (fqdn);
CREATE UNIQUE INDEX machines_bmc_address_uq ON machines (bmc_address);
CREATE UNIQUE INDEX machines_ipv4_uq ON machines (ipv4);
CREATE UNIQUE INDEX machines_ipv6_uq ON machines (ipv6);
CREATE INDEX machines_state_idx ON machines (state, hostname);
CREATE INDEX machines_rack_idx ON machines (rack_id, hostname);
CREATE INDEX machines_owner_idx ON machines (owner_id, hostname);

CREATE TABLE machine_tags (
    machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    tag        TEXT NOT NULL,
    PRIMARY KEY (machine_id, tag)
);
CREATE INDEX machine_tags_tag_idx ON machine_tags (tag, machine_id);

CREATE TABLE nics (
    mac        TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    position   BIGINT NOT NULL,
    name       TEXT,
    switch     TEXT,
    port       TEXT,
    vlan       BIGINT,
    circuit_id TEXT,
    remote_id  TEXT
);
CREATE INDEX nics_machine_idx ON nics (machine_id, position);
CREATE UNIQUE INDEX nics_switch_port_uq ON nics (switch, port);
CREATE UNIQUE INDEX nics_option82_uq ON nics (remote_id, circuit_id);

CREATE TABLE os_images (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    version        TEXT NOT NULL,
    arch           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    tags           TEXT NOT NULL,
    min_ram_bytes  BIGINT NOT NULL,
    min_disk_bytes BIGINT NOT NULL,
    source         TEXT NOT NULL,
    sha256         TEXT,
    created_at     TEXT NOT NULL
);
CREATE UNIQUE INDEX os_images_name_version_arch_uq ON os_images (name, version, arch);

CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    tags       TEXT NOT NULL,
    content    TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX tasks_name_uq ON tasks (name);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    target_name TEXT NOT NULL,
    before_json TEXT,
    after_json  TEXT
);
CREATE INDEX events_target_idx ON events (target_kind, target_id, id);
CREATE INDEX events_target_name_idx ON events (target_name, id);

-- The audit log is append-only, enforced by the database itself.
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
