-- API tokens: an expiry (none: the token never expires; tokens made before
-- this migration keep none), and when and from where the token was last
-- used, written at most once a minute per token (see
-- crates/kiln-server/src/auth.rs). Timestamps are RFC 3339 text in UTC with
-- a fixed width, like every other column, so they compare as text. Same in
-- both backends.
ALTER TABLE tokens ADD COLUMN expires_at TEXT;
ALTER TABLE tokens ADD COLUMN last_used_at TEXT;
ALTER TABLE tokens ADD COLUMN last_used_from TEXT;
