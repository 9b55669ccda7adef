-- CSV imports. The upload is stored in the database in chunks, so that the API process that
-- receives it and the worker process that reads it share nothing but Postgres (see docs/imports.md
-- for the mapping to object storage). Rows are staged, then grouped into orders in key ranges;
-- each step commits its progress with its effects, so a killed worker resumes where it stopped.

-- Orders are keyed by (owner, external_ref): importing the same rows again finds the orders it
-- created instead of duplicating them, and two orders of one owner cannot share a reference.
CREATE UNIQUE INDEX orders_owner_external_ref ON orders (owner_id, external_ref)
    WHERE external_ref IS NOT NULL;

-- UUID version 7 (time ordered) in SQL, for orders created set-wise by the import job; the same
-- layout as `Uuid::now_v7()`. PostgreSQL 18 has a built-in `uuidv7()` that can replace it.
CREATE FUNCTION uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(
            set_bit(
                overlay(uuid_send(gen_random_uuid())
                        PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                        FROM 1 FOR 6),
                52, 1),
            53, 1),
        'hex')::uuid
$$;

CREATE TABLE imports (
    id              uuid        PRIMARY KEY,
    owner_id        uuid        NOT NULL REFERENCES users (id),
    status          text        NOT NULL DEFAULT 'queued',
    size_bytes      bigint      NOT NULL,
    total_rows      integer     NOT NULL,
    -- Progress, committed with the work it counts.
    processed_rows  integer     NOT NULL DEFAULT 0,
    imported_orders integer     NOT NULL DEFAULT 0,
    rejected_orders integer     NOT NULL DEFAULT 0,
    failed_rows     integer     NOT NULL DEFAULT 0,
    -- Checkpoints: every staged row has a number at most `processed_rows`; every external_ref
    -- up to `grouped_through` (in collation order) has been turned into an order or rejected.
    staged          boolean     NOT NULL DEFAULT false,
    grouped_through text,
    -- The request that created the import, carried into the job's logs.
    request_id      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CONSTRAINT imports_status_known
        CHECK (status IN ('queued', 'running', 'succeeded', 'completed_with_errors', 'failed'))
);
CREATE INDEX imports_owner_page ON imports (owner_id, created_at DESC, id DESC);
-- The per-principal cap counts these.
CREATE INDEX imports_active ON imports (owner_id) WHERE status IN ('queued', 'running');

-- The uploaded file, in chunks of about 1 MiB. Written before the import row exists (the upload
-- streams in first); chunks without an import are removed by the worker's cleanup.
CREATE TABLE import_files (
    import_id  uuid        NOT NULL,
    seq        integer     NOT NULL,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (import_id, seq)
);

-- Validated rows, staged for grouping. `valid` is false for a row with an error: its order is
-- rejected. Removed when the import finishes.
CREATE TABLE import_rows (
    import_id        uuid    NOT NULL,
    external_ref     text    NOT NULL,
    row_no           integer NOT NULL,
    valid            boolean NOT NULL,
    currency         text,
    sku              text,
    quantity         bigint,
    unit_price_cents bigint,
    note             text,
    PRIMARY KEY (import_id, external_ref, row_no)
);

-- Per-row errors, served by GET /v1/imports/{id}/errors in (row, id) order.
CREATE TABLE import_errors (
    id        bigint  GENERATED ALWAYS AS IDENTITY,
    import_id uuid    NOT NULL REFERENCES imports (id) ON DELETE CASCADE,
    row_no    integer NOT NULL,
    field     text    NOT NULL,
    code      text    NOT NULL,
    message   text    NOT NULL,
    PRIMARY KEY (import_id, row_no, id)
);
