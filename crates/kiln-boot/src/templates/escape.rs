//! The escapers the template filters and the output formatter use. Each
//! one makes a value *data* in one context: a shell word, a preseed answer,
//! a YAML or JSON scalar. None of them is ever asked to make a value safe
//! for a context it was not written for.

/// One POSIX shell word holding exactly `value`: single quotes, where
/// nothing is special, and each `'` written as `'\''`. NUL cannot be in a
/// shell argument at all, so it is refused rather than silently cut.
pub fn shell_quote(value: &str) -> Result<String, &'static str> {
    if value.contains('\0') {
        return Err("a NUL byte cannot be passed to a shell command");
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// A preseed answer: the rest of one `owner question type value` line.
/// debconf reads it verbatim up to the line end, so a line break would add a
/// directive and a trailing backslash would join the next line; both are
/// refused, as is any other control character.
pub fn preseed_value(value: &str) -> Result<&str, &'static str> {
    if value.chars().any(char::is_control) {
        return Err("a preseed answer cannot hold a line break or control character");
    }
    if value.ends_with('\\') {
        return Err("a preseed answer cannot end with `\\` (it would continue onto the next line)");
    }
    Ok(value)
}

/// Writes a JSON value as YAML flow syntax that every YAML 1.1 and 1.2
/// parser reads back as the same data: JSON, with every character outside
/// printable ASCII escaped. Plain JSON is not enough for cloud-init's PyYAML,
/// which refuses raw C1 controls, U+FEFF and U+FFFE in the stream and does
/// not join `\u` surrogate pairs, so astral characters use YAML's `\U`.
pub fn yaml_value(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => yaml_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                yaml_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                yaml_string(k, out);
                out.push_str(": ");
                yaml_value(v, out);
            }
            out.push('}');
        }
    }
}

fn yaml_string(s: &str, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sh_printf(quoted: &str) -> Vec<u8> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {quoted}"))
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "sh failed on {quoted:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn shell_quote_is_one_inert_word() {
        for v in [
            "",
            "'",
            "''",
            "a b",
            "$(reboot)",
            "`id`",
            "x'; reboot; '",
            "\n; reboot\n",
            "\\",
            "-n",
            "{{ 7*7 }}",
            "*",
        ] {
            let q = shell_quote(v).unwrap();
            assert_eq!(sh_printf(&q), v.as_bytes(), "{v:?} -> {q}");
        }
        assert!(shell_quote("a\0b").is_err());
    }

    proptest! {
        // Each case forks a shell: keep the count modest.
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn shell_quote_round_trips(v in "[^\u{0}]{0,40}") {
            let q = shell_quote(&v).unwrap();
            prop_assert_eq!(sh_printf(&q), v.as_bytes());
        }

        #[test]
        fn yaml_strings_round_trip(v in any::<String>()) {
            let mut y = String::new();
            yaml_value(&serde_json::Value::String(v.clone()), &mut y);
            prop_assert!(y.is_ascii());
            let back: String = serde_yaml_ng::from_str(&y).unwrap();
            prop_assert_eq!(back, v);
        }
    }

    #[test]
    fn preseed_answers() {
        assert_eq!(preseed_value("db1001 $6$x' \"").unwrap(), "db1001 $6$x' \"");
        for bad in ["a\nd-i x string y", "a\r", "a\\", "\u{85}"] {
            assert!(preseed_value(bad).is_err(), "{bad:?}");
        }
    }
}
