//! `kiln subnet …` and `kiln network …` against a real server.

use clap::Parser;
use kiln_test_utils::api_test;

use super::{kiln, kiln_error, write};

api_test!(subnets_and_a_machines_network_from_the_cli, |srv| {
    let t = srv.admin_token.clone();
    let (code, out) = kiln(
        &srv,
        &t,
        &[
            "subnet",
            "add",
            "prod",
            "--prefix",
            "10.0.0.0/24",
            "--gateway",
            "10.0.0.1",
            "--dns",
            "10.0.0.53",
            "--search",
            "example.net",
            "--static",
            "10.0.0.10-10.0.0.99",
            "--dynamic",
            "10.0.0.100-10.0.0.199",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10.0.0.10-10.0.0.99"), "{out}");
    let (_, out) = kiln(&srv, &t, &["subnet", "list"]).await;
    assert!(out.contains("prod") && out.contains("10.0.0.0/24"), "{out}");
    // Widening the static range into the dynamic one: both named.
    let e = kiln_error(
        &srv,
        &t,
        &["subnet", "edit", "prod", "--static", "10.0.0.10-10.0.0.150"],
    )
    .await;
    assert!(
        e.contains("10.0.0.10-10.0.0.150") && e.contains("10.0.0.100-10.0.0.199"),
        "{e}"
    );
    // A backwards range is refused as the arguments are parsed.
    let e = kiln_cli::Cli::try_parse_from([
        "kiln",
        "subnet",
        "add",
        "x",
        "--prefix",
        "10.1.0.0/24",
        "--static",
        "10.1.0.9-10.1.0.1",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("ends before it starts"), "{e}");

    assert_eq!(kiln(&srv, &t, &["machine", "add", "--hostname", "web1"]).await.0, 0);
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "net.yaml",
        "interfaces:\n  - {name: lan0, mac: \"52:54:00:12:34:56\", addresses: [{subnet: prod, default_route: true}]}\n",
    );
    let (code, out) = kiln(&srv, &t, &["network", "set", "web1", "--file", &file]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10.0.0.10 (prod) default"), "{out}");
    let (_, out) = kiln(&srv, &t, &["network", "config", "web1"]).await;
    assert!(
        out.contains("\"10.0.0.10/24\"") && out.contains("macaddress: \"52:54:00:12:34:56\""),
        "{out}"
    );
    let (_, out) = kiln(&srv, &t, &["subnet", "show", "prod"]).await;
    assert!(out.contains("10.0.0.10 web1"), "{out}");
    let e = kiln_error(&srv, &t, &["subnet", "rm", "prod"]).await;
    assert!(e.contains("assigned"), "{e}");
});
