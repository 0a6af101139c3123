//! How analytics groups are keyed: the grouped dimensions as select items `k0`, `k1`, …, the
//! app's owner beside the app (two owners may name an app alike, and a payer's or the admin's
//! figures must keep them apart), and reading a group's key and histograms back.

use sqlx::Row;

use super::analytics::{Dimension, KeyValue, StatsFilter, StatsGroup};
use super::rollup::Sums;
use super::Store;
use crate::error::Result;

/// A group's key while rows are grouped: the dimensions' values and, grouped by app, the owner's
/// account id (selected last, as `ko`), so that apps of one name but two owners stay apart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct GroupKey {
    pub key: Vec<KeyValue>,
    pub owner: Option<i64>,
}

/// The owner's select item (`ko`) when grouped by app, over table alias `t`; every table read
/// keeps the owner (`recipient_id`) in its key. Selected after every other column, so the columns
/// read by index keep their places.
pub(super) fn owner_select(f: &StatsFilter, t: &str) -> Option<String> {
    f.group_by
        .contains(&Dimension::App)
        .then(|| format!("{t}.recipient_id AS ko"))
}

/// The GROUP BY items of the grouped dimensions: `k0`, `k1`, … and `ko` with the app.
pub(super) fn group_keys(f: &StatsFilter) -> Vec<String> {
    let keys = (0..f.group_by.len()).map(|i| format!("k{i}"));
    let owner = f
        .group_by
        .contains(&Dimension::App)
        .then(|| "ko".to_string());
    keys.chain(owner).collect()
}

/// The grouped dimensions as select items `k0`, `k1`, … over table alias `t`, time buckets taken
/// from column `time` (rollups: `bucket_start`; raw rows: `created_at`).
pub(super) fn group_select(f: &StatsFilter, t: &str, time: &str) -> Vec<String> {
    f.group_by
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{} AS k{i}", d.column(t, time)))
        .collect()
}

/// A group's key from the `k0`, `k1` (and `ko`) columns of a row.
pub(super) fn key_of(row: &sqlx::any::AnyRow, f: &StatsFilter) -> Result<GroupKey> {
    let mut key = Vec::with_capacity(f.group_by.len());
    for (i, d) in f.group_by.iter().enumerate() {
        let name = format!("k{i}");
        key.push(match d.grain() {
            Some(_) => KeyValue::Time(row.try_get(name.as_str())?),
            None => KeyValue::Text(row.try_get(name.as_str())?),
        });
    }
    let owner = match f.group_by.contains(&Dimension::App) {
        true => Some(row.try_get("ko")?),
        false => None,
    };
    Ok(GroupKey { key, owner })
}

/// The histogram columns of an aggregated row, selected in [`super::rollup::hist_columns`] order
/// from column index `first` on (NULL sums as 0), into `s`. Read by index: a wide answer has
/// thousands of groups of ~330 columns, and a lookup by name (a new `String` and a hash per
/// value) cost more than the query.
pub(super) fn read_hist(row: &sqlx::any::AnyRow, first: usize, s: &mut Sums) -> Result<()> {
    for (n, slot) in s.hist.iter_mut().flatten().enumerate() {
        let v: Option<i64> = row.try_get(first + n)?;
        *slot = v.unwrap_or(0);
    }
    Ok(())
}

impl Store {
    /// The groups with their apps' owners named: a read per owner, and an answer holds one owner
    /// unless it is the admin's or a payer's across apps.
    pub(super) async fn name_owners(
        &self,
        groups: Vec<(Option<i64>, StatsGroup)>,
    ) -> Result<Vec<StatsGroup>> {
        let mut emails = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(groups.len());
        for (owner, mut g) in groups {
            if let Some(id) = owner {
                let email = match emails.get(&id) {
                    Some(email) => String::clone(email),
                    None => {
                        let email: Option<String> =
                            sqlx::query_scalar("SELECT email FROM accounts WHERE id = $1")
                                .bind(id)
                                .fetch_optional(self.pool())
                                .await?;
                        let email = email.unwrap_or_default();
                        emails.insert(id, email.clone());
                        email
                    }
                };
                g.app_owner = Some(email);
            }
            out.push(g);
        }
        Ok(out)
    }
}
