"""Verifies webhooks the ledger sent with the `standardwebhooks` package (the Standard Webhooks
reference library), independently of the ledger's own code.

Usage: verify_webhook.py CAPTURED.json, where CAPTURED.json is a list of
{"secret": "whsec_...", "headers": {...}, "body": "..."}; an entry with "expect": "invalid" must
be refused. Prints "webhooks: ok" when every entry verifies as expected.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        captured = json.load(f)
    for i, entry in enumerate(captured):
        hook = Webhook(entry["secret"])
        expect_valid = entry.get("expect", "valid") == "valid"
        try:
            payload = hook.verify(entry["body"], entry["headers"])
            ok = expect_valid and payload == json.loads(entry["body"])
        except WebhookVerificationError as e:
            ok = not expect_valid
            print(f"entry {i}: refused ({e})")
        if not ok:
            sys.exit(f"entry {i}: unexpected verification result (expected {entry.get('expect', 'valid')})")
    print(f"webhooks: ok ({len(captured)} checked)")


if __name__ == "__main__":
    main()
