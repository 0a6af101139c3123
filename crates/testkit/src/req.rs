//! Builders for the ledger's gRPC requests that tests send again and again, so a test reads as
//! the call it makes (`admin.get_account(req::get_account(ALICE))`).

use syft_proto::ledger as pb;

/// Reads the account of `email`.
pub fn get_account(email: &str) -> pb::GetAccountRequest {
    pb::GetAccountRequest {
        email: email.into(),
    }
}

/// Creates an account for `email` with every other field left to the ledger.
pub fn create_account(email: &str) -> pb::CreateAccountRequest {
    pb::CreateAccountRequest {
        email: email.into(),
        ..Default::default()
    }
}

/// Reads the transfer `id`.
pub fn get_transfer(id: &str) -> pb::GetTransferRequest {
    pb::GetTransferRequest {
        transfer_id: id.into(),
    }
}

/// Reads the answer stored with transfer `id`'s capture.
pub fn get_answer(id: &str) -> pb::GetAnswerRequest {
    pb::GetAnswerRequest {
        transfer_id: id.into(),
    }
}

/// How many rows the kit asks for at once: more than any test writes.
const PAGE: u32 = 500;

/// The transfers `email` sent or received (as the admin asks: any account).
pub fn transfers_of(email: &str) -> pb::ListTransfersRequest {
    pb::ListTransfersRequest {
        account_email: email.into(),
        page_size: PAGE,
        ..Default::default()
    }
}

/// The usage rows of `email` (as the admin asks: any user).
pub fn usage_of(email: &str) -> pb::QueryUsageRequest {
    pb::QueryUsageRequest {
        user_email: email.into(),
        page_size: PAGE,
        ..Default::default()
    }
}

/// A usage row of `user`'s request `request_id` to `app`'s `/chat`, ending in `status`, with no
/// model, counts or latencies (set them with `..req::usage(…)`).
pub fn usage(request_id: &str, app: &str, user: &str, status: &str) -> pb::Usage {
    pb::Usage {
        request_id: request_id.into(),
        app_name: app.into(),
        endpoint: "/chat".into(),
        user_email: user.into(),
        status: status.into(),
        ..Default::default()
    }
}

/// Captures the whole hold of transfer `id`, without a usage row or a stored answer.
pub fn capture_full(id: &str) -> pb::CaptureRequest {
    pb::CaptureRequest {
        transfer_id: id.into(),
        amount: Some(pb::capture_request::Amount::Full(true)),
        usage: None,
        answer: None,
    }
}

/// A hold of `amount` from `sender` on `token` for the `chat-app` app's `/chat`, under `key`,
/// with the ledger's default TTL and no budget (override with `..req::hold(…)`).
pub fn hold(sender: &str, amount: i64, token: &str, key: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        sender_email: sender.into(),
        amount_micros: amount,
        token: token.into(),
        app_name: "chat-app".into(),
        app_ep_path: "/chat".into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Voids transfer `id` with no reason and no usage row.
pub fn void(id: &str) -> pb::VoidRequest {
    pb::VoidRequest {
        transfer_id: id.into(),
        ..Default::default()
    }
}
