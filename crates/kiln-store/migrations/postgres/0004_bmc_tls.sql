-- Per-BMC TLS settings for the redfish driver: whether the certificate is
-- checked at all (off only when an operator says so, per BMC; audited) and
-- extra CA certificates (PEM) to trust for this BMC, e.g. a site CA.
ALTER TABLE machines ADD COLUMN bmc_insecure BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE machines ADD COLUMN bmc_ca_cert  TEXT;
