//! Cursor pagination: a page of items and the opaque cursor of the next one.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Largest page any list endpoint returns.
pub const MAX_PAGE_LIMIT: u32 = 1000;
/// Page size when the request gives none.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
