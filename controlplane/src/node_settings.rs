//! The Node-RED settings a user may set on an instance or a template: an allowlist.
//!
//! Settings reach a replica's generated `settings.js`, which Node-RED runs as code with the
//! rights of Tandem's own OS user. A setting that names a path (`httpStatic`, `userDir`,
//! `editorTheme.page.scripts`), a module or plugin (`storageModule`, `contextStorage`,
//! `editorTheme.theme`), middleware or code (`httpNodeMiddleware`, `ui.middleware`) or the
//! server itself (`https`, `httpServerOptions`) would hand a member the machine: with
//! `{"httpStatic": "<data-dir>"}` anyone could download the platform key. So instead of refusing
//! known-dangerous keys, [`NodeSettings`] lists the settings known to be safe, each with its type,
//! and everything else is refused with the key named. The same type is the OpenAPI schema.
//!
//! Stored settings written before this list existed may hold keys it refuses: [`sanitize`] keeps
//! the allowed keys and names each dropped one, so an instance still starts (without them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Node-RED settings Tandem sets itself for every replica; they cannot be set at all.
pub const MANAGED: &[&str] = &[
    "adminAuth",
    "credentialSecret",
    "disableEditor",
    "externalModules",
    "flowFile",
    "httpAdminRoot",
    "httpNodeRoot",
    "runtimeState",
    "telemetry",
    "uiHost",
    "uiPort",
    "userDir",
];

/// A setting refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Refused {
    /// The setting's path, e.g. `settings.httpStatic` or `settings.editorTheme.page.scripts`.
    pub field: String,
    /// Why it was refused.
    pub message: String,
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        ApiError::invalid(r.field, r.message)
    }
}

/// The Node-RED settings an instance or template may set. Every key is optional; a key that is
/// not listed here is refused. Strings that Node-RED would read as a path, a module or code are
/// never accepted.
#[derive(Debug, Default, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSettings {
    /// CORS for the flows' `http in` endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_node_cors: Option<Cors>,
    /// HTTP basic authentication for the flows' endpoints (`pass` is a bcrypt hash).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_node_auth: Option<BasicAuth>,
    /// Longest a function node may run, in seconds (0 to 3600; 0: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_timeout: Option<f64>,
    /// Values every function node finds in its global context (JSON data).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub function_global_context: Option<Map<String, Value>>,
    /// Longest message the debug sidebar shows, in characters (1 to 10,000,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_max_length: Option<u64>,
    /// Colours in the debug output of the console.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_use_colors: Option<bool>,
    /// Largest body the admin API accepts, e.g. `5mb` (digits and `b`, `kb`, `mb`, `gb`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_max_length: Option<String>,
    /// Time zone name, e.g. `Europe/Berlin` (letters, digits, `/`, `_`, `+`, `-`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// The editor's language, e.g. `en-US`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    /// Dashboard 1 (`node-red-dashboard`): only its path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ui: Option<DashboardUi>,
    /// Dashboard 2 (`@flowfuse/node-red-dashboard`): only its buffer size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<Dashboard>,
    /// The editor's look: titles, menus, the code editor. No paths, scripts, CSS or themes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub editor_theme: Option<EditorTheme>,
    /// Console log level and whether metrics and audit events are logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    /// Whether the context sidebar lists global context keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_global_context_keys: Option<bool>,
    /// Messages a node may buffer (0 to 10,000,000; 0: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_message_buffer_max_length: Option<u64>,
    /// Node-RED's diagnostics endpoint (admin API only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Diagnostics>,
    /// Milliseconds an MQTT node waits before reconnecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_reconnect_time: Option<u64>,
    /// Milliseconds a serial node waits before reconnecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_reconnect_time: Option<u64>,
    /// Milliseconds a TCP node waits before reconnecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_reconnect_time: Option<u64>,
    /// Milliseconds of inactivity after which a TCP node's socket is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_timeout: Option<u64>,
    /// Messages a TCP request node queues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_msg_queue_size: Option<u64>,
    /// Milliseconds of inactivity after which an inbound WebSocket is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_web_socket_timeout: Option<u64>,
    /// Bytes of output an exec node buffers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_max_buffer_size: Option<u64>,
    /// Milliseconds an http request node waits for an answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_request_timeout: Option<u64>,
    /// TLS config nodes may not read certificates from files (only uploaded ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_config_disable_local_files: Option<bool>,
    /// `flows.json` written indented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_file_pretty: Option<bool>,
}

/// One string or several.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Allowed origins: `true` (reflect the request's), `false`, one origin, or several.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum CorsOrigin {
    /// `true` or `false`.
    Any(bool),
    /// Origins.
    Origins(OneOrMany),
}

/// `httpNodeCors`, as the `cors` package takes it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cors {
    /// Allowed origins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<CorsOrigin>,
    /// Allowed methods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<OneOrMany>,
    /// Allowed request headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_headers: Option<OneOrMany>,
    /// Response headers exposed to scripts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_headers: Option<OneOrMany>,
    /// Allow credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<bool>,
    /// Seconds a preflight answer may be cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    /// Status of a successful preflight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options_success_status: Option<u16>,
}

/// `httpNodeAuth`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// User name.
    pub user: String,
    /// bcrypt hash of the password.
    pub pass: String,
}

/// `ui` (Dashboard 1).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DashboardUi {
    /// Path of the dashboard under the instance's root, one segment, e.g. `ui`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `dashboard` (Dashboard 2).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Dashboard {
    /// Largest socket.io message, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_http_buffer_size: Option<u64>,
}

/// `editorTheme`, the parts that are text and switches.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EditorTheme {
    /// The browser tab.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<ThemePage>,
    /// The editor's header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<ThemeHeader>,
    /// The deploy button.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy_button: Option<DeployButton>,
    /// Menu entries to show or hide, by id (`menu-item-import-library`: false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub menu: Option<BTreeMap<String, bool>>,
    /// Show the user menu.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_menu: Option<bool>,
    /// The code editor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_editor: Option<CodeEditor>,
    /// Several users editing at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplayer: Option<Switch>,
}

/// `editorTheme.page`: its title only (not `css`, `scripts` or `favicon`, which are paths).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThemePage {
    /// The title of the browser tab.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// `editorTheme.header`: title and link (not `image`, a path).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThemeHeader {
    /// The header's title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Where the title links to (`http://` or `https://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `editorTheme.deployButton` (not `icon`, a path).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployButton {
    /// `default` or `simple`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeployButtonKind>,
    /// Label of a simple button.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Deploy button kinds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeployButtonKind {
    /// With the deploy-type menu.
    Default,
    /// One button.
    Simple,
}

/// `editorTheme.codeEditor`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeEditor {
    /// `monaco` or `ace`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lib: Option<CodeEditorLib>,
    /// Editor options: names to numbers, strings or switches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<BTreeMap<String, Scalar>>,
}

/// Code editors.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CodeEditorLib {
    /// Monaco (Node-RED's default).
    Monaco,
    /// Ace.
    Ace,
}

/// A number, a string or a switch.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Scalar {
    /// A switch.
    Bool(bool),
    /// A number.
    Number(f64),
    /// Text.
    Text(String),
}

/// `{ "enabled": bool }`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    /// On or off.
    pub enabled: bool,
}

/// `logging`: the console logger's level and switches (Tandem keeps its own handler).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// The console logger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleLogging>,
}

/// `logging.console`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleLogging {
    /// Lowest level logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Log runtime metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<bool>,
    /// Log admin API audit events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<bool>,
}

/// Node-RED's log levels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Fatal errors only.
    Fatal,
    /// Errors.
    Error,
    /// Warnings.
    Warn,
    /// Information (the default).
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

/// `diagnostics`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Diagnostics {
    /// The `/admin/diagnostics` endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The editor's diagnostics menu entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ui: Option<bool>,
}

/// Longest string any setting may hold.
const MAX_TEXT: usize = 1024;

// === impl NodeSettings ===

impl NodeSettings {
    /// Checks the values serde cannot: ranges, and strings Node-RED would read as more than
    /// text. The error names the key below `settings`.
    fn check_values(&self) -> Result<(), (String, String)> {
        fn text(key: &str, s: &str) -> Result<(), (String, String)> {
            if s.len() > MAX_TEXT || s.chars().any(char::is_control) {
                return Err((
                    key.into(),
                    format!("must be text of at most {MAX_TEXT} bytes without control characters"),
                ));
            }
            Ok(())
        }
        fn range(key: &str, v: u64, max: u64) -> Result<(), (String, String)> {
            if v > max {
                return Err((key.into(), format!("must be from 0 to {max}")));
            }
            Ok(())
        }
        fn many(key: &str, v: &OneOrMany) -> Result<(), (String, String)> {
            match v {
                OneOrMany::One(s) => text(key, s),
                OneOrMany::Many(list) => list.iter().try_for_each(|s| text(key, s)),
            }
        }
        if let Some(c) = &self.http_node_cors {
            if let Some(CorsOrigin::Origins(o)) = &c.origin {
                many("httpNodeCors.origin", o)?;
            }
            for (k, v) in [
                ("methods", &c.methods),
                ("allowedHeaders", &c.allowed_headers),
                ("exposedHeaders", &c.exposed_headers),
            ] {
                if let Some(v) = v {
                    many(&format!("httpNodeCors.{k}"), v)?;
                }
            }
        }
        if let Some(a) = &self.http_node_auth {
            text("httpNodeAuth.user", &a.user)?;
            if !(a.pass.starts_with("$2") && a.pass.len() == 60) {
                return Err((
                    "httpNodeAuth.pass".into(),
                    "must be a bcrypt hash ($2b$…, 60 characters), not a password".into(),
                ));
            }
        }
        if let Some(t) = self.function_timeout {
            if !(0.0..=3600.0).contains(&t) {
                return Err((
                    "functionTimeout".into(),
                    "must be from 0 to 3600 seconds".into(),
                ));
            }
        }
        if let Some(v) = self.debug_max_length {
            range("debugMaxLength", v, 10_000_000)?;
        }
        if let Some(v) = self.node_message_buffer_max_length {
            range("nodeMessageBufferMaxLength", v, 10_000_000)?;
        }
        let ms = [
            ("mqttReconnectTime", self.mqtt_reconnect_time),
            ("serialReconnectTime", self.serial_reconnect_time),
            ("socketReconnectTime", self.socket_reconnect_time),
            ("socketTimeout", self.socket_timeout),
            ("inboundWebSocketTimeout", self.inbound_web_socket_timeout),
            ("httpRequestTimeout", self.http_request_timeout),
        ];
        for (k, v) in ms {
            if let Some(v) = v {
                range(k, v, 86_400_000)?;
            }
        }
        if let Some(v) = self.tcp_msg_queue_size {
            range("tcpMsgQueueSize", v, 1_000_000)?;
        }
        if let Some(v) = self.exec_max_buffer_size {
            range("execMaxBufferSize", v, 1 << 30)?;
        }
        if let Some(d) = &self.dashboard {
            if let Some(v) = d.max_http_buffer_size {
                range("dashboard.maxHttpBufferSize", v, 1 << 30)?;
            }
        }
        if let Some(s) = &self.api_max_length {
            let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let unit = &s[digits.len()..];
            let ok = !digits.is_empty()
                && digits.len() <= 6
                && digits.bytes().all(|b| b.is_ascii_digit())
                && ["", "b", "kb", "mb", "gb"].contains(&unit.to_ascii_lowercase().as_str());
            if !ok {
                return Err((
                    "apiMaxLength".into(),
                    "must be a size such as 5mb (digits, then b, kb, mb or gb)".into(),
                ));
            }
        }
        if let Some(s) = &self.time_zone {
            let ok = !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b))
                && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..");
            if !ok {
                return Err((
                    "timeZone".into(),
                    "must be a time zone name such as Europe/Berlin".into(),
                ));
            }
        }
        if let Some(s) = &self.lang {
            let ok = !s.is_empty()
                && s.len() <= 16
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !ok {
                return Err(("lang".into(), "must be a language tag such as en-US".into()));
            }
        }
        if let Some(ui) = &self.ui {
            if let Some(p) = &ui.path {
                // Not the editor's own root: the proxy treats everything under `/admin` as
                // the editor (blocked on HA, the admin secret added for members).
                let ok = !p.is_empty()
                    && p.len() <= 64
                    && !p.eq_ignore_ascii_case("admin")
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err((
                        "ui.path".into(),
                        "must be one path segment of letters, digits, '-' and '_' other than admin, e.g. ui".into(),
                    ));
                }
            }
        }
        if let Some(t) = &self.editor_theme {
            if let Some(s) = t.page.as_ref().and_then(|p| p.title.as_deref()) {
                text("editorTheme.page.title", s)?;
            }
            if let Some(h) = &t.header {
                if let Some(s) = &h.title {
                    text("editorTheme.header.title", s)?;
                }
                if let Some(u) = &h.url {
                    text("editorTheme.header.url", u)?;
                    if !(u.starts_with("https://") || u.starts_with("http://")) {
                        return Err((
                            "editorTheme.header.url".into(),
                            "must be an http:// or https:// address".into(),
                        ));
                    }
                }
            }
            if let Some(s) = t.deploy_button.as_ref().and_then(|d| d.label.as_deref()) {
                text("editorTheme.deployButton.label", s)?;
            }
            for k in t.menu.iter().flat_map(|m| m.keys()) {
                text("editorTheme.menu", k)?;
            }
            if let Some(opts) = t.code_editor.as_ref().and_then(|c| c.options.as_ref()) {
                for (k, v) in opts {
                    text("editorTheme.codeEditor.options", k)?;
                    if let Scalar::Text(s) = v {
                        text(&format!("editorTheme.codeEditor.options.{k}"), s)?;
                    }
                }
            }
        }
        if let Some(g) = &self.function_global_context {
            let size = serde_json::to_string(g).map_or(usize::MAX, |s| s.len());
            if size > 64 * 1024 {
                return Err((
                    "functionGlobalContext".into(),
                    "must be at most 64 KiB of JSON".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The path of the first `__proto__` key in `value`, below `path`. In the object literal of
/// `settings.js` such a key sets the prototype of the object it is in rather than a property,
/// and free-form maps (`functionGlobalContext`, `editorTheme.menu`) would let it through.
fn proto_key(path: &str, value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let here = format!("{path}.{k}");
            if k == "__proto__" {
                Some(here)
            } else {
                proto_key(&here, v)
            }
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| proto_key(&format!("{path}[{i}]"), v)),
        _ => None,
    }
}

/// Why the one key `key` with `value` is not allowed, if it is not.
fn refusal(key: &str, value: &Value) -> Option<(String, String)> {
    if MANAGED.contains(&key) {
        return Some((key.into(), "is managed by Tandem and cannot be set".into()));
    }
    if let Some(path) = proto_key(key, value) {
        return Some((path, "is not a name a setting may use".into()));
    }
    let one = Value::Object(Map::from_iter([(key.to_owned(), value.clone())]));
    let parsed: Result<NodeSettings, _> = serde_path_to_error::deserialize(&one);
    match parsed {
        Ok(s) => s.check_values().err(),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let message = if inner.starts_with("unknown field") {
                "is not a Node-RED setting Tandem lets users set: settings that name a path, a module, a storage or context plugin, middleware or code are refused (the allowed ones are listed in the README and the API's OpenAPI document)".to_string()
            } else {
                // serde's own words, without its " at line 1 column 2" position (there is none
                // in a JSON value).
                inner
                    .split(" at line ")
                    .next()
                    .unwrap_or(&inner)
                    .to_string()
            };
            let path = if path == "." || path.is_empty() {
                key.into()
            } else {
                path
            };
            Some((path, message))
        }
    }
}

/// Checks settings as a user sends them: a JSON object whose every key is allowed. The first
/// refused key is a 422 naming it below `field`.
pub fn check(field: &str, settings: &Value) -> Result<(), ApiError> {
    let Some(map) = settings.as_object() else {
        return Err(ApiError::invalid(
            field,
            "must be an object of Node-RED settings",
        ));
    };
    for (key, value) in map {
        if let Some((path, message)) = refusal(key, value) {
            return Err(ApiError::invalid(format!("{field}.{path}"), message));
        }
    }
    Ok(())
}

/// Checks a setting's name as a template policy names it.
pub fn check_name(field: &str, key: &str) -> Result<(), ApiError> {
    if MANAGED.contains(&key) {
        return Err(ApiError::invalid(
            format!("{field}.{key}"),
            "is managed by Tandem and cannot be opened to instances",
        ));
    }
    // Every allowed setting is optional, so `null` parses exactly when the name is known.
    let known = refusal(key, &Value::Null).is_none();
    if !known {
        return Err(ApiError::invalid(
            format!("{field}.{key}"),
            "is not a Node-RED setting Tandem lets users set",
        ));
    }
    Ok(())
}

/// The allowed part of stored settings, and each key dropped with why (stored before this list
/// existed, or under an older one). Never fails: an instance starts without what is refused.
pub fn sanitize(field: &str, settings: &Value) -> (Value, Vec<Refused>) {
    let mut kept = Map::new();
    let mut dropped = Vec::new();
    if let Some(map) = settings.as_object() {
        for (key, value) in map {
            match refusal(key, value) {
                None => {
                    kept.insert(key.clone(), value.clone());
                }
                Some((path, message)) => dropped.push(Refused {
                    field: format!("{field}.{path}"),
                    message,
                }),
            }
        }
    } else if !settings.is_null() {
        dropped.push(Refused {
            field: field.into(),
            message: "must be an object of Node-RED settings".into(),
        });
    }
    (Value::Object(kept), dropped)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(v: Value) -> Option<String> {
        check("settings", &v).err().map(|e| match e {
            ApiError::Invalid { field, .. } => field,
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn settings_that_name_paths_modules_or_code_are_refused_by_name() {
        for (v, field) in [
            (json!({"httpStatic": "/"}), "settings.httpStatic"),
            (json!({"httpStaticRoot": "/x"}), "settings.httpStaticRoot"),
            (json!({"storageModule": "x"}), "settings.storageModule"),
            (
                json!({"contextStorage": {"default": {"module": "localfilesystem"}}}),
                "settings.contextStorage",
            ),
            (json!({"nodesDir": "/tmp"}), "settings.nodesDir"),
            (
                json!({"httpNodeMiddleware": "x"}),
                "settings.httpNodeMiddleware",
            ),
            (
                json!({"functionExternalModules": true}),
                "settings.functionExternalModules",
            ),
            (
                json!({"https": {"key": "/etc/ssl/key.pem"}}),
                "settings.https",
            ),
            (
                json!({"httpServerOptions": {}}),
                "settings.httpServerOptions",
            ),
            (
                json!({"fileWorkingDirectory": "/"}),
                "settings.fileWorkingDirectory",
            ),
            (
                json!({"editorTheme": {"page": {"scripts": ["/etc/passwd"]}}}),
                "settings.editorTheme.page.scripts",
            ),
            (
                json!({"editorTheme": {"page": {"css": "/x.css"}}}),
                "settings.editorTheme.page.css",
            ),
            (
                json!({"editorTheme": {"header": {"image": "/x.png"}}}),
                "settings.editorTheme.header.image",
            ),
            (
                json!({"editorTheme": {"theme": "some-module"}}),
                "settings.editorTheme.theme",
            ),
            (json!({"ui": {"middleware": "x"}}), "settings.ui.middleware"),
            (
                json!({"logging": {"file": {"handler": "x"}}}),
                "settings.logging.file",
            ),
            (
                json!({"logging": {"console": {"handler": "x"}}}),
                "settings.logging.console.handler",
            ),
            (json!({"userDir": "/"}), "settings.userDir"),
            (json!({"adminAuth": {}}), "settings.adminAuth"),
            (
                json!({"__proto__": {"httpStatic": "/"}}),
                "settings.__proto__",
            ),
            (
                json!({"functionGlobalContext": {"a": {"__proto__": {"x": 1}}}}),
                "settings.functionGlobalContext.a.__proto__",
            ),
            (
                json!({"editorTheme": {"menu": {"__proto__": true}}}),
                "settings.editorTheme.menu.__proto__",
            ),
            (json!({"ui": {"path": "Admin"}}), "settings.ui.path"),
        ] {
            assert_eq!(refused(v.clone()).as_deref(), Some(field), "{v}");
        }
    }

    #[test]
    fn allowed_settings_are_type_checked() {
        assert_eq!(
            refused(json!({"functionTimeout": "10"})).as_deref(),
            Some("settings.functionTimeout")
        );
        assert_eq!(
            refused(json!({"functionTimeout": 99999})).as_deref(),
            Some("settings.functionTimeout")
        );
        assert_eq!(
            refused(json!({"debugMaxLength": -1})).as_deref(),
            Some("settings.debugMaxLength")
        );
        assert_eq!(
            refused(json!({"logging": {"console": {"level": "loud"}}})).as_deref(),
            Some("settings.logging.console.level")
        );
        assert_eq!(
            refused(json!({"timeZone": "../../etc"})).as_deref(),
            Some("settings.timeZone")
        );
        assert_eq!(
            refused(json!({"apiMaxLength": "5 mb; x"})).as_deref(),
            Some("settings.apiMaxLength")
        );
        assert_eq!(
            refused(json!({"ui": {"path": "../x"}})).as_deref(),
            Some("settings.ui.path")
        );
        assert_eq!(
            refused(json!({"httpNodeAuth": {"user": "a", "pass": "plain"}})).as_deref(),
            Some("settings.httpNodeAuth.pass")
        );
        assert_eq!(
            refused(json!({"editorTheme": {"header": {"url": "javascript:alert(1)"}}})).as_deref(),
            Some("settings.editorTheme.header.url")
        );
        assert_eq!(refused(json!([1])).as_deref(), Some("settings"));
        assert_eq!(
            refused(json!({
                "httpNodeCors": {"origin": "*", "methods": "GET,PUT,POST,DELETE"},
                "functionTimeout": 10,
                "debugMaxLength": 2000,
                "apiMaxLength": "5mb",
                "timeZone": "Europe/Berlin",
                "lang": "de",
                "ui": {"path": "ui"},
                "dashboard": {"maxHttpBufferSize": 1000000},
                "editorTheme": {"page": {"title": "Orders"}, "header": {"title": "Orders", "url": "https://example.com"}, "codeEditor": {"lib": "monaco", "options": {"fontSize": 14}}},
                "logging": {"console": {"level": "debug", "metrics": false}},
                "exportGlobalContextKeys": false,
                "nodeMessageBufferMaxLength": 100,
                "diagnostics": {"enabled": true},
                "functionGlobalContext": {"site": "berlin"},
                "mqttReconnectTime": 15000,
            })),
            None
        );
    }

    #[test]
    fn sanitize_keeps_what_is_allowed_and_names_each_dropped_key() {
        let (kept, dropped) = sanitize(
            "settings",
            &json!({"httpStatic": "/", "functionTimeout": 5, "debugMaxLength": "x"}),
        );
        assert_eq!(kept, json!({"functionTimeout": 5}));
        let fields: Vec<&str> = dropped.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields, ["settings.debugMaxLength", "settings.httpStatic"]);
    }

    #[test]
    fn policies_name_only_allowed_settings() {
        assert!(check_name("policy.settings", "functionTimeout").is_ok());
        assert!(check_name("policy.settings", "editorTheme").is_ok());
        assert!(check_name("policy.settings", "httpStatic").is_err());
        assert!(check_name("policy.settings", "uiPort").is_err());
    }
}
