"""Drives the accounting REST API of a running `syft-router dev` stack with the published
syft-accounting-sdk 0.1.1, using the accounts `dev` created (its credentials file), so the stack's
own defaults are known to work with the SDK: every call that parses an email (get_user,
get_all_users, the owner's get_user_info, transaction history) runs on the default owner and
user. Usage: sdk_dev_defaults.py BASE_URL CREDENTIALS_JSON. Exits non-zero on the first failure."""

import json
import sys

from syft_accounting_sdk import AdminClient, UserClient

url, creds_path = sys.argv[1], sys.argv[2]
with open(creds_path) as f:
    creds = json.load(f)
owner_email, user_email = creds["owner_email"], creds["user_email"]


def check(condition, message):
    if not condition:
        raise SystemExit(f"FAILED: {message}")


admin = AdminClient(url=url, key=creds["admin_key"])
check(admin.get_user(email=owner_email).email == owner_email, "admin.get_user(owner)")
check(admin.get_user(email=user_email).balance == 10, "admin.get_user(user)")
emails = {u.email for u in admin.get_all_users()}
check({owner_email, user_email} <= emails, f"get_all_users: {emails}")

owner = UserClient(url, owner_email, creds["owner_secret"])
user = UserClient(url, user_email, creds["user_secret"])
check(owner.get_user_info().email == owner_email, "owner.get_user_info")
check(user.get_user_info().email == user_email, "user.get_user_info")

# The token `dev` printed works over REST: a hold by the owner, then cancelled.
tx = owner.create_delegated_transaction(senderEmail=user_email, amount=0.01, token=creds["user_token"])
check(tx.recipientEmail == owner_email and tx.status.value == "PENDING", f"created {tx!r}")
check(owner.cancel_transaction(id=tx.id).status.value == "CANCELLED", "cancel")
check(tx.id in {t.id for t in owner.get_transaction_history()}, "owner's history")
check(tx.id in {t.id for t in user.get_transaction_history()}, "user's history")
print("syft-accounting-sdk on the dev defaults: ok")
