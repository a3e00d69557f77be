//! The audit log: every change, who made it, when, to what, with before and after where useful.
//! Entries are written in the same transaction as the change they record.

use serde_json::Value;
use sqlx::{Any, Transaction};

use crate::auth::Caller;
use crate::store::{new_id, now_ms};

/// What an audit entry is about.
#[derive(Debug, Default)]
pub struct Subject<'a> {
    /// The team the object belongs to.
    pub team_id: Option<&'a str>,
    /// The instance the object is or belongs to.
    pub instance_id: Option<&'a str>,
    /// `team`, `member`, `application`, `instance`, `stack`, `template`, `user`, `token`.
    pub object_type: &'a str,
    /// The object's id.
    pub object_id: &'a str,
}

impl<'a> Subject<'a> {
    /// An object outside any team (stack, template, user, token).
    pub fn object(object_type: &'a str, object_id: &'a str) -> Self {
        Self {
            object_type,
            object_id,
            ..Default::default()
        }
    }

    /// An object of a team.
    pub fn team(team_id: &'a str, object_type: &'a str, object_id: &'a str) -> Self {
        Self {
            team_id: Some(team_id),
            object_type,
            object_id,
            ..Default::default()
        }
    }

    /// An object of an instance (a snapshot).
    pub fn of_instance(
        team_id: &'a str,
        instance_id: &'a str,
        object_type: &'a str,
        object_id: &'a str,
    ) -> Self {
        Self {
            team_id: Some(team_id),
            instance_id: Some(instance_id),
            object_type,
            object_id,
        }
    }

    /// An instance of a team.
    pub fn instance(team_id: &'a str, instance_id: &'a str) -> Self {
        Self {
            team_id: Some(team_id),
            instance_id: Some(instance_id),
            object_type: "instance",
            object_id: instance_id,
        }
    }
}

/// Records `event` (e.g. `instance.created`) with `body` (before/after or the new object).
pub async fn record(
    tx: &mut Transaction<'_, Any>,
    caller: Option<&Caller>,
    event: &str,
    subject: Subject<'_>,
    body: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit (id, ts, actor_id, actor, event, team_id, instance_id, object_type, object_id, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(new_id())
    .bind(now_ms())
    .bind(caller.map(|c| c.id.clone()))
    .bind(caller.map(|c| c.username.clone()).unwrap_or_else(|| "system".into()))
    .bind(event)
    .bind(subject.team_id.map(str::to_owned))
    .bind(subject.instance_id.map(str::to_owned))
    .bind(subject.object_type)
    .bind(subject.object_id)
    .bind(body.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
