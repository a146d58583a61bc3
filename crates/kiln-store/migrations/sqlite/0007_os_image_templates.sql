-- The operator's installer templates of an OS image (preseed, kickstart,
-- user-data, meta-data, ignition), as a JSON object of kind -> source.
-- Kinds not in it use kiln's built-in template. Same in both backends.
ALTER TABLE os_images ADD COLUMN templates TEXT NOT NULL DEFAULT '{}';
