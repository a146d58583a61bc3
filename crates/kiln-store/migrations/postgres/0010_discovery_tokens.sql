-- Discovery tokens that have carried a report: a token is good for one
-- report, and this record (not server memory) is what says it was used, so
-- the rule survives restarts and holds for every server on one database.
-- `nonce` is the token's random part; `expires_at` is the token's own
-- expiry (RFC 3339, UTC): after it the token is refused for its age anyway,
-- so rows past it are pruned. Same in both backends.
CREATE TABLE discovery_tokens_used (
    nonce TEXT PRIMARY KEY,
    mac TEXT NOT NULL,
    used_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX discovery_tokens_used_expires ON discovery_tokens_used (expires_at);
