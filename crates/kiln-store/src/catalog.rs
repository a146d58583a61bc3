//! OS images and post-install tasks.

use kiln_types::catalog::{OsImage, OsImageCreate, OsImagePatch, PlatformTag, Task, TaskCreate, TaskPatch};
use kiln_types::error::ErrorDetail;
use kiln_types::{OsImageId, TaskId};
use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use crate::events::{Change, record, snapshot};
use crate::{Actor, Result, Store, StoreError, now, parse_col, parse_ts, ts};

fn tags_json(tags: &[PlatformTag]) -> String {
    let mut tags = tags.to_vec();
    tags.sort();
    tags.dedup();
    serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into())
}

fn templates_json(t: &std::collections::BTreeMap<String, String>) -> String {
    serde_json::to_string(t).unwrap_or_else(|_| "{}".into())
}

fn parse_tags(s: &str) -> Result<Vec<PlatformTag>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("tags `{s}`: {e}")))
}

fn invalid(problems: Vec<String>) -> StoreError {
    StoreError::Rows {
        conflict: false,
        details: problems
            .into_iter()
            .map(|message| ErrorDetail {
                index: None,
                field: None,
                message,
            })
            .collect(),
    }
}

fn image_from_row(row: &AnyRow) -> Result<OsImage> {
    Ok(OsImage {
        id: parse_col("os image id", &row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        arch: parse_col("arch", &row.try_get::<String, _>("arch")?)?,
        kind: parse_col("os kind", &row.try_get::<String, _>("kind")?)?,
        tags: parse_tags(&row.try_get::<String, _>("tags")?)?,
        min_ram_bytes: row.try_get::<i64, _>("min_ram_bytes")? as u64,
        min_disk_bytes: row.try_get::<i64, _>("min_disk_bytes")? as u64,
        source: row.try_get("source")?,
        sha256: row.try_get("sha256")?,
        format: parse_col("image format", &row.try_get::<String, _>("format")?)?,
        content: parse_col("image content", &row.try_get::<String, _>("content")?)?,
        templates: serde_json::from_str(&row.try_get::<String, _>("templates")?)
            .map_err(|e| StoreError::Corrupt(format!("OS image templates: {e}")))?,
        created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
    })
}

fn task_from_row(row: &AnyRow) -> Result<Task> {
    Ok(Task {
        id: parse_col("task id", &row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        kind: parse_col("task kind", &row.try_get::<String, _>("kind")?)?,
        tags: parse_tags(&row.try_get::<String, _>("tags")?)?,
        content: row.try_get("content")?,
        created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
    })
}

impl Store {
    pub async fn create_os_image(&self, actor: &Actor, new: &OsImageCreate) -> Result<OsImage> {
        let problems = new.validate();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut tags = new.tags.clone();
        tags.sort();
        tags.dedup();
        let image = OsImage {
            id: OsImageId::new(),
            name: new.name.clone(),
            version: new.version.clone(),
            arch: new.arch,
            kind: new.kind,
            tags,
            min_ram_bytes: new.min_ram_bytes,
            min_disk_bytes: new.min_disk_bytes,
            source: new.source.trim().to_string(),
            sha256: new.sha256.as_ref().map(|h| h.to_ascii_lowercase()),
            format: new.format(),
            content: new.content,
            templates: new.templates.clone(),
            created_at: now(),
        };
        let mut tx = self.write_tx().await?;
        if sqlx::query::<Any>("SELECT 1 FROM os_images WHERE name = $1 AND version = $2 AND arch = $3")
            .bind(&image.name)
            .bind(&image.version)
            .bind(image.arch.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!(
                "OS image {} {} ({}) already exists",
                image.name, image.version, image.arch
            )));
        }
        sqlx::query::<Any>(
            "INSERT INTO os_images (id, name, version, arch, kind, tags, min_ram_bytes, min_disk_bytes, source, sha256, \
             created_at, templates, format, content) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(image.id.to_string())
        .bind(&image.name)
        .bind(&image.version)
        .bind(image.arch.as_str())
        .bind(image.kind.as_str())
        .bind(tags_json(&image.tags))
        .bind(i64::try_from(image.min_ram_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(image.min_disk_bytes).unwrap_or(i64::MAX))
        .bind(&image.source)
        .bind(&image.sha256)
        .bind(ts(image.created_at))
        .bind(templates_json(&image.templates))
        .bind(image.format.as_str())
        .bind(image.content.as_str())
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "os_image.create",
                target_kind: "os_image",
                target_id: image.id.to_string(),
                target_name: format!("{}-{}", image.name, image.version),
                before: None,
                after: snapshot(&image),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(image)
    }

    pub async fn list_os_images(&self) -> Result<Vec<OsImage>> {
        let rows = sqlx::query::<Any>("SELECT * FROM os_images ORDER BY name, version, arch")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(image_from_row).collect()
    }

    /// An image by id or `NAME-VERSION` (or `NAME` when only one version exists).
    pub async fn get_os_image(&self, key: &str) -> Result<OsImage> {
        let all = self.list_os_images().await?;
        let exact: Vec<&OsImage> = all
            .iter()
            .filter(|i| i.id.to_string() == key || format!("{}-{}", i.name, i.version) == key)
            .collect();
        let found: Vec<&OsImage> = if exact.is_empty() {
            all.iter().filter(|i| i.name == key).collect()
        } else {
            exact
        };
        match found.as_slice() {
            [] => Err(StoreError::NotFound {
                kind: "OS image",
                key: key.to_string(),
            }),
            [one] => Ok((*one).clone()),
            many => Err(StoreError::Invalid(format!(
                "`{key}` names {} OS images ({}): give NAME-VERSION or the id",
                many.len(),
                many.iter()
                    .map(|i| format!("{}-{} {}", i.name, i.version, i.arch))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    pub async fn update_os_image(&self, actor: &Actor, key: &str, patch: &OsImagePatch) -> Result<OsImage> {
        let before = self.get_os_image(key).await?;
        let wanted = patch.apply(&before);
        let problems = wanted.validate();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut tags = wanted.tags.clone();
        tags.sort();
        tags.dedup();
        let after = OsImage {
            kind: wanted.kind,
            tags,
            min_ram_bytes: wanted.min_ram_bytes,
            min_disk_bytes: wanted.min_disk_bytes,
            source: wanted.source.trim().to_string(),
            format: wanted.format(),
            content: wanted.content,
            sha256: wanted.sha256.map(|h| h.to_ascii_lowercase()),
            templates: wanted.templates,
            ..before.clone()
        };
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>(
            "UPDATE os_images SET kind = $2, tags = $3, min_ram_bytes = $4, min_disk_bytes = $5, source = $6, sha256 = $7, \
             templates = $8, format = $9, content = $10 WHERE id = $1",
        )
        .bind(after.id.to_string())
        .bind(after.kind.as_str())
        .bind(tags_json(&after.tags))
        .bind(i64::try_from(after.min_ram_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(after.min_disk_bytes).unwrap_or(i64::MAX))
        .bind(&after.source)
        .bind(&after.sha256)
        .bind(templates_json(&after.templates))
        .bind(after.format.as_str())
        .bind(after.content.as_str())
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "os_image.update",
                target_kind: "os_image",
                target_id: after.id.to_string(),
                target_name: format!("{}-{}", after.name, after.version),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    pub async fn delete_os_image(&self, actor: &Actor, key: &str) -> Result<()> {
        let image = self.get_os_image(key).await?;
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("DELETE FROM os_images WHERE id = $1")
            .bind(image.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "os_image.delete",
                target_kind: "os_image",
                target_id: image.id.to_string(),
                target_name: format!("{}-{}", image.name, image.version),
                before: snapshot(&image),
                after: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn create_task(&self, actor: &Actor, new: &TaskCreate) -> Result<Task> {
        let problems = new.validate();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut tags = new.tags.clone();
        tags.sort();
        tags.dedup();
        let task = Task {
            id: TaskId::new(),
            name: new.name.clone(),
            kind: new.kind,
            tags,
            content: new.content.clone(),
            created_at: now(),
        };
        let mut tx = self.write_tx().await?;
        if sqlx::query::<Any>("SELECT 1 FROM tasks WHERE name = $1")
            .bind(&task.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!("task `{}` already exists", task.name)));
        }
        sqlx::query::<Any>(
            "INSERT INTO tasks (id, name, kind, tags, content, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(task.id.to_string())
        .bind(&task.name)
        .bind(task.kind.as_str())
        .bind(tags_json(&task.tags))
        .bind(&task.content)
        .bind(ts(task.created_at))
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "task.create",
                target_kind: "task",
                target_id: task.id.to_string(),
                target_name: task.name.clone(),
                before: None,
                after: snapshot(&task),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(task)
    }

    pub async fn list_tasks(&self) -> Result<Vec<Task>> {
        let rows = sqlx::query::<Any>("SELECT * FROM tasks ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(task_from_row).collect()
    }

    pub async fn get_task(&self, key: &str) -> Result<Task> {
        let row = sqlx::query::<Any>("SELECT * FROM tasks WHERE name = $1 OR id = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "task",
                key: key.to_string(),
            })?;
        task_from_row(&row)
    }

    pub async fn update_task(&self, actor: &Actor, key: &str, patch: &TaskPatch) -> Result<Task> {
        let before = self.get_task(key).await?;
        let wanted = TaskCreate {
            name: before.name.clone(),
            kind: patch.kind.unwrap_or(before.kind),
            tags: patch.tags.clone().unwrap_or_else(|| before.tags.clone()),
            content: patch.content.clone().unwrap_or_else(|| before.content.clone()),
        };
        let problems = wanted.validate();
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut tags = wanted.tags;
        tags.sort();
        tags.dedup();
        let after = Task {
            kind: wanted.kind,
            tags,
            content: wanted.content,
            ..before.clone()
        };
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("UPDATE tasks SET kind = $2, tags = $3, content = $4 WHERE id = $1")
            .bind(after.id.to_string())
            .bind(after.kind.as_str())
            .bind(tags_json(&after.tags))
            .bind(&after.content)
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "task.update",
                target_kind: "task",
                target_id: after.id.to_string(),
                target_name: after.name.clone(),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    pub async fn delete_task(&self, actor: &Actor, key: &str) -> Result<()> {
        let task = self.get_task(key).await?;
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("DELETE FROM tasks WHERE id = $1")
            .bind(task.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "task.delete",
                target_kind: "task",
                target_id: task.id.to_string(),
                target_name: task.name.clone(),
                before: snapshot(&task),
                after: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
