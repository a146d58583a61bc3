-- An OS image's typed file format (raw, raw+zstd, qcow2) and content
-- (filesystem, whole-disk). Until now the format was guessed from the
-- source's name whenever a plan was made; existing rows get that guess once,
-- here, and keep it. Same in both backends.
ALTER TABLE os_images ADD COLUMN format TEXT NOT NULL DEFAULT 'raw';
ALTER TABLE os_images ADD COLUMN content TEXT NOT NULL DEFAULT 'filesystem';
UPDATE os_images SET format = CASE
    WHEN lower(source) LIKE '%.qcow2' OR lower(source) LIKE '%.qcow' THEN 'qcow2'
    WHEN lower(source) LIKE '%.zst' OR lower(source) LIKE '%.zstd' THEN 'raw+zstd'
    ELSE 'raw'
END;
