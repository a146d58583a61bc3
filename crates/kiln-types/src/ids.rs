//! A type per ID kind, so a `RackId` can never be passed where a `MachineId`
//! is meant. IDs are UUIDv7: time-ordered, so new rows land at the end of
//! B-tree indexes on both backends.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered ID.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A machine, physical or virtual.
    MachineId
);
uuid_id!(
    /// A site (datacenter, building).
    SiteId
);
uuid_id!(
    /// A rack inside a site.
    RackId
);
uuid_id!(
    /// A tenant (hosting customer, team).
    TenantId
);
uuid_id!(
    /// An API token (its record, never its secret).
    TokenId
);
uuid_id!(
    /// An OS image in the catalog.
    OsImageId
);
uuid_id!(
    /// A post-install task.
    TaskId
);
uuid_id!(
    /// A job (a durable workflow instance).
    JobId
);
uuid_id!(
    /// A subnet in the inventory.
    SubnetId
);
