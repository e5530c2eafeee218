-- tollgate fleet schema, version 1. Money is NUMERIC (exact); times are timestamptz
-- (microseconds, as the ledger's own times).

-- API keys: the record as JSON, the secret only as its SHA-256.
CREATE TABLE tg_keys (
    id             text PRIMARY KEY,
    secret_sha256  text NOT NULL,
    bootstrap_name text UNIQUE,
    created_at     timestamptz NOT NULL,
    record         jsonb NOT NULL
);
CREATE INDEX tg_keys_secret ON tg_keys (secret_sha256);

-- Balances per key and bucket. `leased` is the part instances hold as leases (the sum of
-- tg_leases for the wallet): it is never more than the balance.
CREATE TABLE tg_wallets (
    key_id  text NOT NULL,
    bucket  text NOT NULL,
    balance numeric NOT NULL DEFAULT 0,
    leased  numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, bucket),
    CONSTRAINT tg_wallets_balance_not_negative CHECK (balance >= 0),
    CONSTRAINT tg_wallets_leased_within_balance CHECK (leased >= 0 AND leased <= balance)
);

-- Applied top-up references: the primary key makes a reference apply once per key, whichever
-- instance receives it (F7).
CREATE TABLE tg_topup_refs (
    key_id    text NOT NULL,
    reference text NOT NULL,
    bucket    text NOT NULL,
    amount    numeric NOT NULL,
    PRIMARY KEY (key_id, reference)
);

-- Every top-up applied.
CREATE TABLE tg_topups (
    seq       bigserial PRIMARY KEY,
    key_id    text NOT NULL,
    bucket    text NOT NULL,
    amount    numeric NOT NULL,
    reference text,
    at        timestamptz NOT NULL
);

-- Live instances: each renews its expiry while it runs; another instance reaps the leases and
-- open holds of one whose expiry has passed. `epoch` changes at each registration.
CREATE TABLE tg_instances (
    instance_id text PRIMARY KEY,
    epoch       bigint NOT NULL,
    started_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- The part of a wallet's balance an instance may grant holds from.
CREATE TABLE tg_leases (
    instance_id text NOT NULL,
    key_id      text NOT NULL,
    bucket      text NOT NULL,
    amount      numeric NOT NULL,
    PRIMARY KEY (instance_id, key_id, bucket),
    CONSTRAINT tg_leases_amount_not_negative CHECK (amount >= 0)
);
CREATE INDEX tg_leases_wallet ON tg_leases (key_id, bucket);

-- Open holds with their persisted consumption (R9); the draft record is postcard bytes.
CREATE TABLE tg_holds (
    instance_id     text NOT NULL,
    hold_id         bigint NOT NULL,
    key_id          text NOT NULL,
    bucket          text NOT NULL,
    granted         numeric NOT NULL,
    consumed        numeric NOT NULL,
    consumed_tokens bigint NOT NULL,
    updated_at      timestamptz NOT NULL,
    draft           bytea NOT NULL,
    PRIMARY KEY (instance_id, hold_id)
);
CREATE INDEX tg_holds_key ON tg_holds (key_id);

-- The ledger: each record as postcard bytes (as the sled store keeps it), with the columns the
-- admin API's scans need: time order with paging by (started_at, request_id), a key's
-- records, a workflow run's records.
CREATE TABLE tg_ledger (
    request_id text PRIMARY KEY,
    started_at timestamptz NOT NULL,
    key_id     text NOT NULL,
    task       text,
    -- The instance that served the request (not part of the record's bytes).
    instance_id text,
    record     bytea NOT NULL
);
CREATE INDEX tg_ledger_time ON tg_ledger (started_at, request_id);
CREATE INDEX tg_ledger_key ON tg_ledger (key_id, started_at, request_id);
CREATE INDEX tg_ledger_task ON tg_ledger (task, started_at, request_id) WHERE task IS NOT NULL;

-- Group-committed batches by instance and epoch: a batch whose COMMIT was interrupted is found
-- here before it is tried again, so that it never applies twice.
CREATE TABLE tg_batches (
    instance_id text NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, epoch, seq)
);
