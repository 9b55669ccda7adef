"""Schemathesis hooks for scripts/contract-test.sh (loaded by `hooks` in schemathesis.toml).

Generated requests draw their `Idempotency-Key` from a small space ("0", "00", ...), so two
requests with different bodies often share one, and the service rightly answers the second with
422 `idempotency_key_reused`: a state of the server that no schema can express. Giving every
request whose key is valid a fresh one keeps that answer out of the run, so a 422 on a valid
request can only be a real mismatch between the schema and the service's validation. An invalid
key, and every request of the negative phases (one may be testing a missing key), is left as
generated. Replays of a key are tested in tests/api/idempotency.rs.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[\x20-\x7E]{1,255}")


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.meta is not None and case.meta.generation.mode.is_negative:
        return
    headers = case.headers or {}
    for name, value in headers.items():
        if name.lower() == "idempotency-key" and isinstance(value, str) and VALID_KEY.fullmatch(value):
            headers[name] = str(uuid.uuid4())
