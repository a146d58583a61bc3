-- Durable jobs (kiln-workflow), their log, and the net-boot arms a job sets.
-- keep in step with ../sqlite/0005_jobs.sql

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL,
    machine_id       TEXT REFERENCES machines (id) ON DELETE SET NULL,
    hostname         TEXT NOT NULL,
    os_label         TEXT NOT NULL,
    spec             TEXT NOT NULL, -- JSON, what was asked (no plaintext secret)
    data             TEXT NOT NULL, -- JSON, what the steps recorded
    step_index       BIGINT NOT NULL,
    step_started_at  TEXT NOT NULL,
    step_attempts    BIGINT NOT NULL,
    stage            BIGINT NOT NULL,
    reason           TEXT,
    ticket           TEXT,
    callback_url     TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    pause_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    -- When the job is next due to run; NULL while paused and once final.
    run_at           TEXT,
    -- The server running it now, and until when that claim holds.
    lease_owner      TEXT,
    lease_expires    TEXT,
    created_by       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    finished_at      TEXT
);
-- At most one active job per machine.
CREATE UNIQUE INDEX jobs_active_machine_uq ON jobs (machine_id) WHERE finished_at IS NULL;
CREATE INDEX jobs_due_idx ON jobs (run_at) WHERE run_at IS NOT NULL;
CREATE INDEX jobs_created_idx ON jobs (created_at, id);

CREATE TABLE job_log (
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    seq     BIGINT NOT NULL,
    at      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    step    TEXT,
    stage   BIGINT,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- What a job armed for a machine's next net boot (kiln_boot::decision).
-- The one-time token is not stored: the server derives it from its key and
-- the job id, so a copy of the database cannot boot an installer.
CREATE TABLE netboot_arms (
    machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
    job_id     TEXT NOT NULL REFERENCES jobs (id),
    kernel     TEXT NOT NULL,
    initrds    TEXT NOT NULL, -- JSON array
    cmdline    TEXT NOT NULL, -- JSON array
    expires_at TEXT NOT NULL,
    consumed   BOOLEAN NOT NULL DEFAULT FALSE
);
