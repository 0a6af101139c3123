//! How the hosted backend reaches its remote accounting service.

use std::time::Duration;

/// `Debug` shows every field but the password.
#[derive(Clone, Debug)]
pub struct HostedConfig {
    /// Base URL of the accounting service.
    pub url: String,
    /// The router owner's account there.
    pub email: String,
    pub password: syft_server::Secret,
    /// Per remote call.
    pub timeout: Duration,
    /// Extra attempts for a remote call that is safe to repeat.
    pub retries: u32,
    /// How long a driver owns a resolution in progress before recovery may take it over; also how
    /// old an untracked remote hold must be before it is cancelled as an orphan.
    pub lease: Duration,
}

impl HostedConfig {
    pub fn new(url: &str, email: &str, password: &str) -> Self {
        Self {
            url: url.to_string(),
            email: email.to_ascii_lowercase(),
            password: password.into(),
            timeout: Duration::from_secs(10),
            retries: 3,
            lease: Duration::from_secs(120),
        }
    }
}
