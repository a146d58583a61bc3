//! The CLI against a server whose API is served over TLS with the
//! certificate kiln generated: `--fingerprint` pins it, another one is
//! refused, a pin on an http:// URL is refused.

use clap::Parser;
use kiln_server::Settings;
use kiln_server::config::ApiSettings;
use kiln_test_utils::{Backend, TestServer};

use crate::Buf;

/// `kiln --url URL --token T --fingerprint FP ARGS`: the verb's result.
async fn pinned(url: &str, token: &str, fingerprint: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["kiln", "--url", url, "--token", token, "--fingerprint", fingerprint];
    argv.extend(args);
    let cli = kiln_cli::Cli::try_parse_from(argv).expect("the arguments parse");
    let ctx = kiln_cli::Ctx::new(cli.url, cli.token).with_trust(cli.fingerprint, cli.ca_file);
    let mut out = kiln_cli::output::Out::new(cli.output, Box::new(Buf::default()));
    kiln_cli::dispatch(cli.command, &ctx, &mut out).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pins_the_servers_certificate() {
    let settings = Settings {
        api: Some(ApiSettings {
            tls: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let srv = TestServer::start_with(Backend::Sqlite, settings).await;
    let (url, token) = (srv.url.clone(), srv.admin_token.clone());
    let fp = srv.fingerprint.clone().unwrap();
    // As the server prints it, and as openssl does (upper case is fine).
    pinned(&url, &token, &fp, &["site", "add", "eqiad"]).await.unwrap();
    pinned(&url, &token, &fp.to_uppercase(), &["site", "add", "codfw"])
        .await
        .unwrap();

    let other = format!("sha256:{}", "ab".repeat(32));
    let e = format!(
        "{:#}",
        pinned(&url, &token, &other, &["site", "add", "ulsfo"])
            .await
            .unwrap_err()
    );
    assert!(e.contains(&format!("fingerprint {fp}, not the pinned {other}")), "{e}");
    assert!(e.contains("kiln server fingerprint"), "{e}");

    let e = format!(
        "{:#}",
        pinned(&url, &token, "sha256:abc", &["site", "list"]).await.unwrap_err()
    );
    assert!(e.contains("64 hex digits"), "{e}");
    let http = url.replace("https://", "http://");
    let e = format!("{:#}", pinned(&http, &token, &fp, &["site", "list"]).await.unwrap_err());
    assert!(e.contains("is not https://"), "{e}");

    let names: Vec<String> = srv
        .admin()
        .list_sites()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names.len(), 2, "only the pinned calls went through: {names:?}");
    srv.stop().await;
}
