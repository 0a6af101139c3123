//! Listing commands' paging: every page of a list call up to a limit, printed as a table or
//! `--json`.

use serde_json::json;
use syft_ledger::client::LedgerClient;
use syft_proto::ledger as pb;

use super::client::Conn;
use super::tables::{fetch_pages, more_hint};

/// A list call of the ledger API, paged by `page_size` and `page_token`.
pub(super) trait Paged: Clone {
    type Item;
    /// The key of the rows in `--json` output, and their name in messages.
    const NAME: &'static str;
    fn page(self, page_size: u32, page_token: String) -> Self;
    async fn fetch(
        self,
        client: &mut LedgerClient,
    ) -> Result<(Vec<Self::Item>, String), tonic::Status>;
}

macro_rules! paged {
    ($request:ty, $call:ident, $rows:ident: $item:ty) => {
        impl Paged for $request {
            type Item = $item;
            const NAME: &'static str = stringify!($rows);
            // Some requests have no fields but the page ones.
            #[allow(clippy::needless_update)]
            fn page(self, page_size: u32, page_token: String) -> Self {
                Self {
                    page_size,
                    page_token,
                    ..self
                }
            }
            async fn fetch(
                self,
                client: &mut LedgerClient,
            ) -> Result<(Vec<$item>, String), tonic::Status> {
                let page = client.$call(self).await?.into_inner();
                Ok((page.$rows, page.next_page_token))
            }
        }
    };
}

paged!(pb::ListAccountsRequest, list_accounts, accounts: pb::Account);
paged!(pb::ListTokensRequest, list_tokens, tokens: pb::Token);
paged!(pb::ListTransfersRequest, list_transfers, transfers: pb::Transfer);
paged!(pb::ListRefundsRequest, list_refunds, refunds: pb::Refund);

/// Every row of `request` up to `limit` (`None`: all), page by page.
pub(super) async fn list_all<R: Paged>(
    conn: &Conn,
    client: &LedgerClient,
    request: R,
    limit: Option<u32>,
) -> anyhow::Result<(Vec<R::Item>, String)> {
    fetch_pages(limit, R::NAME, |page_size, page_token| {
        let mut client = client.clone();
        let request = request.clone().page(page_size, page_token);
        async move { request.fetch(&mut client).await.map_err(|s| conn.fail(s)) }
    })
    .await
}

/// Rows as `{"<name>": [...], "next_page_token": ...}` with `--json`, else as a table.
pub(super) fn print_list<T>(
    conn: &Conn,
    name: &str,
    rows: &[T],
    next: &str,
    to_json: fn(&T) -> serde_json::Value,
    table: fn(&[T]),
) {
    if conn.json {
        let rows: Vec<_> = rows.iter().map(to_json).collect();
        println!("{}", json!({name: rows, "next_page_token": next}));
    } else {
        table(rows);
        more_hint(next, name);
    }
}
