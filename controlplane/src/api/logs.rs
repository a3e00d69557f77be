//! Instance logs: every replica's lines merged, each tagged with its replica (`src`), paged with
//! cursors, and streamed as server-sent events.
//!
//! Cursors: `a<seq>` reads the entries after `seq` (oldest first; poll with `next_cursor` to
//! follow the log), `b<seq>` the entries before it (scroll back with `previous_cursor`). Without
//! a cursor the newest entries come. The log lives in Tandem's memory (the newest 10,000 entries
//! per instance) and in the replicas' log files; a dead replica's lines stay readable.
//!
//! A stream checks again, at least every few seconds ([`ApiConfig::stream_recheck`]), that its
//! caller may still read the instance, and ends when not: a member removed from the team, a
//! revoked token, an ended session or a deleted instance stops getting lines.
//!
//! [`ApiConfig::stream_recheck`]: crate::state::ApiConfig::stream_recheck

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tandem_coordinator::logs::{Cursor, InstanceLog, LogEntry};
use tandem_coordinator::replica::ReplicaId;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, MissedTickBehavior};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::instances::load_for;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::roles::Action;
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(instance_logs))
        .routes(routes!(instance_log_stream))
}

/// Largest page.
const MAX_LIMIT: usize = 1_000;

/// `?replica=&cursor=&limit=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Only this replica's lines: its id (`orders-r1`), `r1` or `1`; `tandem` for the platform's
    /// own lines, `npm` for stack installs.
    pub replica: Option<String>,
    /// `a<seq>` (newer than) or `b<seq>` (older than), from `meta` of a previous page.
    pub cursor: Option<String>,
    /// Entries per page, 1 to 1000; default 100.
    pub limit: Option<usize>,
}

/// `?replica=` for the stream.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only this replica's lines, as for the logs.
    pub replica: Option<String>,
    /// Start after this cursor (`a<seq>`); by default only new lines come.
    pub cursor: Option<String>,
}

/// Where to go from a page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogMeta {
    /// Entries after this page (poll it to follow the log).
    pub next_cursor: String,
    /// Entries before this page; absent when none are kept.
    pub previous_cursor: Option<String>,
}

/// A page of log entries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogPage {
    /// Cursors.
    pub meta: LogMeta,
    /// Entries in order: `seq`, `ts` (epoch ms), `src` (replica), `level`, `msg` and any other
    /// fields of Node-RED's JSON line.
    #[schema(value_type = Vec<Object>)]
    pub log: Vec<LogEntry>,
}

fn parse_cursor(cursor: Option<&str>) -> ApiResult<Cursor> {
    let Some(c) = cursor.filter(|c| !c.is_empty()) else {
        return Ok(Cursor::Latest);
    };
    let bad = || {
        ApiError::invalid(
            "cursor",
            format!("{c:?} is not a cursor; use a next_cursor or previous_cursor of a page"),
        )
    };
    let (dir, n) = c.split_at_checked(1).ok_or_else(bad)?;
    let n: u64 = n.parse().map_err(|_| bad())?;
    match dir {
        "a" => Ok(Cursor::After(n)),
        "b" => Ok(Cursor::Before(n)),
        _ => Err(bad()),
    }
}

/// The `src` a `replica=` filter names.
fn replica_src(instance: &str, replica: Option<&str>) -> ApiResult<Option<String>> {
    let Some(r) = replica.filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    if r == "tandem" || r == "npm" || ReplicaId::parse(r).is_some_and(|id| id.instance == instance)
    {
        return Ok(Some(r.to_owned()));
    }
    let slot = r.strip_prefix('r').unwrap_or(r);
    match slot.parse::<u32>() {
        Ok(n) => Ok(Some(ReplicaId::new(instance, n).to_string())),
        Err(_) => Err(ApiError::invalid(
            "replica",
            format!("{r:?} names no replica; use {instance}-r<slot>, r<slot> or <slot>"),
        )),
    }
}

/// The instance's name and log; no log when no coordinator runs (an empty log, not an error).
async fn instance_log(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<(String, Option<std::sync::Arc<InstanceLog>>)> {
    let i = load_for(state, caller, id, Action::Read).await?;
    let log = state.coordinator.logs().map(|book| book.instance(&i.id));
    Ok((i.name, log))
}

/// The instance's log, merged across replicas (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/logs", tag = "instances", params(("id" = String, Path, description = "Instance id"), LogQuery),
    responses((status = 200, body = LogPage), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn instance_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<LogPage>> {
    let cursor = parse_cursor(q.cursor.as_deref())?;
    let limit = match q.limit {
        None => 100,
        Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::invalid(
                "limit",
                format!("must be from 1 to {MAX_LIMIT}, not {n}"),
            ))
        }
    };
    let (name, log) = instance_log(&state, &caller, &id).await?;
    let src = replica_src(&name, q.replica.as_deref())?;
    let page = match log {
        Some(log) => log.read(cursor, limit, src.as_deref()),
        None => tandem_coordinator::logs::Page {
            entries: Vec::new(),
            more_before: false,
            next_seq: 1,
        },
    };
    let last = page.entries.last().map(|e| e.seq).unwrap_or(match cursor {
        Cursor::After(n) => n,
        _ => page.next_seq.saturating_sub(1),
    });
    let first = page.entries.first().map(|e| e.seq);
    Ok(Json(LogPage {
        meta: LogMeta {
            next_cursor: format!("a{last}"),
            previous_cursor: first.filter(|_| page.more_before).map(|f| format!("b{f}")),
        },
        log: page.entries,
    }))
}

/// New log lines as server-sent events, one JSON entry per event with its `seq` as the event
/// id; resumes after `Last-Event-ID` or `cursor` (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/logs/stream", tag = "instances", params(("id" = String, Path, description = "Instance id"), StreamQuery),
    responses((status = 200, description = "text/event-stream of log entries", content_type = "text/event-stream"), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn instance_log_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| format!("a{v}"));
    let after = match parse_cursor(resume.as_deref().or(q.cursor.as_deref()))? {
        Cursor::After(n) => Some(n),
        Cursor::Latest => None,
        Cursor::Before(_) => {
            return Err(ApiError::invalid(
                "cursor",
                "a stream goes forward; use an a<seq> cursor",
            ))
        }
    };
    let (name, log) = instance_log(&state, &caller, &id).await?;
    let src = replica_src(&name, q.replica.as_deref())?;
    // `interval` takes no zero period.
    let every = state.config.stream_recheck.max(Duration::from_millis(1));
    let mut access = Access::new(state, &headers, caller, id);
    let stream = async_stream(move |tx| async move {
        let Some(log) = log else {
            // Nothing runs instances here: the stream ends at once.
            return;
        };
        // Subscribe before reading the backlog so nothing falls between the two.
        let mut rx = log.subscribe();
        let mut last = match after {
            Some(n) => n,
            None => log.read(Cursor::Latest, 1, None).next_seq.saturating_sub(1),
        };
        // While the log is quiet, access is checked on this tick; while it is busy, before the
        // events that fall due.
        let mut recheck = tokio::time::interval_at(Instant::now() + every, every);
        recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // Catch up from the ring (the backlog, or after falling behind), then follow.
            let page = log.read(Cursor::After(last), MAX_LIMIT, None);
            let caught_up = page.entries.len() < MAX_LIMIT;
            for e in page.entries {
                last = e.seq;
                if src.as_deref().is_none_or(|s| e.src == s)
                    && !(access.allowed().await && send(&tx, &e).await)
                {
                    return;
                }
            }
            if !caught_up {
                continue;
            }
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    // The client went away while the log is quiet.
                    _ = tx.closed() => return,
                    _ = recheck.tick() => {
                        if !access.allowed().await {
                            return;
                        }
                        continue;
                    }
                };
                match next {
                    Ok(e) if e.seq <= last => {}
                    Ok(e) => {
                        last = e.seq;
                        if src.as_deref().is_none_or(|s| e.src == s)
                            && !(access.allowed().await && send(&tx, &e).await)
                        {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The right of a stream's caller to read its instance, checked again while the stream is open.
struct Access {
    state: AppState,
    /// The request's credentials (`Authorization` and `Cookie` only), to authenticate again: a
    /// revoked token or an ended session must end the stream too.
    credentials: HeaderMap,
    username: String,
    instance: String,
    checked: Instant,
}

impl Access {
    fn new(state: AppState, headers: &HeaderMap, caller: Caller, instance: String) -> Self {
        let mut credentials = HeaderMap::new();
        for name in [header::AUTHORIZATION, header::COOKIE] {
            for v in headers.get_all(&name) {
                credentials.append(name.clone(), v.clone());
            }
        }
        Self {
            state,
            credentials,
            username: caller.username,
            instance,
            checked: Instant::now(),
        }
    }

    /// Whether the caller may still read the instance. Asks the store only when the last check
    /// is older than `stream_recheck`: a check per event would cost queries per log line.
    async fn allowed(&mut self) -> bool {
        if self.checked.elapsed() < self.state.config.stream_recheck {
            return true;
        }
        let still = match Caller::from_headers(&self.credentials, &self.state).await {
            Ok(caller) => load_for(&self.state, &caller, &self.instance, Action::Read)
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        self.checked = Instant::now();
        match still {
            Ok(()) => true,
            Err(e) => {
                // Any failure ends the stream, a database error too: a client reconnects with
                // `Last-Event-ID` and gets a clear answer then.
                tracing::info!(instance = %self.instance, user = %self.username, reason = %e, "log stream ended: access is gone");
                false
            }
        }
    }
}

async fn send(tx: &tokio::sync::mpsc::Sender<Event>, e: &LogEntry) -> bool {
    let data = serde_json::to_string(e).unwrap_or_else(|_| Value::Null.to_string());
    tx.send(Event::default().id(e.seq.to_string()).data(data))
        .await
        .is_ok()
}

/// A stream fed by a task through a small channel; the task ends when the client goes.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_and_replica_filters_parse_or_say_what_is_wrong() {
        assert_eq!(parse_cursor(None).ok(), Some(Cursor::Latest));
        assert_eq!(parse_cursor(Some("a12")).ok(), Some(Cursor::After(12)));
        assert_eq!(parse_cursor(Some("b3")).ok(), Some(Cursor::Before(3)));
        for bad in ["x1", "a", "a-1", "é", "b1.5"] {
            assert!(parse_cursor(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            replica_src("orders", Some("r1")).ok().flatten().as_deref(),
            Some("orders-r1")
        );
        assert_eq!(
            replica_src("orders", Some("2")).ok().flatten().as_deref(),
            Some("orders-r2")
        );
        assert_eq!(
            replica_src("orders", Some("orders-r0"))
                .ok()
                .flatten()
                .as_deref(),
            Some("orders-r0")
        );
        assert!(replica_src("orders", Some("other-r0")).is_err());
    }
}
