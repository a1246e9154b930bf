-- keybroker schema: service tokens bound to a client certificate (mTLS
-- identity, package server). {{.schema}} is the quoted schema name.
--
-- client_cert_sha256 is the SHA-256 of the DER of the one client
-- certificate a token is accepted with: the server refuses the token (the
-- same 401 as a bad token) on any connection whose verified leaf
-- certificate hashes otherwise, or that has none. NULL (every token made
-- before this migration, and those made without a binding) keeps the
-- token alone as the identity. A fingerprint is not secret; it is stored
-- whole so the server can compare it.
ALTER TABLE {{.schema}}.service_tokens
    ADD COLUMN client_cert_sha256 bytea
        CHECK (client_cert_sha256 IS NULL OR octet_length(client_cert_sha256) = 32);
