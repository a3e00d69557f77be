//! Which environment variables a user may give an instance.
//!
//! Variables are the flows' own data (`env.get`, `${NAME}` in node properties), so names are
//! free, with one class of exceptions: names that Node.js, the dynamic loader, the shell or
//! Tandem read before any flow runs. `NODE_OPTIONS=--import=data:…` runs code in every replica of
//! an HA instance whose editor is blocked; `LD_PRELOAD` does the same through the loader; `PATH`
//! and `HOME` change what `node` and its children find. Those are refused with 422.
//!
//! `TANDEM_*` names are Tandem's. The only one an instance sets itself is `TANDEM_MQTT_EXCLUDE`
//! (topic filters kept unshared by the MQTT proxy), and its value is checked here, so one
//! instance's bad value cannot fail the MQTT listeners of every other.

use std::collections::BTreeMap;

use crate::node_settings::Refused;

/// Names refused whatever their case, exactly.
const EXACT: &[&str] = &[
    // Where programs, libraries and files are found.
    "PATH",
    "HOME",
    "TMPDIR",
    "TMP",
    "TEMP",
    "PWD",
    "SHELL",
    "USER",
    "LOGNAME",
    // Shell start-up: read by sh and bash before they run a command (exec nodes).
    "ENV",
    "BASH_ENV",
    "CDPATH",
    "IFS",
    "PS4",
    "SHELLOPTS",
    "BASHOPTS",
    "GLOBIGNORE",
    "PROMPT_COMMAND",
    // glibc: loaded modules, locales, name resolution.
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    "RESOLV_HOST_CONF",
    "TZDIR",
    // OpenSSL: its config file loads engines and providers.
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "OPENSSL_MODULES",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Name prefixes refused whatever their case.
const PREFIXES: &[&str] = &[
    // Node.js and Node-RED: NODE_OPTIONS, NODE_PATH, NODE_EXTRA_CA_CERTS,
    // NODE_TLS_REJECT_UNAUTHORIZED, NODE_RED_*.
    "NODE_",
    // npm and corepack.
    "NPM_",
    "COREPACK_",
    // The dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT) and macOS's.
    "LD_",
    "DYLD_",
    // glibc's allocator and tunables, libuv.
    "MALLOC_",
    "GLIBC_",
    "UV_",
    // Exported shell functions.
    "BASH_FUNC_",
    // Tandem's own.
    "TANDEM_",
];

/// `TANDEM_*` names an instance may set.
pub const TANDEM_ALLOWED: &[&str] = &[MQTT_EXCLUDE];

/// The variable that lists an instance's unshared MQTT subscriptions.
pub const MQTT_EXCLUDE: &str = "TANDEM_MQTT_EXCLUDE";

/// Longest value of a variable, in bytes.
const MAX_VALUE: usize = 32 * 1024;

/// Why the variable `name=value` is refused, if it is.
pub fn refusal(name: &str, value: &str) -> Option<String> {
    let b = name.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if !valid {
        return Some("is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 128 characters)".into());
    }
    if value.len() > MAX_VALUE || value.contains('\0') {
        return Some(format!(
            "must be at most {MAX_VALUE} bytes without NUL characters"
        ));
    }
    let upper = name.to_ascii_uppercase();
    if TANDEM_ALLOWED.contains(&upper.as_str()) && upper == name {
        return mqtt_exclude(value).err();
    }
    if upper.starts_with("TANDEM_") {
        return Some(format!(
            "is reserved for Tandem; the TANDEM_ variables an instance may set are {}",
            TANDEM_ALLOWED.join(", ")
        ));
    }
    if EXACT.contains(&upper.as_str()) || PREFIXES.iter().any(|p| upper.starts_with(p)) {
        return Some(
            "changes how Node.js, the loader or the shell start, so instances cannot set it".into(),
        );
    }
    None
}

/// The topic filters of a `TANDEM_MQTT_EXCLUDE` value (comma-separated), or why it is invalid.
pub fn mqtt_exclude(value: &str) -> Result<Vec<String>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            if tandem_proxy::mqtt::rewrite::valid_filter(f) {
                Ok(f.to_owned())
            } else {
                Err(format!(
                    "{f:?} is not a valid MQTT topic filter ('+' and '#' only as whole levels, '#' only last)"
                ))
            }
        })
        .collect()
}

/// Checks variables as a user sends them; the first refused one is a 422 naming it below `field`.
pub fn check<'a>(
    field: &str,
    vars: impl IntoIterator<Item = (&'a String, &'a str)>,
) -> Result<(), Refused> {
    for (name, value) in vars {
        if let Some(message) = refusal(name, value) {
            return Err(Refused {
                field: format!("{field}.{name}"),
                message,
            });
        }
    }
    Ok(())
}

/// The allowed part of stored variables, and each one dropped with why.
pub fn sanitize(
    field: &str,
    vars: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<Refused>) {
    let mut kept = BTreeMap::new();
    let mut dropped = Vec::new();
    for (name, value) in vars {
        match refusal(name, value) {
            None => {
                kept.insert(name.clone(), value.clone());
            }
            Some(message) => dropped.push(Refused {
                field: format!("{field}.{name}"),
                message,
            }),
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_loader_shell_and_tandem_names_are_refused() {
        for name in [
            "NODE_OPTIONS",
            "node_options",
            "NODE_PATH",
            "NODE_EXTRA_CA_CERTS",
            "NODE_RED_ENABLE_PROJECTS",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "DYLD_INSERT_LIBRARIES",
            "PATH",
            "Path",
            "HOME",
            "BASH_ENV",
            "ENV",
            "GCONV_PATH",
            "OPENSSL_CONF",
            "npm_config_script_shell",
            "TANDEM_ADMIN_SECRET",
            "TANDEM_MQTT_URL",
            "tandem_mqtt_exclude",
            "BASH_FUNC_x%%",
            "1X",
            "",
        ] {
            assert!(refusal(name, "x").is_some(), "{name} should be refused");
        }
        for name in [
            "API_URL",
            "SITE",
            "_PRIVATE",
            "NODEJS_FLAVOUR",
            "MY_NODE_OPTIONS",
            "TZ",
            "LANG",
        ] {
            assert_eq!(refusal(name, "x"), None, "{name} should be allowed");
        }
    }

    #[test]
    fn mqtt_exclusions_are_checked_as_topic_filters() {
        assert_eq!(refusal("TANDEM_MQTT_EXCLUDE", "replies/#, a/+/b"), None);
        assert!(refusal("TANDEM_MQTT_EXCLUDE", "a#").is_some());
        assert!(refusal("TANDEM_MQTT_EXCLUDE", "a/#/b").is_some());
        assert_eq!(
            mqtt_exclude(" replies/# ,,x ").ok(),
            Some(vec!["replies/#".to_string(), "x".to_string()])
        );
    }
}
