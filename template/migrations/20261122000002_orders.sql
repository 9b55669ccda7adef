-- Orders and their items. `version` increments on every write and is the ETag; `total_cents` is
-- derived from the items when the order is written and never accepted from a client.
CREATE TABLE orders (
    id           uuid        PRIMARY KEY,
    owner_id     uuid        NOT NULL REFERENCES users (id),
    status       text        NOT NULL DEFAULT 'draft',
    currency     text        NOT NULL,
    total_cents  bigint      NOT NULL,
    note         text,
    external_ref text,
    version      integer     NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orders_status_known CHECK (status IN ('draft', 'submitted', 'approved', 'cancelled')),
    CONSTRAINT orders_currency_iso4217 CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT orders_total_not_negative CHECK (total_cents >= 0)
);

-- One index per list query, in the keyset order (newest first, id breaking ties):
-- a customer's orders, optionally by status; everyone's orders (admins), optionally by status.
CREATE INDEX orders_owner_page ON orders (owner_id, created_at DESC, id DESC);
CREATE INDEX orders_owner_status_page ON orders (owner_id, status, created_at DESC, id DESC);
CREATE INDEX orders_page ON orders (created_at DESC, id DESC);
CREATE INDEX orders_status_page ON orders (status, created_at DESC, id DESC);

CREATE TABLE order_items (
    order_id         uuid    NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    position         integer NOT NULL,
    sku              text    NOT NULL,
    quantity         bigint  NOT NULL,
    unit_price_cents bigint  NOT NULL,
    PRIMARY KEY (order_id, position),
    CONSTRAINT order_items_quantity_range CHECK (quantity BETWEEN 1 AND 10000),
    CONSTRAINT order_items_price_range CHECK (unit_price_cents BETWEEN 0 AND 100000000)
);

-- Idempotency keys: one row per (principal, method, route template, key), written in the same
-- transaction as the effect it guards. The primary key is what settles concurrent duplicates.
CREATE TABLE idempotency_keys (
    principal_id     uuid        NOT NULL,
    method           text        NOT NULL,
    route            text        NOT NULL,
    key              text        NOT NULL,
    fingerprint      bytea       NOT NULL,
    -- The stored outcome (status, headers, body, or the problem); set before the transaction
    -- commits, so other transactions never see it empty.
    response         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal_id, method, route, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (created_at);
