//! The OpenAI rate-limit headers an admitted (or refused) request answers with.

use std::time::Duration;

use super::{Rule, RuleKind, WindowState};

/// The OpenAI rate-limit headers: the tightest request window and the tightest token window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<WindowState>,
    pub tokens: Option<WindowState>,
}

impl RateHeaders {
    pub fn from_states(rules: &[Rule], states: &[WindowState]) -> Self {
        let tightest = |kind: RuleKind| {
            rules
                .iter()
                .zip(states)
                .filter(|(r, _)| r.kind == kind)
                .map(|(_, s)| *s)
                .min_by_key(|s| s.remaining)
        };
        RateHeaders {
            requests: tightest(RuleKind::Requests),
            tokens: tightest(RuleKind::Tokens),
        }
    }

    /// `(name, value)` of each header to send.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(s) = self.requests {
            out.push(("x-ratelimit-limit-requests", s.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", s.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", format_reset(s.reset)));
        }
        if let Some(s) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", s.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", s.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", format_reset(s.reset)));
        }
        out
    }
}

/// OpenAI's duration format: `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let frac = d.subsec_millis();
    let s = if frac == 0 || h > 0 || m > 0 {
        format!("{s}s")
    } else {
        format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => s,
        (0, m) => format!("{m}m{s}"),
        (h, m) => format!("{h}h{m}m{s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
    }
}
