//! sea-orm entities, one module per table. Every tenant-owned table carries `tenant_id` as the
//! leading column of its key or indexes.

macro_rules! no_relations {
    () => {
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    };
}

/// A tenant: the unit of isolation.
pub mod tenant {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub slug: String,
        pub name: String,
        pub policy_version: i64,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// A person who can log in; may belong to several tenants.
pub mod user {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub email: String,
        pub password_hash: Option<String>,
        pub disabled: bool,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// A user's membership of a tenant, with the names of the tenant groups they are in (JSON array).
pub mod membership {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "memberships")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: Uuid,
        pub groups: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// A named group of a tenant (Cedar `Group`).
pub mod group {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "groups")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub description: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// A one-time invitation for a member created without a password.
pub mod invitation {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invitations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: Uuid,
        pub user_id: Uuid,
        pub token_hash: String,
        pub expires_at: DateTimeUtc,
        pub used_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// A login session: the family of rotating refresh tokens; access tokens name it in `sid`.
pub mod session {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub created_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

/// One refresh token of a session (stored as its SHA-256); `used_at` is set when rotated.
pub mod refresh_token {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "refresh_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub token_hash: String,
        pub session_id: Uuid,
        pub created_at: DateTimeUtc,
        pub used_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

/// An API token for external systems (Cedar `ApiToken`); only its SHA-256 is stored.
pub mod api_token {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: Uuid,
        pub name: String,
        pub prefix: String,
        pub token_hash: String,
        pub created_by: Uuid,
        pub groups: String,
        pub created_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub last_used_at: Option<DateTimeUtc>,
        pub revoked_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

/// An immutable version of a tenant's Cedar policy set.
pub mod policy_version {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "policy_versions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i64,
        pub text: String,
        pub message: String,
        pub author: String,
        pub sha256: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// A pipeline; its content lives in immutable versions.
pub mod pipeline {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "pipelines")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: Uuid,
        pub name: String,
        pub latest_version: i64,
        pub created_by: Uuid,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub archived_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

/// An immutable version of a pipeline definition.
pub mod pipeline_version {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "pipeline_versions")]
    pub struct Model {
        pub tenant_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub pipeline_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i64,
        pub definition: String,
        pub source: String,
        pub sha256: String,
        pub message: String,
        pub author_id: Uuid,
        pub author: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

/// The head of a tenant's audit chain (last seq and hash).
pub mod audit_head {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_heads")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        pub seq: i64,
        pub hash: String,
    }
    no_relations!();
}

/// One audit event, chained by hash to the previous one of its tenant.
pub mod audit_event {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub occurred_at: DateTimeUtc,
        pub actor_type: String,
        pub actor_id: Option<String>,
        pub actor_label: String,
        pub action: String,
        pub resource_type: String,
        pub resource_id: Option<String>,
        pub resource_version: Option<i64>,
        pub outcome: String,
        pub policy_ids: String,
        pub source_ip: Option<String>,
        pub user_agent: Option<String>,
        pub request_id: Option<String>,
        pub details: String,
        pub prev_hash: String,
        pub hash: String,
    }
    no_relations!();
}

/// Failed-login counters per account and per source address.
pub mod login_throttle {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "login_throttle")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub failures: i64,
        pub last_failure_at: DateTimeUtc,
        pub blocked_until: Option<DateTimeUtc>,
    }
    no_relations!();
}
