//! What may hold a secret: the settings that can, their `_FILE` variants, and the
//! redaction of everything the process prints about its settings.

use std::fmt;
use std::path::PathBuf;

use super::Settings;

/// A URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (url, query) = url
        .split_once('?')
        .map_or((url, None), |(u, q)| (u, Some(q)));
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let base = match rest.split_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    };
    // Unix-socket URLs carry credentials as query parameters (`?user=…&pass=…`).
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if matches!(k, "pass" | "password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

impl fmt::Debug for Settings {
    /// The effective settings with secrets redacted, as each role logs them at start.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("models", &self.models)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("redis_client_cert_file", &self.redis_client_cert_file)
            .field("redis_client_key_file", &self.redis_client_key_file)
            .field(
                "redis_url",
                &self
                    .redis_url
                    .as_deref()
                    .map(|u| u.split(',').map(redact_url).collect::<Vec<_>>().join(",")),
            )
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("serve_models", &self.serve_models)
            .field("max_batch", &self.max_batch)
            .field("max_batch_elements", &self.max_batch_elements)
            .field("max_wait_ms", &self.max_wait_ms)
            .field("infer_threads", &self.infer_threads)
            .field("intra_threads", &self.intra_threads)
            .field("result_ttl_s", &self.result_ttl_s)
            .field("claim_after_ms", &self.claim_after_ms)
            .field("max_attempts", &self.max_attempts)
            .field("max_queue", &self.max_queue)
            .field("sync_timeout_ms", &self.sync_timeout_ms)
            .field("drain_timeout_ms", &self.drain_timeout_ms)
            .field("consumer", &self.consumer)
            .field(
                "api_keys",
                &format_args!("[{} redacted]", self.api_keys.len()),
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_elements", &self.max_elements)
            .field("max_entry_fields", &self.max_entry_fields)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("max_poll_wait_s", &self.max_poll_wait_s)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("body_timeout_ms", &self.body_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("cors_origin", &self.cors_origin)
            .field("dlq_retention_s", &self.dlq_retention_s)
            .field("data_dir", &self.data_dir)
            .field("embedded_maxmemory_mb", &self.embedded_maxmemory_mb)
            .field("log_format", &self.log_format)
            .field("async_threads", &self.async_threads)
            .finish()
    }
}

/// Settings that may hold a secret, by setting id and variable: their values are never
/// printed (`--help` hides env values and config-file defaults of these), and each
/// may come from the file that `<VARIABLE>_FILE` names, Docker's and Kubernetes'
/// way of passing secrets.
pub const SECRETS: [(&str, &str); 2] = [
    ("redis_url", "INFERQ_REDIS_URL"),
    ("api_keys", "INFERQ_API_KEYS"),
];

/// True for a variable in [`SECRETS`] (`INFERQ_API_KEYS` …).
pub fn is_secret_variable(var: &str) -> bool {
    SECRETS.iter().any(|(_, v)| *v == var)
}

/// True for a setting id in [`SECRETS`].
pub fn is_secret(id: &str) -> bool {
    SECRETS.iter().any(|(s, _)| *s == id)
}

/// The value of a secret from the file `<var>_FILE` names, when that is set (trailing
/// line ends dropped). Setting both the variable and its `_FILE` is an error.
pub fn secret_from_file(var: &str) -> Result<Option<String>, String> {
    let file_var = format!("{var}_FILE");
    let Some(path) = std::env::var_os(&file_var).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
        return Err(format!("set {var} or {file_var}, not both"));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{file_var}: cannot read {}: {e}",
            PathBuf::from(&path).display()
        )
    })?;
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=1&pass=secret"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
    }
}
