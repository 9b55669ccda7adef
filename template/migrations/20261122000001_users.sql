-- Users and their roles. E-mails are stored normalised (trimmed, lower-case) by the application,
-- and the CHECK makes sure nothing else slips in, so a plain unique constraint is case-insensitive.
CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL,
    password_hash text        NOT NULL,
    role          text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_email_normalised CHECK (email = lower(btrim(email))),
    CONSTRAINT users_role_known CHECK (role IN ('customer', 'admin'))
);
