//! `kiln token create --expires` and `kiln token list`: expiry and last use.

use kiln_test_utils::api_test;
use kiln_types::auth::{TokenCreated, TokenInfo};

use crate::{Buf, kiln, kiln_error};

/// The table row of the token named `name`.
fn row<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.trim_start_matches(['│', ' ']).starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name} in\n{table}"))
}

api_test!(token_expiry_and_last_use_from_the_cli, |srv| {
    let t = srv.admin_token.clone();
    let (code, out) = kiln(
        &srv,
        &t,
        &[
            "token",
            "create",
            "--role",
            "operator",
            "--name",
            "ci",
            "--expires",
            "30d",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let created: TokenCreated = serde_json::from_str(&out).unwrap();
    let left = created.info.expires_at.unwrap() - chrono::Utc::now();
    assert!(
        left > chrono::Duration::days(30) - chrono::Duration::minutes(1) && left <= chrono::Duration::days(30),
        "{left}"
    );
    // A time, in ten days (whole seconds, as a user writes it).
    let at = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + 10 * 86_400, 0)
        .unwrap()
        .to_rfc3339();
    let (code, out) = kiln(
        &srv,
        &t,
        &[
            "token",
            "create",
            "--role",
            "operator",
            "--name",
            "fixed",
            "--expires",
            &at,
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let fixed: TokenCreated = serde_json::from_str(&out).unwrap();
    assert_eq!(fixed.info.expires_at.unwrap().to_rfc3339(), at);

    // Refused: a past time (by the server), a bad value (by the CLI, exit 2).
    let e = kiln_error(
        &srv,
        &t,
        &[
            "token",
            "create",
            "--role",
            "operator",
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
    )
    .await;
    assert!(e.contains("not in the future"), "{e}");
    for bad in ["5x", "30", "0d", "tomorrow"] {
        let (code, _) = kiln(&srv, &t, &["token", "create", "--role", "operator", "--expires", bad]).await;
        assert_eq!(code, 2, "--expires {bad}");
    }

    // The list shows expiry and last use, once the token was used.
    let (code, out) = kiln(&srv, &t, &["token", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("EXPIRES") && out.contains("LAST USED") && out.contains("FROM"),
        "{out}"
    );
    let ci_row = row(&out, "ci").to_string();
    assert!(ci_row.contains("never"), "not used yet: {ci_row}");
    assert_eq!(kiln(&srv, &created.token, &["machine", "list"]).await.0, 0);
    let (_, out) = kiln(&srv, &t, &["token", "list"]).await;
    let ci_row = row(&out, "ci");
    assert!(ci_row.contains("127.0.0.1") && !ci_row.contains("never"), "{ci_row}");
    let (_, out) = kiln(&srv, &t, &["token", "list", "-o", "json"]).await;
    let listed: Vec<TokenInfo> = serde_json::from_str(&out).unwrap();
    let ci = listed.iter().find(|x| x.name == "ci").unwrap();
    assert_eq!(ci.last_used_from.as_deref(), Some("127.0.0.1"));
    assert_eq!(ci.expires_at, created.info.expires_at);

    // Offline creation takes --expires too.
    let mut args: Vec<String> = ["kiln", "token", "create", "--role", "operator", "--name", "offline"]
        .map(String::from)
        .into();
    args.extend(["--data-dir".into(), srv.config.data_dir.display().to_string()]);
    args.extend(["--expires".into(), "2h".into()]);
    if let Some(url) = &srv.config.database_url {
        args.extend(["--database-url".to_string(), url.clone()]);
    }
    assert_eq!(kiln_cli::run(args, Box::new(Buf::default())).await, 0);
    let offline = srv.admin().list_tokens().await.unwrap();
    let offline = offline.iter().find(|x| x.name == "offline").unwrap();
    let left = offline.expires_at.unwrap() - chrono::Utc::now();
    assert!(
        left > chrono::Duration::minutes(119) && left <= chrono::Duration::hours(2),
        "{left}"
    );
});
