//! The config file: the lowest layer, under environment variables and flags.

/// Reads a TOML config file into `(setting, value)` pairs; keys are setting names
/// (`max_batch`, `redis_url` …). They become defaults that env and flags override.
pub fn read_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    table
        .into_iter()
        .map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                other => {
                    return Err(format!(
                        "config file {}: `{k}` has unsupported value {other}",
                        path.display()
                    ));
                }
            };
            Ok((k.replace('-', "_"), value))
        })
        .collect()
}
