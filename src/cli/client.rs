//! Client commands for people: readable tables by default, `--json` for scripts.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use syft_ledger::client::{connect_lazy_tls, LedgerClient};
use syft_ledger::money::{format_micros, parse_decimal_micros};
use syft_proto::ledger as pb;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Ledger gRPC URL.
    #[arg(
        long,
        env = "SYFT_LEDGER_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub ledger_url: String,
    /// Your account secret (Bearer).
    #[arg(long, env = "SYFT_SECRET", hide_env_values = true, global = true)]
    pub secret: Option<String>,
    /// The ledger admin key, for admin commands.
    #[arg(
        long,
        env = "SYFT_LEDGER_ADMIN_KEY",
        hide_env_values = true,
        global = true
    )]
    pub admin_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// PEM CA to trust for an https:// ledger URL.
    #[arg(long, env = "SYFT_LEDGER_CA", global = true)]
    pub ledger_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for a ledger that requires mutual TLS.
    #[arg(long, env = "SYFT_LEDGER_CLIENT_CERT", global = true)]
    pub ledger_client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --ledger-client-cert.
    #[arg(long, env = "SYFT_LEDGER_CLIENT_KEY", global = true)]
    pub ledger_client_key: Option<std::path::PathBuf>,
}

impl Conn {
    fn admin(&self) -> anyhow::Result<LedgerClient> {
        let key = self
            .admin_key
            .as_deref()
            .context("this command needs --admin-key or SYFT_LEDGER_ADMIN_KEY")?;
        self.connect(key)
    }

    fn connect(&self, secret: &str) -> anyhow::Result<LedgerClient> {
        let tls = super::client_tls(
            self.ledger_ca.as_ref(),
            self.ledger_client_cert.as_ref(),
            self.ledger_client_key.as_ref(),
        )?;
        Ok(connect_lazy_tls(&self.ledger_url, secret, tls.as_ref())?)
    }

    /// Your own credentials, or the admin key when no secret is given.
    fn user(&self) -> anyhow::Result<LedgerClient> {
        let secret = self
            .secret
            .as_deref()
            .or(self.admin_key.as_deref())
            .context("this command needs --secret (SYFT_SECRET) or --admin-key")?;
        self.connect(secret)
    }
}

#[derive(Args, Debug)]
pub struct AccountArgs {
    #[command(subcommand)]
    action: AccountAction,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand, Debug)]
enum AccountAction {
    /// Create an account (admin). Prints its secret once.
    Create {
        email: String,
        #[arg(long, default_value = "")]
        organization: String,
        /// Use this secret instead of a generated one (8 to 256 characters), e.g. for a
        /// deployment that provisions the router owner's secret itself.
        #[arg(long, env = "SYFT_ACCOUNT_SECRET", hide_env_values = true)]
        account_secret: Option<String>,
        /// Succeed without changes when the account already exists (idempotent setup jobs).
        #[arg(long)]
        exists_ok: bool,
    },
    /// Show an account's balance.
    Show { email: String },
    /// Deposit money into an account (admin), e.g. `deposit alice@example.com 10.00`.
    Deposit {
        email: String,
        /// Decimal amount in the account's currency.
        amount: String,
        /// Makes a retried deposit safe; generated when absent.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    action: TokenAction,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Issue a delegation token that lets RECIPIENT charge you.
    Issue {
        recipient: String,
        /// Spend limit, decimal (captured plus held).
        #[arg(long)]
        limit: Option<String>,
        /// Lifetime, e.g. 24h.
        #[arg(long, value_parser = super::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Revoke a token (by its text or id).
    Revoke { token: String },
}

#[derive(Args, Debug)]
pub struct TransfersArgs {
    #[command(flatten)]
    conn: Conn,
    /// pending, completed or cancelled.
    #[arg(long)]
    status: Option<String>,
    /// sender or recipient.
    #[arg(long)]
    role: Option<String>,
    #[arg(long)]
    app: Option<String>,
    /// Admin: another account's transfers.
    #[arg(long)]
    account: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    app: Option<String>,
    #[arg(long)]
    status: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub async fn account(args: AccountArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    let account = match args.action {
        AccountAction::Create {
            email,
            organization,
            account_secret,
            exists_ok,
        } => {
            let created = conn
                .admin()?
                .create_account(pb::CreateAccountRequest {
                    email: email.clone(),
                    organization,
                    secret: account_secret,
                    ..Default::default()
                })
                .await;
            let created = match created {
                Err(s) if exists_ok && s.code() == tonic::Code::AlreadyExists => {
                    if conn.json {
                        println!("{}", json!({"email": email, "existed": true}));
                    } else {
                        println!("account {email} already exists; nothing to do");
                    }
                    return Ok(());
                }
                other => other?.into_inner(),
            };
            let account = created.account.unwrap_or_default();
            if conn.json {
                println!(
                    "{}",
                    json!({"account": account_json(&account), "secret": created.secret})
                );
            } else {
                print_account(&account);
                println!(
                    "secret        {}   (shown once: store it now)",
                    created.secret
                );
            }
            return Ok(());
        }
        AccountAction::Show { email } => conn
            .user()?
            .get_account(pb::GetAccountRequest { email })
            .await?
            .into_inner(),
        AccountAction::Deposit {
            email,
            amount,
            idempotency_key,
        } => {
            let amount_micros = parse_decimal_micros(&amount)?;
            let key = idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            conn.admin()?
                .deposit(pb::DepositRequest {
                    email,
                    amount_micros,
                    idempotency_key: key,
                })
                .await?
                .into_inner()
        }
    };
    if conn.json {
        println!("{}", account_json(&account));
    } else {
        print_account(&account);
    }
    Ok(())
}

pub async fn token(args: TokenArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    match args.action {
        TokenAction::Issue {
            recipient,
            limit,
            ttl,
        } => {
            let spend_limit_micros = limit.as_deref().map(parse_decimal_micros).transpose()?;
            let expires_at_unix_micros =
                ttl.map(|d| syft_ledger::store::now_micros() + d.as_micros() as i64);
            let issued = conn
                .user()?
                .issue_token(pb::IssueTokenRequest {
                    recipient_email: recipient,
                    expires_at_unix_micros,
                    spend_limit_micros,
                })
                .await?
                .into_inner();
            if conn.json {
                println!(
                    "{}",
                    json!({"token": issued.token, "token_id": issued.token_id, "sender": issued.sender_email,
                           "recipient": issued.recipient_email, "expires_at_unix_micros": issued.expires_at_unix_micros,
                           "spend_limit_micros": issued.spend_limit_micros})
                );
            } else {
                println!("token      {}", issued.token);
                println!("id         {}", issued.token_id);
                println!("sender     {}", issued.sender_email);
                println!("recipient  {}", issued.recipient_email);
            }
        }
        TokenAction::Revoke { token } => {
            let revoked = conn
                .user()?
                .revoke_token(pb::RevokeTokenRequest { token })
                .await?
                .into_inner();
            if conn.json {
                println!(
                    "{}",
                    json!({"token_id": revoked.token_id, "revoked_at_unix_micros": revoked.revoked_at_unix_micros})
                );
            } else {
                println!("revoked {}", revoked.token_id);
            }
        }
    }
    Ok(())
}

pub async fn transfers(args: TransfersArgs) -> anyhow::Result<()> {
    let status = match args
        .status
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => pb::TransferStatus::Unspecified,
        Some("pending") => pb::TransferStatus::Pending,
        Some("completed") => pb::TransferStatus::Completed,
        Some("cancelled") => pb::TransferStatus::Cancelled,
        Some(other) => {
            anyhow::bail!("unknown status {other:?}: use pending, completed or cancelled")
        }
    };
    let role = match args.role.as_deref() {
        None => pb::Role::Any,
        Some("sender") => pb::Role::Sender,
        Some("recipient") => pb::Role::Recipient,
        Some(other) => anyhow::bail!("unknown role {other:?}: use sender or recipient"),
    };
    let page = args
        .conn
        .user()?
        .list_transfers(pb::ListTransfersRequest {
            status: status as i32,
            role: role as i32,
            app_name: args.app.unwrap_or_default(),
            account_email: args.account.unwrap_or_default(),
            page_size: args.limit,
            ..Default::default()
        })
        .await?
        .into_inner();
    if args.conn.json {
        let rows: Vec<_> = page.transfers.iter().map(transfer_json).collect();
        println!(
            "{}",
            json!({"transfers": rows, "next_page_token": page.next_page_token})
        );
        return Ok(());
    }
    println!(
        "{:<36}  {:<9}  {:>10}  {:>10}  {:<24}  {:<24}  app",
        "id", "status", "held", "captured", "sender", "recipient"
    );
    for t in &page.transfers {
        println!(
            "{:<36}  {:<9}  {:>10}  {:>10}  {:<24}  {:<24}  {}",
            t.id,
            status_word(t.status()),
            format_micros(t.amount_micros),
            format_micros(t.captured_micros),
            t.sender_email,
            t.recipient_email,
            t.app_name
        );
    }
    Ok(())
}

pub async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let page = args
        .conn
        .user()?
        .query_usage(pb::QueryUsageRequest {
            user_email: args.user.unwrap_or_default(),
            app_name: args.app.unwrap_or_default(),
            status: args.status.unwrap_or_default(),
            page_size: args.limit,
            ..Default::default()
        })
        .await?
        .into_inner();
    let totals = page.totals.unwrap_or_default();
    if args.conn.json {
        let rows: Vec<_> = page.records.iter().map(usage_json).collect();
        println!(
            "{}",
            json!({"records": rows, "next_page_token": page.next_page_token,
                   "totals": {"requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
                              "completion_tokens": totals.completion_tokens, "total_tokens": totals.total_tokens,
                              "cost_micros": totals.cost_micros}})
        );
        return Ok(());
    }
    print_usage_table(&page.records);
    println!(
        "total: {} requests, {} tokens, cost {}",
        totals.requests,
        totals.total_tokens,
        format_micros(totals.cost_micros)
    );
    Ok(())
}

pub fn print_usage_table(records: &[pb::UsageRecord]) {
    println!(
        "{:<24}  {:<22}  {:<10}  {:<15}  {:>7}  {:>10}  {:>8}",
        "request", "user", "model", "status", "tokens", "cost", "latency"
    );
    for r in records {
        let u = r.usage.clone().unwrap_or_default();
        println!(
            "{:<24}  {:<22}  {:<10}  {:<15}  {:>7}  {:>10}  {:>6}ms",
            truncate(&u.request_id, 24),
            truncate(&u.user_email, 22),
            truncate(&u.model, 10),
            u.status,
            u.total_tokens,
            format_micros(r.cost_micros),
            u.latency_ms
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}

fn status_word(s: pb::TransferStatus) -> &'static str {
    match s {
        pb::TransferStatus::Pending => "pending",
        pb::TransferStatus::Completed => "completed",
        pb::TransferStatus::Cancelled => "cancelled",
        pb::TransferStatus::Unspecified => "?",
    }
}

pub fn print_account(a: &pb::Account) {
    println!("email         {}", a.email);
    println!("organization  {}", a.organization);
    println!(
        "balance       {} {}",
        format_micros(a.balance_micros),
        a.currency
    );
    println!(
        "held          {} {}",
        format_micros(a.held_micros),
        a.currency
    );
    println!(
        "available     {} {}",
        format_micros(a.available_micros),
        a.currency
    );
}

fn account_json(a: &pb::Account) -> serde_json::Value {
    json!({"email": a.email, "organization": a.organization, "currency": a.currency,
           "balance_micros": a.balance_micros, "held_micros": a.held_micros,
           "available_micros": a.available_micros})
}

fn transfer_json(t: &pb::Transfer) -> serde_json::Value {
    json!({"id": t.id, "status": status_word(t.status()), "sender": t.sender_email, "recipient": t.recipient_email,
           "amount_micros": t.amount_micros, "captured_micros": t.captured_micros, "currency": t.currency,
           "app_name": t.app_name, "app_ep_path": t.app_ep_path, "created_at_unix_micros": t.created_at_unix_micros,
           "resolved_at_unix_micros": t.resolved_at_unix_micros, "cancel_reason": t.cancel_reason})
}

fn usage_json(r: &pb::UsageRecord) -> serde_json::Value {
    let u = r.usage.clone().unwrap_or_default();
    json!({"id": r.id, "request_id": u.request_id, "transfer_id": r.transfer_id, "app_name": u.app_name,
           "endpoint": u.endpoint, "user_email": u.user_email, "model": u.model, "prompt_tokens": u.prompt_tokens,
           "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens, "cost_micros": r.cost_micros,
           "status": u.status, "latency_ms": u.latency_ms, "upstream_latency_ms": u.upstream_latency_ms})
}
