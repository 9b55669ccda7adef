-- Claims an idempotency key in one round trip: inserts it unless it exists, and waits at most
-- 100 ms for an in-flight duplicate's uncommitted row (then fails with lock_not_available,
-- 55P03, which the service answers with 409 idempotency_key_in_use). The timeout is the
-- function's own setting, so the rest of the request's transaction keeps the default: the
-- effect's own lock waits are not cut short.
CREATE FUNCTION claim_idempotency_key(
    p_principal_id uuid,
    p_method text,
    p_route text,
    p_key text,
    p_fingerprint bytea
) RETURNS boolean
LANGUAGE plpgsql
SET lock_timeout = '100ms'
AS $$
BEGIN
    INSERT INTO idempotency_keys (principal_id, method, route, key, fingerprint)
    VALUES (p_principal_id, p_method, p_route, p_key, p_fingerprint)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
