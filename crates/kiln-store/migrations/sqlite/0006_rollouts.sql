-- Rollouts: a job of kind `rollout` starts reimage jobs (its children)
-- for its members, a few at a time. Same in both backends.

ALTER TABLE jobs ADD COLUMN parent_id TEXT REFERENCES jobs (id);
CREATE INDEX jobs_parent_idx ON jobs (parent_id);

CREATE TABLE rollout_members (
    rollout_id TEXT NOT NULL REFERENCES jobs (id),
    position   BIGINT NOT NULL,
    machine_id TEXT REFERENCES machines (id) ON DELETE SET NULL,
    hostname   TEXT NOT NULL,
    state      TEXT NOT NULL,
    job_id     TEXT REFERENCES jobs (id),
    message    TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (rollout_id, position)
);
