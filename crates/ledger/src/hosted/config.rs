//! How the hosted backend reaches its remote accounting service.

use std::time::Duration;

#[derive(Clone)]
pub struct HostedConfig {
    /// Base URL of the accounting service.
    pub url: String,
    /// The router owner's account there.
    pub email: String,
    pub password: String,
    /// Per remote call.
    pub timeout: Duration,
    /// Extra attempts for a remote call that is safe to repeat.
    pub retries: u32,
    /// How long a driver owns a resolution in progress before recovery may take it over; also how
    /// old an untracked remote hold must be before it is cancelled as an orphan.
    pub lease: Duration,
}

impl std::fmt::Debug for HostedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedConfig")
            .field("url", &self.url)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("lease", &self.lease)
            .finish()
    }
}

impl HostedConfig {
    pub fn new(url: &str, email: &str, password: &str) -> Self {
        Self {
            url: url.to_string(),
            email: email.to_ascii_lowercase(),
            password: password.to_string(),
            timeout: Duration::from_secs(10),
            retries: 3,
            lease: Duration::from_secs(120),
        }
    }
}
