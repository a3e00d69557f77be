//! Roles and the one permission table every API route checks.

use serde::{Deserialize, Serialize};

/// A member's role in a team, lowest first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the team's objects, status and logs.
    Viewer,
    /// Also starts, stops and restarts instances and edits their settings and environment.
    Member,
    /// Also creates and deletes applications and instances, manages HA, members and the team.
    Owner,
}

impl Role {
    /// The role's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Owner => "owner",
        }
    }

    /// Parses a stored role.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "member" => Some(Self::Member),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }
}

/// Everything a team member can do to a team's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// See the team, its members, applications and instances.
    Read,
    /// Change the team's name.
    EditTeam,
    /// Delete the team.
    DeleteTeam,
    /// Add, remove and change members.
    ManageMembers,
    /// Read the team's audit log.
    ReadTeamAudit,
    /// Create, rename and delete applications.
    ManageApplications,
    /// Create instances.
    CreateInstance,
    /// Delete instances.
    DeleteInstance,
    /// Change an instance's settings, environment and stack.
    EditInstance,
    /// Start, stop, restart, suspend.
    ControlInstance,
    /// Turn HA on or off, change the replica count.
    ManageHa,
    /// Read an instance's audit log.
    ReadInstanceAudit,
    /// Open a non-HA instance's editor through the proxy.
    OpenEditor,
    /// Protect an instance, or lift its protection.
    ProtectInstance,
    /// Deploy flows to a protected instance, by any route (its editor, `PUT .../flows`, a
    /// rollback, a pipeline).
    DeployProtected,
    /// Read an instance's flows and snapshots' contents; export snapshots.
    ReadFlows,
    /// Take and import snapshots.
    TakeSnapshot,
    /// Deploy flows: `PUT .../flows`, a rollback.
    Deploy,
    /// Delete snapshots.
    DeleteSnapshot,
    /// Create, change and delete pipelines and their stages.
    ManagePipelines,
    /// Deploy a pipeline's stage to the next.
    RunPipeline,
    /// Set who may call an instance's flows' HTTP endpoints, create and revoke its HTTP tokens.
    ManageHttpAuth,
    /// Set or remove an instance's custom hostname and upload its certificate.
    ManageCustomHostname,
}

/// The permission table: the lowest role allowed to do `action`. Platform admins may do all.
pub fn required(action: Action) -> Role {
    use Action::*;
    match action {
        Read => Role::Viewer,
        ReadInstanceAudit | EditInstance | ControlInstance | OpenEditor | ReadFlows
        | TakeSnapshot | Deploy => Role::Member,
        EditTeam | DeleteTeam | ManageMembers | ReadTeamAudit | ManageApplications
        | CreateInstance | DeleteInstance | ManageHa | ProtectInstance | DeployProtected
        | DeleteSnapshot | ManagePipelines | RunPipeline | ManageHttpAuth
        | ManageCustomHostname => Role::Owner,
    }
}
