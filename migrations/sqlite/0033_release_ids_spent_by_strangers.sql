-- Refusals of a token that did not prove its sender (unknown, another sender's, issued to another
-- recipient: reason TOKEN_INVALID) were recorded under the key of the sender the request only
-- named, so anyone who knew a user's email could spend that user's request ids for good
-- (crates/ledger/src/store/authorize.rs, 2026-12-06). Such refusals are no longer recorded, and
-- those recorded before are released here. A refusal moved no money: a released id is evaluated
-- afresh when it comes again, and charged at most once as any other.
DELETE FROM authorize_failures WHERE error_kind = 'TOKEN_INVALID';
