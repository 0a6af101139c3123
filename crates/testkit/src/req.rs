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
