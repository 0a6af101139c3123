//! Client commands for people: readable tables by default, `--json` for scripts.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use syft_ledger::client::{connect_lazy_tls, LedgerClient};
use syft_ledger::money::parse_decimal_micros;
use syft_proto::ledger as pb;

use super::errors::Server;
use super::paging::{list_all, print_list};
use super::tables::{account_json, print_account, print_accounts, print_tokens, token_json};

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

    /// The alerts service, with your secret (or the admin key when no secret is given).
    pub(super) fn alerts(&self) -> anyhow::Result<syft_ledger::client::AlertsClient> {
        let secret = self.user_secret()?;
        let tls = self.tls()?;
        Ok(syft_ledger::client::connect_alerts_lazy(
            &self.ledger_url,
            secret,
            tls.as_ref(),
        )?)
    }

    fn tls(&self) -> anyhow::Result<Option<syft_tls::ClientTls>> {
        super::client_tls(
            self.ledger_ca.as_ref(),
            self.ledger_client_cert.as_ref(),
            self.ledger_client_key.as_ref(),
        )
    }

    fn connect(&self, secret: &str) -> anyhow::Result<LedgerClient> {
        let tls = self.tls()?;
        Ok(connect_lazy_tls(&self.ledger_url, secret, tls.as_ref())?)
    }

    /// A failed ledger call, in the user's terms.
    pub(super) fn fail(&self, status: tonic::Status) -> anyhow::Error {
        super::errors::rpc(status, Server::Ledger, &self.ledger_url)
    }

    /// Your own credentials, or the admin key when no secret is given.
    pub(super) fn user(&self) -> anyhow::Result<LedgerClient> {
        self.connect(self.user_secret()?)
    }

    fn user_secret(&self) -> anyhow::Result<&str> {
        self.secret
            .as_deref()
            .or(self.admin_key.as_deref())
            .context("this command needs --secret (SYFT_SECRET) or --admin-key")
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
    /// Create an account (admin). Prints a generated secret once; a given one is never printed.
    Create {
        /// The account's email (its id on the ledger).
        email: String,
        /// Organization shown with the account.
        #[arg(long, default_value = "")]
        organization: String,
        /// Use this secret instead of a generated one (8 to 256 printable ASCII characters),
        /// e.g. for a deployment that provisions the router owner's secret itself.
        #[arg(long, env = "SYFT_ACCOUNT_SECRET", hide_env_values = true)]
        account_secret: Option<String>,
        /// Succeed without changes when the account already exists (idempotent setup jobs).
        #[arg(long)]
        exists_ok: bool,
    },
    /// Show an account's balance (your own, or any with the admin key).
    Show {
        /// The account's email.
        email: String,
    },
    /// List every account with its balance (admin).
    List {
        /// Most accounts to print (pages of up to 500 are fetched as needed).
        #[arg(long, default_value_t = 100, conflicts_with = "all",
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Every account, however many.
        #[arg(long)]
        all: bool,
    },
    /// Deposit money into an account (admin), e.g. `deposit alice@example.com 10.00`.
    Deposit {
        /// The account to credit.
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
        /// Who may charge you with it, e.g. a router's owner.
        recipient: String,
        /// Spend limit in your account's currency, decimal (captured plus held); default none.
        #[arg(long)]
        limit: Option<String>,
        /// At most this much (decimal, your currency) through the token in any 24 hours, so a
        /// leaked token can only lose so much per day; default none.
        #[arg(long)]
        limit_per_day: Option<String>,
        /// Lifetime, e.g. 90m, 24h; default: until revoked.
        #[arg(long, value_parser = super::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Revoke a token (by its text or id).
    Revoke {
        /// The token, or its id (from `token list`).
        token: String,
    },
    /// List your tokens, issued and received (admin: everyone's, or --account's).
    List {
        /// sender (tokens you issued) or recipient (tokens issued to you); default both.
        #[arg(long, value_parser = ["sender", "recipient"])]
        role: Option<String>,
        /// Admin: one account's tokens.
        #[arg(long)]
        account: Option<String>,
        /// Revoked and expired tokens too.
        #[arg(long)]
        inactive: bool,
        /// Most tokens to print (pages of up to 500 are fetched as needed).
        #[arg(long, default_value_t = 100, conflicts_with = "all",
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Every token, however many.
        #[arg(long)]
        all: bool,
    },
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
            // A secret the caller chose is theirs already: printing it would only put it in logs
            // (`docker compose logs`). A generated one is shown once, since nobody else knows it.
            let chosen = account_secret.is_some();
            let created = conn
                .admin()?
                .create_account(pb::CreateAccountRequest {
                    email: email.clone(),
                    organization,
                    secret: account_secret.clone(),
                    ..Default::default()
                })
                .await;
            let created = match created {
                Err(s) if exists_ok && s.code() == tonic::Code::AlreadyExists => {
                    if let Some(secret) = &account_secret {
                        opens_with(conn, &email, secret).await?;
                    }
                    if conn.json {
                        println!("{}", json!({"email": email, "existed": true}));
                    } else {
                        println!("account {email} already exists; nothing to do");
                    }
                    return Ok(());
                }
                other => other.map_err(|s| conn.fail(s))?.into_inner(),
            };
            let account = created.account.unwrap_or_default();
            if conn.json {
                let mut out = json!({"account": account_json(&account)});
                if !chosen {
                    out["secret"] = json!(created.secret);
                }
                println!("{out}");
            } else {
                print_account(&account);
                if chosen {
                    println!("secret        (the one you gave; not printed)");
                } else {
                    println!(
                        "secret        {}   (shown once: store it now)",
                        created.secret
                    );
                }
            }
            return Ok(());
        }
        AccountAction::Show { email } => conn
            .user()?
            .get_account(pb::GetAccountRequest { email })
            .await
            .or_fail(conn)?,
        AccountAction::List { limit, all } => {
            let client = conn.admin()?;
            let request = pb::ListAccountsRequest::default();
            let (accounts, next) =
                list_all(conn, &client, request, (!all).then_some(limit)).await?;
            print_list(
                conn,
                "accounts",
                &accounts,
                &next,
                account_json,
                print_accounts,
            );
            return Ok(());
        }
        AccountAction::Deposit {
            email,
            amount,
            idempotency_key,
        } => {
            let amount_micros = positive_amount("the amount", &amount)?;
            let generated = idempotency_key.is_none();
            let key = idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            conn.admin()?
                .deposit(pb::DepositRequest {
                    email,
                    amount_micros,
                    idempotency_key: key.clone(),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| {
                    // A deposit whose answer was lost may have been made: run again with a new
                    // key, it would be made twice. The generated key is the only safe retry.
                    let unknown = generated && outcome_unknown(&status);
                    let err = conn.fail(status);
                    if unknown {
                        anyhow::anyhow!(
                            "{err:#}; the deposit may have been made: to finish it without \
                             depositing twice, run the same command with --idempotency-key {key}"
                        )
                    } else {
                        err
                    }
                })?
        }
    };
    if conn.json {
        println!("{}", account_json(&account));
    } else {
        print_account(&account);
    }
    Ok(())
}

/// Whether a failed call may still have been carried out: its answer was lost or the server
/// failed after it began. A refusal (e.g. `INVALID_ARGUMENT`) made nothing, nor did a call
/// whose connection could not be made.
/// `--exists-ok` with a chosen secret: the existing account must open with it. A setup job run
/// again after its secret was changed said "nothing to do", and the router given the new secret
/// was refused by the ledger for good (README, "docker compose").
async fn opens_with(conn: &Conn, email: &str, secret: &str) -> anyhow::Result<()> {
    let request = pb::GetAccountRequest {
        email: email.into(),
    };
    match conn.connect(secret)?.get_account(request).await {
        Ok(a) if a.get_ref().email.eq_ignore_ascii_case(email) => Ok(()),
        // Refused, or the secret of another account (which may not read this one).
        Err(s)
            if !matches!(
                s.code(),
                tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::NotFound
            ) =>
        {
            Err(conn.fail(s))
        }
        _ => anyhow::bail!(
            "account {email} already exists and the secret given does not open it: give the \
             secret it has, or change it (README, \"docker compose\": changing the owner's secret)"
        ),
    }
}

fn outcome_unknown(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
    ) && !super::errors::never_sent(status)
}

/// An amount that must be above zero, refused here in the words the user typed (the ledger's
/// refusal names its gRPC field, `amount_micros`, and the micros).
fn positive_amount(what: &str, text: &str) -> anyhow::Result<i64> {
    let micros = parse_decimal_micros(text)?;
    anyhow::ensure!(micros > 0, "{what} must be above 0 (got {text})");
    Ok(micros)
}

pub async fn token(args: TokenArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    match args.action {
        TokenAction::Issue {
            recipient,
            limit,
            limit_per_day,
            ttl,
        } => {
            let spend_limit_micros = limit
                .as_deref()
                .map(|l| positive_amount("--limit", l))
                .transpose()?;
            let limit_per_day_micros = limit_per_day
                .as_deref()
                .map(|l| positive_amount("--limit-per-day", l))
                .transpose()?;
            // Checked: a huge --ttl wrapped into another expiry (the year 199906).
            let expires_at_unix_micros = ttl
                .map(|d| {
                    i64::try_from(d.as_micros())
                        .ok()
                        .and_then(|m| syft_ledger::store::now_micros().checked_add(m))
                        .context("--ttl is too long")
                })
                .transpose()?;
            let mut client = conn.user()?;
            let issued = client
                .issue_token(pb::IssueTokenRequest {
                    recipient_email: recipient,
                    expires_at_unix_micros,
                    spend_limit_micros,
                    limit_per_day_micros,
                })
                .await
                .or_fail(conn)?;
            if conn.json {
                println!(
                    "{}",
                    json!({"token": issued.token, "token_id": issued.token_id, "sender": issued.sender_email,
                           "recipient": issued.recipient_email, "expires_at_unix_micros": issued.expires_at_unix_micros,
                           "spend_limit_micros": issued.spend_limit_micros,
                           "limit_per_day_micros": issued.limit_per_day_micros})
                );
            } else {
                // The limit is in the sender's currency; best effort, the token is issued anyway.
                let currency = client
                    .get_account(pb::GetAccountRequest {
                        email: issued.sender_email.clone(),
                    })
                    .await
                    .map(|a| a.into_inner().currency)
                    .unwrap_or_default();
                super::tables::print_issued_token(&issued, &currency);
            }
        }
        TokenAction::Revoke { token } => {
            let revoked = conn
                .user()?
                .revoke_token(pb::RevokeTokenRequest { token })
                .await
                .or_fail(conn)?;
            if conn.json {
                println!(
                    "{}",
                    json!({"token_id": revoked.token_id, "revoked_at_unix_micros": revoked.revoked_at_unix_micros})
                );
            } else {
                println!("revoked {}", revoked.token_id);
            }
        }
        TokenAction::List {
            role,
            account,
            inactive,
            limit,
            all,
        } => {
            let role = match role.as_deref() {
                Some("sender") => pb::Role::Sender,
                Some("recipient") => pb::Role::Recipient,
                _ => pb::Role::Any,
            };
            let client = conn.user()?;
            let request = pb::ListTokensRequest {
                role: role as i32,
                account_email: account.unwrap_or_default(),
                include_inactive: inactive,
                ..Default::default()
            };
            let (tokens, next) = list_all(conn, &client, request, (!all).then_some(limit)).await?;
            print_list(conn, "tokens", &tokens, &next, token_json, print_tokens);
        }
    }
    Ok(())
}

/// A ledger answer, or its error in the user's terms.
pub(super) trait OrFail<T> {
    fn or_fail(self, conn: &Conn) -> anyhow::Result<T>;
}

impl<T> OrFail<T> for Result<tonic::Response<T>, tonic::Status> {
    fn or_fail(self, conn: &Conn) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|s| conn.fail(s))
    }
}
