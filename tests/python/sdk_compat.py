"""Drives a self-hosted ledger's accounting REST API with the published syft-accounting-sdk 0.1.1,
unchanged. Usage: sdk_compat.py BASE_URL ADMIN_KEY. Exits non-zero on the first mismatch."""

import sys
import uuid
from decimal import Decimal

from syft_accounting_sdk import AdminClient, ServiceException, Transaction, User, UserClient

url, admin_key = sys.argv[1], sys.argv[2]
run = uuid.uuid4().hex[:8]
alice_email = f"alice-{run}@example.com"
owner_email = f"owner-{run}@router.example"


def check(condition, message):
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def expect_error(status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ServiceException as e:
        check(e.status_code == status, f"expected HTTP {status}, got {e.status_code}: {e.body}")
        check(isinstance(e.body, dict) and e.body.get("detail"), f"error body is not JSON with detail: {e.body}")
        return e
    raise SystemExit(f"FAILED: expected HTTP {status}, the call succeeded")


admin = AdminClient(url=url, key=admin_key)

# Users: one with a chosen password (admin), one with a generated password (anonymous, as the SDK does).
alice_user, alice_pw = admin.create_user(email=alice_email, organization="acme", password="alice-password-1")
check(isinstance(alice_user, User) and alice_user.balance == 0, f"new user {alice_user!r}")
owner_user, owner_pw = UserClient.create_user(url=url, email=owner_email, organization="router inc")
check(len(owner_pw) >= 16, "generated password")
expect_error(409, admin.create_user, email=alice_email, organization="acme")

funded = admin.add_balance(email=alice_email, amount=10.5)
check(funded.balance == 10.5, f"balance after deposit: {funded.balance}")
check(admin.get_user(email=alice_email).organization == "acme", "get_user")
emails = {u.email for u in admin.get_all_users()}
check({alice_email, owner_email} <= emails, f"get_all_users: {emails}")
check(alice_email in admin.get_all_users(format="dict"), "get_all_users(dict)")
expect_error(404, admin.get_user, email=f"nobody-{run}@example.com")
expect_error(401, AdminClient(url=url, key="wrong-key").get_all_users)

alice = UserClient(url, alice_email, "alice-password-1")
owner = UserClient(url, owner_email, owner_pw)
check(alice.get_user_info().balance == 10.5, "my-info")
expect_error(401, UserClient(url, alice_email, "wrong-password").get_user_info)
# A user's password is not an admin key.
expect_error(403, AdminClient(url=url, key="alice-password-1").get_all_users)

# Delegated transfer: Alice issues a token, the owner charges it and confirms.
token = alice.create_transaction_token(recipientEmail=owner_email)
tx = owner.create_delegated_transaction(senderEmail=alice_email, amount=0.25, token=token, appName="chat", appEpPath="/chat")
check(isinstance(tx, Transaction) and tx.status.value == "PENDING" and tx.createdBy.value == "RECIPIENT", f"created {tx!r}")
check(alice.get_user_info().balance == 10.25, "held amount is not spendable")
done = owner.confirm_transaction(id=tx.id)
check(done.status.value == "COMPLETED" and done.resolvedBy.value == "RECIPIENT", f"confirmed {done!r}")
check(done.resolvedAt is not None and done.amount == 0.25, "resolved time and amount")

# The context manager: confirmed inside, cancelled when left without confirming.
with owner.delegated_transfer(alice_email, amount=0.5, token=token, app_name="chat", app_ep_path="/chat") as ctx:
    ctx.confirm()
with owner.delegated_transfer(alice_email, amount=2, token=token) as ctx:
    pending_id = ctx.transaction.id
check(alice.get_user_info().balance == 9.75, f"after context managers: {alice.get_user_info().balance}")

# Cancel, and the two-phase rules.
tx = owner.create_delegated_transaction(senderEmail=alice_email, amount=1, token=token)
expect_error(403, alice.cancel_transaction, id=tx.id)
expect_error(403, alice.confirm_transaction, id=tx.id)
cancelled = owner.cancel_transaction(id=tx.id)
check(cancelled.status.value == "CANCELLED", f"cancelled {cancelled!r}")
expect_error(409, owner.confirm_transaction, id=tx.id)
expect_error(404, owner.confirm_transaction, id="no-such-transaction")

# Direct transfer by the sender, with the context manager.
with alice.transfer(owner_email, 0.75) as ctx:
    ctx.confirm()
check(ctx.transaction.createdBy.value == "SENDER" and ctx.transaction.resolvedBy.value == "SENDER", "direct transfer")

# Bad input: exact amounts only, funds checked, tokens bound to sender and recipient.
expect_error(400, owner.create_delegated_transaction, senderEmail=alice_email, amount=0.0000001, token=token)
expect_error(409, owner.create_delegated_transaction, senderEmail=alice_email, amount=1000, token=token)
expect_error(403, owner.create_delegated_transaction, senderEmail=alice_email, amount=1, token="bogus")
expect_error(403, alice.create_delegated_transaction, senderEmail=owner_email, amount=1, token=token)
try:
    owner.create_delegated_transaction(senderEmail=alice_email, amount=-1, token=token)
    raise SystemExit("FAILED: negative amount accepted")
except ValueError:
    pass  # the SDK refuses it before sending

# History: both parties see the same transactions, newest first.
history = alice.get_transaction_history()
owner_history = owner.get_transaction_history()
check({t.id for t in history} == {t.id for t in owner_history}, "history differs between parties")
statuses = sorted(t.status.value for t in history)
check(statuses == ["CANCELLED", "CANCELLED", "COMPLETED", "COMPLETED", "COMPLETED"], f"history statuses {statuses}")
check(pending_id in {t.id for t in history if t.status.value == "CANCELLED"}, "context manager cancelled its hold")

# Balances moved by exactly the confirmed amounts: 0.25 + 0.5 + 0.75.
alice_final = Decimal(str(alice.get_user_info().balance))
owner_final = Decimal(str(owner.get_user_info().balance))
check(alice_final == Decimal("9") and owner_final == Decimal("1.5"), f"final balances {alice_final} {owner_final}")

# Account updates.
check(owner.update_organization(organization="renamed").organization == "renamed", "update_organization")
owner.update_password(old_password=owner_pw, new_password="owner-password-2")
check(UserClient(url, owner_email, "owner-password-2").get_user_info().email == owner_email, "new password works")
expect_error(401, owner.get_user_info)

# The ledger creates only accounts whose email the SDK can read back: it refuses exactly what the
# SDK's validator (pydantic EmailStr, i.e. email-validator) refuses, saying why.
from pydantic import EmailStr, TypeAdapter, ValidationError

email_type = TypeAdapter(EmailStr)
candidates = [
    f"ok-{run}@example.com", f"ok-{run}@router.example", f"o+{run}@mail.example.org", f"x-{run}@a-b.co",
    f"owner-{run}@router.local", f"a-{run}@localhost", f"a-{run}@b.localhost", f"a-{run}@foo.test",
    f"a-{run}@x.invalid", f"a-{run}@abc.onion", f"a-{run}@1.in-addr.arpa", f"a-{run}@example.123",
    f"a-{run}@example", f".a-{run}@example.com", f"a-{run}.@example.com", f"a..{run}@example.com",
    f"a-{run}@-x.example.com", f"a-{run}@x_y.example.com", f"a-{run}@ab--cd.example.com",
    f"{'x' * 60}-{run}@example.com",
    # Not valid Punycode, or a local part starting with a combining mark: the SDK refuses them.
    f"y-{run}@xn--zz.com", f"z-{run}@example.xn--zz", f"\u0345w-{run}@example.com",
]
for candidate in candidates:
    try:
        email_type.validate_python(candidate)
        sdk_accepts = True
    except ValidationError:
        sdk_accepts = False
    try:
        admin.create_user(email=candidate, organization="emails")
        ledger_accepts = True
    except ServiceException as e:
        check(e.status_code == 400, f"{candidate}: HTTP {e.status_code} {e.body}")
        check("syft-accounting-sdk" in e.body["detail"], f"{candidate}: the refusal says why: {e.body}")
        ledger_accepts = False
    check(sdk_accepts == ledger_accepts, f"{candidate}: SDK accepts {sdk_accepts}, ledger accepts {ledger_accepts}")

# Stricter than the SDK: a domain outside ASCII is refused. The SDK maps it through IDNA, so
# `bob@ｅxample.com` (a fullwidth "ｅ") reads back as `bob@example.com`, another account's email.
lookalike = f"bob-{run}@\uff45xample.com"
check(email_type.validate_python(lookalike) == f"bob-{run}@example.com", "the SDK maps the domain")
# So is an `xn--` label, which the SDK reads back in Unicode (an older account's, maybe).
idn = f"bob-{run}@xn--bcher-kva.example"
check(email_type.validate_python(idn) == f"bob-{run}@b\u00fccher.example", "the SDK decodes xn--")
for candidate in [lookalike, f"a-{run}@b\u00fccher.example", idn]:
    try:
        admin.create_user(email=candidate, organization="emails")
        check(False, f"{candidate}: accepted")
    except ServiceException as e:
        detail = e.body["detail"]
        check(e.status_code == 400 and ("ASCII" in detail or "xn--" in detail), f"{candidate}: {e.body}")

print("syft-accounting-sdk 0.1.1 compatibility: ok")
