//! Checks of the router's name and durations against what the rest of the system can take: a
//! value the router accepted and the ledger (or the clock) could not left a router that reported
//! ready and failed every request.

use std::time::Duration;

use syft_error::MAX_USAGE_NAME;

use super::{invalid, ConfigError, RouterConfig, SearchBackendConfig, UpstreamConfig};

/// The longest timeout taken: a day. (Durations past about 2.9 × 10¹¹ years overflowed the
/// clock: a panic at start, or in every HTTP connection, or a stream ended with no event.)
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// The longest stream, shutdown grace, idle connection or answer retention taken: thirty days.
pub(super) const MAX_SPAN: Duration = Duration::from_secs(30 * 86_400);

impl RouterConfig {
    /// The `limits` section: every size above zero, each key named.
    pub(super) fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let zero = [
            ("max_prompt_bytes", l.max_prompt_bytes == 0),
            ("max_messages", l.max_messages == 0),
            ("max_tokens_limit", l.max_tokens_limit == 0),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(invalid(format!("limits.{key} must be above zero")));
        }
        if l.max_messages > crate::validate::MAX_MESSAGES {
            return Err(invalid(format!(
                "limits.max_messages must be at most {}",
                crate::validate::MAX_MESSAGES
            )));
        }
        if l.default_max_tokens == 0 || l.default_max_tokens > l.max_tokens_limit {
            return Err(invalid(
                "limits.default_max_tokens must be in 1..=max_tokens_limit",
            ));
        }
        Ok(())
    }

    /// The name and every duration, from the file or a flag; [`RouterConfig::validate`] and
    /// [`crate::serve`] check them.
    pub fn validate_bounds(&self) -> Result<(), ConfigError> {
        // A name the ledger refuses (too long, a control character: a TOML "\n") was taken: a
        // paid router refused every request as the user's "invalid argument" while ready, a
        // free one answered and recorded no row.
        if self.name.len() > MAX_USAGE_NAME || self.name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "name {:?} must be at most {MAX_USAGE_NAME} bytes without control characters (it is \
                 the app_name of every transfer and usage row)",
                self.name
            )));
        }
        // A zero timeout fails every call: with `ledger.timeout_ms = 0` each paid request
        // failed after its hold was placed, leaving the user's money held until it expired.
        let mut timeouts = vec![
            ("ledger.timeout_ms", self.ledger.timeout),
            ("ledger.connect_timeout_ms", self.ledger.connect_timeout),
        ];
        if let UpstreamConfig::OpenAi(o) = &self.upstream {
            timeouts.extend([
                ("upstream.connect_timeout_ms", o.connect_timeout),
                ("upstream.request_timeout_ms", o.request_timeout),
                ("upstream.idle_timeout_ms", o.idle_timeout),
            ]);
        }
        match self.search.as_ref().map(|s| &s.backend) {
            Some(SearchBackendConfig::Http(h)) => timeouts.extend([
                ("search.connect_timeout_ms", h.connect_timeout),
                ("search.timeout_ms", h.timeout),
            ]),
            // A rescan period past the clock's range panicked the watcher's task at its first
            // tick: the folder was never looked at again, and nothing said so. (Zero is the
            // search section's own check.)
            Some(SearchBackendConfig::Docs { rescan, .. }) if *rescan > MAX_TIMEOUT => {
                return Err(invalid(format!(
                    "search.rescan_seconds must be at most a day (86400), not {}",
                    rescan.as_secs()
                )));
            }
            _ => {}
        }
        for (key, d) in timeouts {
            if d.is_zero() || d > MAX_TIMEOUT {
                return Err(invalid(format!(
                    "{key} must be more than 0 and at most a day ({} ms)",
                    d.as_millis()
                )));
            }
        }
        for (what, d, zero_ok) in [
            ("--max-stream-duration", self.max_stream_duration, false),
            ("--shutdown-grace", self.shutdown_grace, true),
            ("--http-idle-timeout", self.http.idle_timeout, false),
        ] {
            if (d.is_zero() && !zero_ok) || d > MAX_SPAN {
                return Err(invalid(format!(
                    "{what} must be {}at most 30 days ({} s); got {} s",
                    if zero_ok { "" } else { "more than 0 and " },
                    MAX_SPAN.as_secs(),
                    d.as_secs()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::RouterConfig;

    const BASE: &str = r#""name":"r","owner_email":"o@example.com""#;

    fn load(fields: &str) -> Result<RouterConfig, String> {
        RouterConfig::from_json_str(&format!("{{{BASE},{fields}}}")).map_err(|e| e.to_string())
    }

    fn refused(fields: &str, says: &str) {
        let err = load(fields).expect_err(fields);
        assert!(err.contains(says), "{fields}: {err}");
    }

    /// What a config reviewer showed a router accepted, reported ready with, and then failed
    /// every request on (or, for a free one, recorded no row of); each is refused at start now.
    #[test]
    fn values_the_rest_of_the_system_cannot_take_are_refused() {
        let long = format!(r#""name":"{}""#, "r".repeat(201));
        let err = RouterConfig::from_json_str(&format!(r#"{{{long},"owner_email":"o@e.com"}}"#));
        assert!(err.expect_err("long").to_string().contains("at most 200"));
        let control = RouterConfig::from_json_str(r#"{"name":"r\n","owner_email":"o@e.com"}"#);
        assert!(control
            .expect_err("control")
            .to_string()
            .contains("control"));
        for (fields, key) in [
            (r#""ledger":{"timeout_ms":0}"#, "ledger.timeout_ms"),
            (
                r#""ledger":{"connect_timeout_ms":0}"#,
                "ledger.connect_timeout_ms",
            ),
            (
                r#""upstream":{"base_url":"http://up/v1","request_timeout_ms":0}"#,
                "upstream.request_timeout_ms",
            ),
            (
                r#""upstream":{"base_url":"http://up/v1","idle_timeout_ms":0}"#,
                "upstream.idle_timeout_ms",
            ),
            (
                r#""upstream":{"base_url":"http://up/v1","connect_timeout_ms":0}"#,
                "upstream.connect_timeout_ms",
            ),
            (
                r#""upstream":{"base_url":"http://up/v1","request_timeout_ms":86400001}"#,
                "upstream.request_timeout_ms",
            ),
            (
                r#""services":[{"type":"search"}],"search":{"backend":"http","url":"http://s","timeout_ms":0}"#,
                "search.timeout_ms",
            ),
            (
                r#""search":{"docs":"d","rescan_seconds":18446744073709551615}"#,
                "search.rescan_seconds",
            ),
            (
                r#""search":{"docs":"d","rescan_seconds":86401}"#,
                "search.rescan_seconds",
            ),
        ] {
            refused(fields, key);
        }
        // No backoff between retries is a choice, not a mistake.
        load(r#""upstream":{"base_url":"http://up/v1","retry_backoff_ms":0}"#).expect("no backoff");
        // A key read from a variable that is not set was taken for no key.
        refused(
            r#""upstream":{"base_url":"http://up/v1","api_key_env":"SYFT_TEST_SURELY_UNSET_KEY"}"#,
            "SYFT_TEST_SURELY_UNSET_KEY, which is not set",
        );
        refused(
            r#""services":[{"type":"search"}],"search":{"backend":"http","url":"http://s","api_key_env":"SYFT_TEST_SURELY_UNSET_KEY"}"#,
            "search.api_key_env",
        );
        // Both forms of a key: the literal one won without a word.
        refused(
            r#""upstream":{"base_url":"http://up/v1","api_key":"sk-x","api_key_env":"PATH"}"#,
            "upstream: give api_key or api_key_env, not both",
        );
        refused(
            r#""services":[{"type":"search"}],"search":{"backend":"http","url":"http://s","api_key":"k","api_key_env":"PATH"}"#,
            "search: give api_key or api_key_env, not both",
        );
        // The built-in model reads none of an OpenAI-compatible server's settings.
        refused(
            r#""upstream":{"kind":"echo","base_url":"http://up/v1"}"#,
            "upstream.base_url is not read by upstream kind echo",
        );
        refused(
            r#""upstream":{"kind":"echo","model_map":{"a":"b"}}"#,
            "upstream.model_map",
        );
        // A ledger URL without a host (or that does not parse) was taken, or failed the start
        // with "internal error".
        // A URL of the wrong type named serde's internal enum and no expected form.
        refused(
            r#""ledger":{"url":5}"#,
            "ledger.url: a URL, a comma-separated list of URLs, or an array of URLs",
        );
        for url in ["http://:50051", "https://", "http://ledger host:50051"] {
            refused(&format!(r#""ledger":{{"url":"{url}"}}"#), "names no host");
        }
        // Durations set by flags are checked by `validate_bounds` too (`serve` calls it).
        let mut c = load(r#""models":["m"]"#).expect("loads");
        c.max_stream_duration = std::time::Duration::from_secs(u64::MAX);
        let err = c.validate_bounds().expect_err("huge").to_string();
        assert!(err.contains("--max-stream-duration"), "{err}");
        c.max_stream_duration = std::time::Duration::from_secs(60);
        c.http.idle_timeout = std::time::Duration::ZERO;
        assert!(c.validate_bounds().is_err());
    }
}
