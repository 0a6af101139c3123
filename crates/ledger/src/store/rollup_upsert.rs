//! Writing the usage rollups (`rollup.rs` has what they hold): the tables, and one upsert per
//! table and batch, on Postgres one statement text per table (prepared once per connection), on
//! SQLite multi-row upserts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::LazyLock;

use sqlx::AnyConnection;

use super::hll::REGISTERS;
use super::rollup::{
    Grain, RollupInput, Sums, HIST_BUCKETS, MEASURES, SUM_COLUMNS, USER_GRAINS, USER_SUM_COLUMNS,
};
use super::{is_postgres, UsageInput};

/// A rollup table the writers keep: its text key columns (after grain, bucket start and owner),
/// its sums, its grains, and whether it keeps the active-user sketch.
pub(crate) struct Table {
    pub name: &'static str,
    pub texts: &'static [&'static str],
    /// A usage row's values of [`Table::texts`], in order ("" past them).
    key: fn(&UsageInput) -> [&str; 4],
    pub sums: &'static [&'static str],
    pub grains: &'static [Grain],
    pub sketch: bool,
    /// [`postgres_upsert_sql`] of this table, built once.
    postgres: &'static LazyLock<String>,
}

/// Per owner, app, endpoint, model and status, without the user (migration 0015).
pub(crate) static USERLESS: Table = Table {
    name: "usage_rollups",
    texts: &["app_name", "endpoint", "model", "status"],
    key: |u| [&u.app_name, &u.endpoint, &u.model, &u.status],
    sums: &SUM_COLUMNS,
    grains: &Grain::ALL,
    sketch: true,
    postgres: &USERLESS_SQL,
};

/// Per owner, app and user, hours and days (migration 0015).
pub(crate) static PER_USER: Table = Table {
    name: "usage_user_rollups",
    texts: &["app_name", "user_email"],
    key: |u| [&u.app_name, &u.user_email, "", ""],
    sums: &USER_SUM_COLUMNS,
    grains: &USER_GRAINS,
    sketch: false,
    postgres: &PER_USER_SQL,
};

/// Per owner and app (migration 0020): what the charts, totals and per-app tables read.
pub(crate) static PER_APP: Table = Table {
    name: "usage_app_rollups",
    texts: &["app_name"],
    key: |u| [&u.app_name, "", "", ""],
    sums: &USER_SUM_COLUMNS,
    grains: &Grain::ALL,
    sketch: true,
    postgres: &PER_APP_SQL,
};

static USERLESS_SQL: LazyLock<String> = LazyLock::new(|| postgres_upsert_sql(&USERLESS));
static PER_USER_SQL: LazyLock<String> = LazyLock::new(|| postgres_upsert_sql(&PER_USER));
static PER_APP_SQL: LazyLock<String> = LazyLock::new(|| postgres_upsert_sql(&PER_APP));

/// Every rollup table, in the order writers upsert them (one global order: no deadlocks).
pub(crate) static TABLES: [&Table; 3] = [&USERLESS, &PER_USER, &PER_APP];

/// (grain, bucket start, recipient, text key columns in [`Table::texts`] order), borrowed.
type Key<'a> = (i16, i64, i64, [&'a str; 4]);

/// A column written by the upsert.
#[derive(Clone, Copy)]
enum Col {
    Sum(&'static str),
    /// Measure × bucket.
    Hist(usize, usize),
    Register(usize),
}

impl Col {
    fn name(self) -> String {
        match self {
            Col::Sum(n) => n.to_string(),
            Col::Hist(m, i) => format!("h_{}_{i:02}", MEASURES[m]),
            Col::Register(i) => format!("u_{i:03}"),
        }
    }

    fn value(self, s: &Sums) -> i64 {
        match self {
            Col::Sum(n) => s.sum(n),
            Col::Hist(m, i) => s.hist[m][i],
            Col::Register(i) => i64::from(s.registers[i]),
        }
    }
}

/// Adds the rows to the rollups, in the caller's transaction: every table of [`TABLES`] at each
/// of its grains (docs/analytics.md, "Rollups"). Writers call `rollup_fold::add_to_rollups`, which
/// queues the rows on Postgres; this is the folder's (and SQLite's, and the rebuild's) step.
///
/// Rows are aggregated per key first, so a batch costs one upserted row per distinct key and grain:
/// the user-less and per-app keys are few, the per-user ones one per user, owner and app.
pub(crate) async fn upsert_rollups(
    conn: &mut AnyConnection,
    rows: &[RollupInput<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    for table in TABLES {
        let mut agg: BTreeMap<Key<'_>, Sums> = BTreeMap::new();
        for r in rows {
            let texts = (table.key)(r.usage);
            for grain in table.grains {
                let start = r.created_at.div_euclid(grain.micros()) * grain.micros();
                agg.entry((*grain as i16, start, r.recipient_id, texts))
                    .or_insert_with(|| Sums::new(table.sketch))
                    .add(r);
            }
        }
        upsert_table(conn, table, &agg).await?;
    }
    Ok(())
}

async fn upsert_table(
    conn: &mut AnyConnection,
    table: &'static Table,
    agg: &BTreeMap<Key<'_>, Sums>,
) -> Result<(), sqlx::Error> {
    if is_postgres(conn) {
        return upsert_postgres(conn, table, agg).await;
    }
    // SQLite: the sums always; a histogram bucket or register only when some key of the batch
    // has it (the numbers are written inline, so the statement is new each time anyway).
    let mut cols: Vec<Col> = table.sums.iter().map(|&n| Col::Sum(n)).collect();
    for m in 0..MEASURES.len() {
        for i in 0..HIST_BUCKETS {
            if agg.values().any(|s| s.hist[m][i] != 0) {
                cols.push(Col::Hist(m, i));
            }
        }
    }
    if table.sketch {
        for i in 0..REGISTERS {
            if agg.values().any(|s| s.registers[i] != 0) {
                cols.push(Col::Register(i));
            }
        }
    }
    let texts = table.texts.join(", ");
    let mut head = format!(
        "INSERT INTO {} AS r (grain, bucket_start, recipient_id, {texts}",
        table.name
    );
    let mut set =
        format!(" ON CONFLICT (grain, bucket_start, recipient_id, {texts}) DO UPDATE SET ");
    for (n, c) in cols.iter().enumerate() {
        let c_name = c.name();
        let _ = write!(head, ", {c_name}");
        let sep = if n == 0 { "" } else { ", " };
        let _ = match c {
            // Registers merge by maximum; NULL is 0 (SQLite's MAX returns NULL with a NULL).
            Col::Register(_) => write!(
                set,
                "{sep}{c_name} = MAX(COALESCE(r.{c_name}, 0), excluded.{c_name})"
            ),
            _ => write!(
                set,
                "{sep}{c_name} = COALESCE(r.{c_name}, 0) + excluded.{c_name}"
            ),
        };
    }
    head.push(')');
    upsert_sqlite(conn, table, agg, &cols, &head, &set).await
}

/// The Postgres upsert of a table: the same text for every batch, so each connection prepares it
/// once. (Writing only the columns a batch touches, as before, made a new statement text for
/// nearly every batch, since each user's register and each latency bucket changed it: 4,584
/// texts in one benchmark run, each prepared anew and churning the statement cache. Measured, the
/// upsert's cost was its execution either way, which is why writers queue and a folder upserts:
/// `rollup_fold.rs`.)
///
/// Keys come as one JSON parameter (the `Any` driver binds no arrays), histograms and registers
/// as JSON arrays; a zero stays NULL in the table (`NULLIF`, and `COALESCE(a + b, a, b)` adds
/// two possibly-NULL counts), as migrations 0014 and 0015 store "none".
fn postgres_upsert_sql(table: &Table) -> String {
    let texts = table.texts.join(", ");
    let hist: Vec<(String, String)> = MEASURES
        .iter()
        .flat_map(|m| {
            (0..HIST_BUCKETS).map(move |i| {
                (
                    format!("h_{m}_{i:02}"),
                    format!("NULLIF(i.h_{m}[{}], 0)", i + 1),
                )
            })
        })
        .collect();
    let regs: Vec<(String, String)> = if table.sketch {
        (0..REGISTERS)
            .map(|i| {
                (
                    format!("u_{i:03}"),
                    format!("CAST(NULLIF(i.u[{}], 0) AS SMALLINT)", i + 1),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let names: Vec<&str> = table
        .sums
        .iter()
        .copied()
        .chain(hist.iter().chain(&regs).map(|(n, _)| n.as_str()))
        .collect();
    let values: Vec<String> = table
        .sums
        .iter()
        .map(|s| format!("i.{s}"))
        .chain(hist.iter().chain(&regs).map(|(_, v)| v.clone()))
        .collect();
    let mut typed: Vec<String> = table.texts.iter().map(|t| format!("{t} text")).collect();
    typed.extend(table.sums.iter().map(|s| format!("{s} bigint")));
    typed.extend(MEASURES.iter().map(|m| format!("h_{m} bigint[]")));
    if table.sketch {
        typed.push("u int[]".into());
    }
    let set: Vec<String> = table
        .sums
        .iter()
        .map(|s| format!("{s} = r.{s} + excluded.{s}"))
        .chain(
            hist.iter()
                .map(|(c, _)| format!("{c} = COALESCE(r.{c} + excluded.{c}, r.{c}, excluded.{c})")),
        )
        .chain(
            regs.iter()
                .map(|(c, _)| format!("{c} = GREATEST(r.{c}, excluded.{c})")),
        )
        .collect();
    format!(
        "INSERT INTO {name} AS r (grain, bucket_start, recipient_id, {texts}, {names}) \
         SELECT i.grain, i.bucket_start, i.recipient_id, {itexts}, {values} \
         FROM json_to_recordset($1::json) AS i(n bigint, grain smallint, bucket_start bigint, \
         recipient_id bigint, {typed}) ORDER BY i.n \
         ON CONFLICT (grain, bucket_start, recipient_id, {texts}) DO UPDATE SET {set}",
        name = table.name,
        names = names.join(", "),
        itexts = table
            .texts
            .iter()
            .map(|t| format!("i.{t}"))
            .collect::<Vec<_>>()
            .join(", "),
        values = values.join(", "),
        typed = typed.join(", "),
        set = set.join(", "),
    )
}

/// Postgres: one statement per table and batch whatever its size, in key order so concurrent
/// batches lock rollup rows in one order (no deadlocks).
async fn upsert_postgres(
    conn: &mut AnyConnection,
    table: &'static Table,
    agg: &BTreeMap<Key<'_>, Sums>,
) -> Result<(), sqlx::Error> {
    // Written by hand: one string for the whole batch instead of a map per key.
    let width = 3 * HIST_BUCKETS + if table.sketch { REGISTERS } else { 0 };
    let mut input = String::with_capacity(agg.len() * (200 + 2 * width));
    input.push('[');
    for (n, ((grain, start, recipient, texts), s)) in agg.iter().enumerate() {
        if n > 0 {
            input.push(',');
        }
        let _ = write!(
            input,
            r#"{{"n":{n},"grain":{grain},"bucket_start":{start},"recipient_id":{recipient}"#
        );
        for (name, text) in table.texts.iter().zip(texts) {
            let _ = write!(input, r#","{name}":{}"#, json_text(text));
        }
        for name in table.sums {
            let _ = write!(input, r#","{name}":{}"#, s.sum(name));
        }
        for (m, measure) in MEASURES.iter().enumerate() {
            let _ = write!(input, r#","h_{measure}":"#);
            json_array(&mut input, s.hist[m].iter().copied());
        }
        if table.sketch {
            input.push_str(r#","u":"#);
            json_array(&mut input, s.registers.iter().map(|&r| i64::from(r)));
        }
        input.push('}');
    }
    input.push(']');
    sqlx::query(table.postgres.as_str())
        .bind(input)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn json_array(out: &mut String, values: impl Iterator<Item = i64>) {
    out.push('[');
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v}");
    }
    out.push(']');
}

/// A JSON string literal (quoted and escaped).
pub(crate) fn json_text(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Keys per SQLite statement: four bound texts each stay under SQLite's oldest bind limit (999).
const SQLITE_KEYS_PER_STATEMENT: usize = 150;

/// SQLite: multi-row upserts, numbers written inline (integers we computed, never caller text) and
/// the texts bound. SQLite's cost is the commit, so a few statements per batch are cheap.
async fn upsert_sqlite(
    conn: &mut AnyConnection,
    table: &Table,
    agg: &BTreeMap<Key<'_>, Sums>,
    cols: &[Col],
    head: &str,
    set: &str,
) -> Result<(), sqlx::Error> {
    let n_texts = table.texts.len();
    let keys: Vec<(&Key<'_>, &Sums)> = agg.iter().collect();
    for chunk in keys.chunks(SQLITE_KEYS_PER_STATEMENT) {
        let mut sql = format!("{head} VALUES ");
        for (n, ((grain, start, recipient, _), s)) in chunk.iter().enumerate() {
            let _ = write!(
                sql,
                "{}({grain}, {start}, {recipient}",
                if n == 0 { "" } else { ", " },
            );
            for t in 0..n_texts {
                let _ = write!(sql, ", ${}", n * n_texts + t + 1);
            }
            for c in cols {
                let _ = write!(sql, ", {}", c.value(s));
            }
            sql.push(')');
        }
        sql.push_str(set);
        let mut q = sqlx::query(&sql).persistent(false);
        for ((_, _, _, texts), _) in chunk {
            for t in &texts[..n_texts] {
                q = q.bind(*t);
            }
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}
