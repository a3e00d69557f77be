//! Instances that sleep when idle (issue 17).
//!
//! An instance with `sleep_after_s` set goes to sleep once that long has passed with no HTTP
//! request, no open WebSocket and no MQTT connection through Tandem: the leader's sleeper
//! ([`run`]) sets its `asleep_since`, and the coordinator stops its replica (it frees the
//! memory) while its routes stay, holding requests. The next request to it calls the proxy's
//! waker ([`StoreWaker`]), which clears `asleep_since`; the coordinator starts the replica (from
//! a warm runtime when the pool has one) and the held request goes through.
//!
//! Activity is what the in-process proxy and its MQTT proxy see (`tandem_proxy::activity`),
//! and what the standalone proxies report (their last request to each instance, every second);
//! a standalone proxy's waker asks `POST /api/v1/routes/wake`.
//! A sleeping instance stays asleep across a restart of Tandem: the state is in the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tandem_proxy::activity::AskOnce;
use tandem_proxy::{ProxyStats, Routes};

use crate::state::AppState;
use crate::store::now_ms;

/// How often the sleeper looks at the instances.
pub const TICK: Duration = Duration::from_millis(500);

/// Wakes one instance at most this often (a burst of requests to a sleeping instance asks once).
const WAKE_DEBOUNCE: Duration = Duration::from_millis(500);

/// Wakes sleeping instances from the in-process proxy: clears their `asleep_since` in the
/// store and tells the coordinator.
pub struct StoreWaker {
    state: AppState,
    asked: AskOnce,
}

impl StoreWaker {
    /// A waker over `state`'s store.
    pub fn new(state: AppState) -> Self {
        Self {
            state,
            asked: AskOnce::new(WAKE_DEBOUNCE),
        }
    }
}

impl tandem_proxy::activity::Waker for StoreWaker {
    fn wake(&self, instance: &str) {
        if !self.asked.first(instance) {
            return;
        }
        let (state, name) = (self.state.clone(), instance.to_owned());
        tokio::spawn(async move {
            if let Err(error) = wake(&state, &name).await {
                tracing::warn!(instance = %name, %error, "cannot wake the instance");
            }
        });
    }
}

/// Wakes instance `name` if it sleeps; whether it did.
pub async fn wake(state: &AppState, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE instances SET asleep_since = NULL WHERE name = $1 AND asleep_since IS NOT NULL",
    )
    .bind(name)
    .execute(&state.store.pool)
    .await?
    .rows_affected()
        > 0;
    if done {
        tracing::info!(instance = %name, "waking the instance: a request came");
        state.coordinator.changed();
    }
    Ok(done)
}

/// Puts idle instances to sleep, every [`TICK`], while this control plane leads, until `stop`.
pub async fn run(
    state: AppState,
    routes: Arc<Routes>,
    stats: Arc<ProxyStats>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    // Since when the sleeper has seen each instance awake and routed, epoch ms: an instance
    // just woken or started is not idle from the start of time.
    let mut awake_since: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = &mut stop => return,
        }
        if !state.leadership.may_act() {
            awake_since.clear();
            continue;
        }
        if let Err(error) = tick(&state, &routes, &stats, &mut awake_since).await {
            tracing::warn!(%error, "the sleeper could not look at the instances");
        }
    }
}

async fn tick(
    state: &AppState,
    routes: &Routes,
    stats: &ProxyStats,
    awake_since: &mut HashMap<String, u64>,
) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, name, sleep_after_s FROM instances \
         WHERE sleep_after_s IS NOT NULL AND sleep_after_s > 0 AND asleep_since IS NULL \
         AND desired_state = 'running' AND ha_replicas IS NULL",
    )
    .fetch_all(&state.store.pool)
    .await?;
    let table = routes.snapshot();
    let routed: HashMap<&str, &Arc<tandem_proxy::routes::Instance>> =
        table.instances().iter().map(|i| (&*i.name, i)).collect();
    let now = u64::try_from(now_ms()).unwrap_or(0);
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        let (id, name, after_s): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        let Some(instance) = routed.get(name.as_str()) else {
            continue;
        };
        // Not idle while it has no replica serving yet (starting, or just woken).
        if instance.asleep || instance.replicas.is_empty() {
            continue;
        }
        seen.insert(name.clone());
        let since = *awake_since.entry(name.clone()).or_insert(now);
        let activity = instance.activity();
        // Its use through this process's proxy and through the standalone proxies.
        let last = activity
            .last_request_ms
            .max(state.feed.last_active(&name))
            .max(since);
        let idle_ms = now.saturating_sub(last);
        let limit_ms = u64::try_from(after_s).unwrap_or(0).saturating_mul(1000);
        if !activity.is_quiet() || stats.mqtt_open(&name) > 0 || idle_ms < limit_ms {
            continue;
        }
        let slept = sqlx::query(
            "UPDATE instances SET asleep_since = $1 WHERE id = $2 AND asleep_since IS NULL AND sleep_after_s IS NOT NULL",
        )
        .bind(now_ms())
        .bind(&id)
        .execute(&state.store.pool)
        .await?
        .rows_affected()
            > 0;
        if slept {
            tracing::info!(instance = %name, idle_s = idle_ms / 1000, "the instance goes to sleep");
            seen.remove(&name);
            state.coordinator.changed();
        }
    }
    awake_since.retain(|name, _| seen.contains(name));
    Ok(())
}
