-- Firmware, boot policy and the installed OS of each machine (issue 15).
-- `firmware` is `uefi` | `bios`, NULL while unknown (the agent reports it
-- at discovery, or an operator sets it); `secure_boot` means anything only
-- with `uefi`. `boot_policy` is `disk` | `always-netboot`. The `os_*`
-- columns say what the last reimage installed, written when its new OS
-- phoned home (stage 5); `os_name`, `os_version` are what lists filter on.
ALTER TABLE machines ADD COLUMN firmware        TEXT;
ALTER TABLE machines ADD COLUMN secure_boot     INTEGER NOT NULL DEFAULT FALSE; -- 0|1: sqlx Any reads no SQLite BOOLEAN
ALTER TABLE machines ADD COLUMN boot_policy     TEXT NOT NULL DEFAULT 'disk';
ALTER TABLE machines ADD COLUMN os_image_id     TEXT;
ALTER TABLE machines ADD COLUMN os_name         TEXT;
ALTER TABLE machines ADD COLUMN os_version      TEXT;
ALTER TABLE machines ADD COLUMN os_sha256       TEXT;
ALTER TABLE machines ADD COLUMN os_job_id       TEXT;
ALTER TABLE machines ADD COLUMN os_installed_at TEXT;
CREATE INDEX machines_os_idx ON machines (os_name, os_version, hostname);
CREATE INDEX machines_firmware_idx ON machines (firmware, hostname);
