//! Pages of the newest-first listings: a size checked against its bounds and an opaque token
//! that names the last row read (the store reads the next page after it, by keyset).

use base64::Engine;

use crate::error::{LedgerError, Result};
use crate::store::Keyset;

const DEFAULT_PAGE: u32 = 100;
/// The most rows a page may hold (gRPC `page_size`, REST `limit`).
pub const MAX_PAGE: u32 = 500;

/// Which page of a newest-first listing to read (not yet validated): an empty token is the first
/// page, a zero size the default size.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub page_token: String,
    pub page_size: u32,
}

impl PageRequest {
    pub fn new(page_token: String, page_size: u32) -> Self {
        Self {
            page_token,
            page_size,
        }
    }

    /// The size checked and the token decoded into the store's keyset.
    pub(super) fn keyset(&self) -> Result<Keyset> {
        Ok(Keyset {
            limit: page_size(self.page_size)?,
            before_id: decode_page_token(&self.page_token)?,
        })
    }
}

/// A page and the token of the next one (empty when this is the last).
pub struct Page<T> {
    pub items: T,
    pub next_page_token: String,
}

impl<T> Page<Vec<T>> {
    /// The items converted one by one (into an adapter's shape) and the next page's token.
    pub fn convert<P>(self, item: impl FnMut(&T) -> P) -> (Vec<P>, String) {
        (self.items.iter().map(item).collect(), self.next_page_token)
    }
}

pub(super) fn page_size(requested: u32) -> Result<i64> {
    match requested {
        0 => Ok(DEFAULT_PAGE as i64),
        n if n <= MAX_PAGE => Ok(n as i64),
        n => Err(LedgerError::invalid(format!(
            "page_size {n} exceeds the maximum of {MAX_PAGE}"
        ))),
    }
}

/// A page of rows in keyset order: the next page starts after the last row's cursor.
pub(super) fn keyset_page<T>(
    rows: Vec<T>,
    has_more: bool,
    cursor: impl Fn(&T) -> String,
) -> Page<Vec<T>> {
    let next_page_token = match (has_more, rows.last()) {
        (true, Some(last)) => encode_page_token(&cursor(last)),
        _ => String::new(),
    };
    Page {
        items: rows,
        next_page_token,
    }
}

pub(super) fn encode_page_token(last_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id)
}

fn decode_page_token(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| s.len() <= 64 && uuid::Uuid::parse_str(s).is_ok())
        .map(Some)
        .ok_or_else(|| LedgerError::invalid("invalid page_token"))
}
