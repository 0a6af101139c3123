//! `refund` and `refunds`: give back what a transfer captured (its recipient, or the admin), and
//! list what was given back (docs/ledger.md, "Refunds").

use clap::Args;
use serde_json::json;
use syft_ledger::money::{format_micros, parse_decimal_micros};
use syft_proto::ledger as pb;

use super::client::{Conn, OrFail};
use super::paging::list_all;

#[derive(Args, Debug)]
pub struct RefundArgs {
    #[command(flatten)]
    conn: Conn,
    /// The transfer to refund (its id, from `transfers`).
    transfer_id: String,
    /// Decimal amount in the transfer's currency, or `all` for what is left to refund.
    amount: String,
    /// Why, for the record (the sender sees it in `refunds`).
    #[arg(long, default_value = "")]
    reason: String,
    /// Names this refund: the same key again is the same refund. By default one made of the
    /// amount (for `all`, of what was refunded before), so running the same command twice
    /// refunds once; give a key to make a second refund of the same amount.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Args, Debug)]
pub struct RefundsArgs {
    #[command(flatten)]
    conn: Conn,
    /// The transfer whose refunds to list; without one, your refunds (paid to you or by you;
    /// the admin's: everyone's), newest first.
    transfer_id: Option<String>,
    /// Most refunds to print (pages of up to 500 are fetched as needed).
    #[arg(long, default_value_t = 100, conflicts_with = "all",
          value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Every refund, however many.
    #[arg(long)]
    all: bool,
}

pub async fn refund(args: RefundArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    let mut client = conn.user()?;
    // A default key names the command's intent, so that running it again refunds once: an
    // amount by that amount (a second equal refund needs --idempotency-key; the same amount
    // with a corrected reason is refused as a conflict, not made twice), `all` by what was
    // refunded before it (named by the amount it comes to, a half then "the rest" of the same
    // size sent the half's key and refunded nothing: an auditor, 2026-12-07).
    let (amount_micros, intent) = if args.amount == "all" {
        let transfer = client
            .get_transfer(pb::GetTransferRequest {
                transfer_id: args.transfer_id.clone(),
            })
            .await
            .or_fail(conn)?;
        anyhow::ensure!(
            transfer.status() == pb::TransferStatus::Completed,
            "transfer {} is {}: only a captured transfer can be refunded",
            args.transfer_id,
            super::tables::status_word(transfer.status())
        );
        let listed = client
            .list_refunds(pb::ListRefundsRequest {
                transfer_id: args.transfer_id.clone(),
                ..Default::default()
            })
            .await
            .or_fail(conn)?;
        let left = transfer.captured_micros - listed.refunded_micros;
        if left <= 0 {
            println!(
                "nothing left to refund: transfer {} captured {} and {} is refunded",
                args.transfer_id,
                format_micros(transfer.captured_micros),
                format_micros(listed.refunded_micros)
            );
            return Ok(());
        }
        (left, format!("all after {}", listed.refunded_micros))
    } else {
        let micros = parse_decimal_micros(&args.amount)?;
        anyhow::ensure!(
            micros > 0,
            "the amount must be above 0 (got {})",
            args.amount
        );
        (micros, format!("amount {micros}"))
    };
    let key = args.idempotency_key.clone().unwrap_or_else(|| {
        let digest = syft_ledger::store::sha256_hex(&intent);
        format!("cli-{}", &digest[..32])
    });
    let done = client
        .refund(pb::RefundRequest {
            transfer_id: args.transfer_id.clone(),
            amount_micros,
            reason: args.reason.clone(),
            idempotency_key: key,
        })
        .await
        .or_fail(conn)?;
    let (refund, transfer) = (
        done.refund.clone().unwrap_or_default(),
        done.transfer.clone().unwrap_or_default(),
    );
    if args.amount == "all" && done.refunded_micros < transfer.captured_micros {
        anyhow::bail!(
            "transfer {} captured {} but {} is refunded: run the command again",
            transfer.id,
            format_micros(transfer.captured_micros),
            format_micros(done.refunded_micros)
        );
    }
    if conn.json {
        println!(
            "{}",
            json!({
                "refund": refund_json(&refund),
                "existing": done.existing,
                "transfer_id": transfer.id,
                "sender_email": transfer.sender_email,
                "recipient_email": transfer.recipient_email,
                "currency": transfer.currency,
                "captured_micros": transfer.captured_micros,
                "refunded_micros": done.refunded_micros,
            })
        );
    } else {
        println!(
            "{} {} {} of transfer {} to {} ({} captured, {} refunded in all; refund {})",
            if done.existing {
                "already refunded (nothing moved now; --idempotency-key makes another):"
            } else {
                "refunded"
            },
            format_micros(refund.amount_micros),
            transfer.currency,
            transfer.id,
            transfer.sender_email,
            format_micros(transfer.captured_micros),
            format_micros(done.refunded_micros),
            refund.id
        );
    }
    Ok(())
}

pub async fn refunds(args: RefundsArgs) -> anyhow::Result<()> {
    let conn = &args.conn;
    let request = pb::ListRefundsRequest {
        transfer_id: args.transfer_id.clone().unwrap_or_default(),
        ..Default::default()
    };
    let client = conn.user()?;
    let (refunds, next) =
        list_all(conn, &client, request, (!args.all).then_some(args.limit)).await?;
    // Per currency: an admin's refunds may be of accounts in several, and money of two
    // currencies is never summed (0.30 USD and 0.50 EUR were "0.80 refunded").
    let mut totals = std::collections::BTreeMap::<&str, i64>::new();
    for r in &refunds {
        *totals.entry(r.currency.as_str()).or_default() += r.amount_micros;
    }
    if conn.json {
        let rows: Vec<_> = refunds.iter().map(refund_json).collect();
        // `refunded_micros` when the refunds share a currency (or there are none), as before.
        let total = match totals.len() {
            0 => Some(0),
            1 => totals.values().next().copied(),
            _ => None,
        };
        println!(
            "{}",
            json!({"refunds": rows, "refunded_micros": total, "refunded_by_currency": totals,
                   "next_page_token": next})
        );
        return Ok(());
    }
    use super::tables::{Col, Table};
    let table = Table {
        cols: &[
            Col::Left("created (UTC)", 19),
            Col::Left("transfer", 36),
            Col::Right("amount", 10),
            Col::Left("currency", 8),
            Col::Left("to (sender)", 24),
            Col::Left("by", 5),
            Col::Left("reason", 0),
        ],
        gap: "  ",
    };
    table.header();
    for r in &refunds {
        table.row(&[
            &super::time::format_time(r.created_at_unix_micros),
            &r.transfer_id,
            &format_micros(r.amount_micros),
            &r.currency,
            &r.sender_email,
            &if r.by_admin { "admin" } else { "owner" },
            &r.reason,
        ]);
    }
    // One currency (the table's column says which): the amount alone, as before.
    let refunded = match totals.len() {
        0 | 1 => format_micros(totals.values().sum()),
        _ => totals
            .iter()
            .map(|(currency, micros)| format!("{} {currency}", format_micros(*micros)))
            .collect::<Vec<_>>()
            .join(" + "),
    };
    println!("total: {} refunds, {refunded} refunded", refunds.len());
    super::tables::more_hint(&next, "refunds");
    Ok(())
}

fn refund_json(r: &pb::Refund) -> serde_json::Value {
    json!({
        "id": r.id,
        "transfer_id": r.transfer_id,
        "amount_micros": r.amount_micros,
        "reason": r.reason,
        "by_admin": r.by_admin,
        "idempotency_key": r.idempotency_key,
        "created_at_unix_micros": r.created_at_unix_micros,
        "sender_email": r.sender_email,
        "recipient_email": r.recipient_email,
        "currency": r.currency,
    })
}
