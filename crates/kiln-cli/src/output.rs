//! How results are shown: tables for humans, JSON for scripts.

use std::io::Write;

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Where a command writes its results (stdout, or a buffer in tests).
pub struct Out {
    pub format: Format,
    pub w: Box<dyn Write + Send>,
    /// `w` is a terminal: progress may be redrawn in place. Otherwise (a
    /// pipe, a file, a CI log, a test buffer) it is appended line by line.
    pub terminal: bool,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Out({:?})", self.format)
    }
}

impl Out {
    /// Output that is not a terminal.
    pub fn new(format: Format, w: Box<dyn Write + Send>) -> Out {
        Out {
            format,
            w,
            terminal: false,
        }
    }

    pub fn line(&mut self, text: impl AsRef<str>) -> anyhow::Result<()> {
        writeln!(self.w, "{}", text.as_ref())?;
        Ok(())
    }

    pub fn json<T: Serialize + ?Sized>(&mut self, value: &T) -> anyhow::Result<()> {
        serde_json::to_writer_pretty(&mut self.w, value)?;
        writeln!(self.w)?;
        Ok(())
    }

    /// A table (or, with `--output json`, `value` as JSON).
    pub fn table<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
        header: &[&str],
        rows: Vec<Vec<String>>,
    ) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return self.json(value);
        }
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header.iter().copied());
        for r in rows {
            t.add_row(r);
        }
        writeln!(self.w, "{t}")?;
        Ok(())
    }

    /// A record as `key: value` lines (or JSON).
    pub fn record<T: Serialize + ?Sized>(&mut self, value: &T, fields: Vec<(&str, String)>) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return self.json(value);
        }
        let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in fields {
            writeln!(self.w, "{k:>width$}  {v}")?;
        }
        Ok(())
    }
}

/// `-` for a missing value.
pub fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), |v| v.to_string())
}
