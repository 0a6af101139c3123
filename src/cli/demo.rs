//! `syft-router demo`: the `dev` stack on a throwaway database, a short paid scenario (searches
//! and a token-priced chat), the balances and usage rows, a check of what was charged, exit 0.

use clap::Args;
use syft_ledger::money::format_micros;
use syft_proto::ledger as lpb;
use syft_proto::router as rpb;
use syft_router_svc::{Pricing, RouterConfig, ServiceKind, ECHO_FAIL_TRIGGER};

use super::dev::{bundled_search, random_key, search_pricing, Running, DEV_USER};
use super::serve::bind;
use crate::setup::{create_account, issue_token, user_chat, verify_ledger};
use syft_ledger::client::connect_lazy;

#[derive(Args, Debug)]
pub struct DemoArgs {}

struct DemoRouter {
    name: &'static str,
    owner: &'static str,
    /// What it sells: search or chat.
    kind: ServiceKind,
    client: rpb::router_client::RouterClient<tonic::transport::Channel>,
    token: String,
}

pub async fn demo(_args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite://{}?mode=rwc", dir.path().join("demo.db").display());
    let admin_key = random_key();
    let mut running = Running::new();
    let (ledger_url, _, mut admin) = running
        .start_ledger("127.0.0.1:0", None, &database_url, &admin_key, None)
        .await?;

    println!("== syft-router demo: embedded ledger (SQLite), echo model, two priced routers\n");
    let alice_secret = create_account(&mut admin, DEV_USER, 1_000_000).await?;
    println!("alice@example.com is funded with 1 USD");
    let docs = dir.path().join("docs");
    super::index::write_bundled_docs(&docs)?;
    // The search router sells only search (over the bundled documents); the token router chat.
    let services: [(&str, &str, ServiceKind, Pricing); 2] = [
        (
            "search-router",
            "search-router@example.com",
            ServiceKind::Search,
            search_pricing(),
        ),
        (
            "token-router",
            "token-router@example.com",
            ServiceKind::Chat,
            Pricing {
                description: "$5 / $15 per million input / output tokens".into(),
                ..Pricing::per_token(5_000_000, 15_000_000)
            },
        ),
    ];
    let mut routers = Vec::new();
    for (name, owner, kind, pricing) in services {
        let owner_secret = create_account(&mut admin, owner, 0).await?;
        let token = issue_token(&mut connect_lazy(&ledger_url, &alice_secret)?, owner).await?;
        let mut config = match kind {
            ServiceKind::Chat => RouterConfig::new(name, owner).with_chat_pricing(pricing),
            ServiceKind::Search => {
                let mut c =
                    RouterConfig::new(name, owner).with_search(pricing, bundled_search(&docs, 30));
                c.services.retain(|s| s.kind == ServiceKind::Search);
                c
            }
        };
        config.ledger.url = ledger_url.clone();
        config.ledger.secret = owner_secret.into();
        let grpc = bind("127.0.0.1:0").await?;
        let http = bind("127.0.0.1:0").await?;
        let grpc_url = format!("http://{}", grpc.local_addr()?);
        running.start_router(config, grpc, http);
        let channel = tonic::transport::Endpoint::from_shared(grpc_url)?.connect_lazy();
        routers.push(DemoRouter {
            name,
            owner,
            kind,
            client: rpb::router_client::RouterClient::new(channel),
            token,
        });
        println!("{name}: owned by {owner}, alice issued it a delegation token");
    }
    println!();

    // (router, text, with a token): router 0 searches, router 1 chats.
    let requests: [(usize, &str, bool); 7] = [
        (0, "two-phase transfers hold capture void", true),
        (0, "delegation token spend limit", true),
        (0, "xylophone quartz", true),
        (0, "price per search query", true),
        (1, "Summarize the plot of Hamlet in two sentences.", true),
        (
            1,
            &format!("{ECHO_FAIL_TRIGGER} this upstream call fails"),
            true,
        ),
        (0, "no token: payment required", false),
    ];
    let mut expected_cost = 0;
    for (i, (router_index, text, with_token)) in requests.iter().enumerate() {
        let r = &mut routers[*router_index];
        let token = if *with_token {
            r.token.clone()
        } else {
            String::new()
        };
        match r.ask(text, token, i).await {
            Ok((cost, summary)) => {
                expected_cost += cost;
                println!(
                    "{:<14} charged {:>9} USD  {summary}",
                    r.name,
                    format_micros(cost)
                );
            }
            Err(status) => {
                // Refused before any work (payment, input), or failed while answering.
                let verdict = match status.code() {
                    tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated => "refused",
                    _ => "failed",
                };
                println!(
                    "{:<14} charged {:>9} USD  {verdict}: {}",
                    r.name,
                    "0",
                    super::errors::describe(&status, super::errors::Server::Router, r.name)
                )
            }
        }
    }

    let alice = admin
        .get_account(lpb::GetAccountRequest {
            email: DEV_USER.into(),
        })
        .await?
        .into_inner();
    println!("\nBalances");
    println!(
        "  {:<24} {:>10} USD (held {})",
        alice.email,
        format_micros(alice.balance_micros),
        format_micros(alice.held_micros)
    );
    for r in &routers {
        let owner = admin
            .get_account(lpb::GetAccountRequest {
                email: r.owner.into(),
            })
            .await?
            .into_inner();
        println!(
            "  {:<24} {:>10} USD",
            owner.email,
            format_micros(owner.balance_micros)
        );
    }
    let usage = admin
        .query_usage(lpb::QueryUsageRequest::default())
        .await?
        .into_inner();
    println!("\nUsage rows (one per request, failures included, nothing charged for them)");
    super::tables::print_usage_table(&usage.records);

    running.shutdown().await?;
    verify_ledger(&database_url).await?;
    anyhow::ensure!(
        alice.balance_micros == 1_000_000 - expected_cost && alice.held_micros == 0,
        "alice was charged {} but the answers cost {}",
        1_000_000 - alice.balance_micros,
        expected_cost
    );
    println!(
        "\nverify: ok — alice paid exactly {} USD for {} answered requests; the failed one and the empty search cost nothing",
        format_micros(expected_cost),
        usage.records.iter().filter(|r| r.usage.as_ref().is_some_and(|u| u.status == "success")).count()
    );
    Ok(())
}

impl DemoRouter {
    /// One demo request, a search or a chat by what the router sells: (cost, what it found or
    /// the start of the answer).
    async fn ask(
        &mut self,
        text: &str,
        token: String,
        i: usize,
    ) -> Result<(i64, String), tonic::Status> {
        let request_id = format!("demo-{i}");
        match self.kind {
            ServiceKind::Chat => {
                let resp = self
                    .client
                    .chat(rpb::ChatRequest {
                        transaction_token: token,
                        request_id,
                        ..user_chat(DEV_USER, "echo", text, 64)
                    })
                    .await?
                    .into_inner();
                let answer: String = resp
                    .message
                    .map(|m| m.content)
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect();
                Ok((resp.cost_micros, format!("\"{answer}\"")))
            }
            ServiceKind::Search => {
                let resp = self
                    .client
                    .search(rpb::SearchRequest {
                        user_email: DEV_USER.into(),
                        query: text.into(),
                        options: Some(rpb::SearchOptions {
                            limit: Some(3),
                            ..Default::default()
                        }),
                        transaction_token: token,
                        request_id,
                    })
                    .await?
                    .into_inner();
                let summary = match resp.results.first() {
                    None => format!("search \"{text}\": no results (the hold was voided)"),
                    Some(best) => format!(
                        "search \"{text}\": {} result{}, best {} (score {:.2})",
                        resp.results.len(),
                        if resp.results.len() == 1 { "" } else { "s" },
                        best.id,
                        best.score
                    ),
                };
                Ok((resp.cost_micros, summary))
            }
        }
    }
}
