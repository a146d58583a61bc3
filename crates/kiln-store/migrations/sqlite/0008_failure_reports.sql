-- A failure the job's agent or installer reported (`POST
-- /api/v1/jobs/{id}/failure`): the engine ends the job as failed with it,
-- running the job's undo, the next time it looks at the job. Same in both
-- backends.
ALTER TABLE jobs ADD COLUMN failure_reported TEXT;
