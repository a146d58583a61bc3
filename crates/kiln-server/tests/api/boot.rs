//! HTTP boot: scripts from the boot decision, files with Range, explain.

use kiln_server::Settings;
use kiln_server::config::BootSettings;
use kiln_test_utils::{Backend, TestServer, api_test};
use kiln_types::machine::{MachineCreate, MachineState};

async fn script(srv: &TestServer, query: &str, host: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{}/boot/ipxe?{query}", srv.url));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn deployed(host: &str, mac: &str) -> MachineCreate {
    let mut m = MachineCreate::new(host.parse().unwrap());
    m.state = MachineState::Deployed;
    m.nics = vec![serde_json::from_value(serde_json::json!({"mac": mac})).unwrap()];
    m
}

api_test!(deployed_machines_are_sent_to_their_disk, |srv| {
    srv.admin()
        .create_machine(&deployed("web1", "52:54:00:00:00:01"))
        .await
        .unwrap();
    let (status, s) = script(&srv, "mac=52-54-00-00-00-01&platform=pcbios", None).await;
    assert_eq!(status, 200);
    assert!(
        s.starts_with("#!ipxe\n") && s.contains("sanboot --no-describe --drive 0x80"),
        "{s}"
    );
    assert!(!s.contains("kernel"), "{s}");
    let (_, s) = script(&srv, "mac=52:54:00:00:00:01&platform=efi", None).await;
    // UEFI: a failing exit, so that the firmware tries its next boot
    // option (the disk) instead of opening its setup menu.
    assert!(s.contains("\nexit 1\n") && !s.contains("kernel"), "{s}");
    // Unknown, discovery off: told it is not managed here, and given no
    // discovery token (issue 14: only `[boot] discovery` hands them out).
    let (_, s) = script(&srv, "mac=52:54:00:00:00:99", None).await;
    assert!(
        s.contains("not managed here") && !s.contains("kernel") && !s.contains("kiln.token"),
        "{s}"
    );
    let (status, s) = script(&srv, "mac=nonsense", None).await;
    assert_eq!(status, 400, "{s}");
    // Explain says the same, by hostname or by MAC.
    let e = srv.admin().boot_explain("web1", None).await.unwrap();
    assert_eq!(e["answer"], "local_disk");
    assert!(e["reason"].as_str().unwrap().contains("deployed, no job armed"), "{e}");
    let e = srv.admin().boot_explain("52:54:00:00:00:99", None).await.unwrap();
    assert_eq!(e["answer"], "no_answer");
    assert_eq!(
        srv.admin().boot_explain("nope", None).await.unwrap_err().status(),
        Some(404)
    );
});

api_test!(
    a_machine_is_known_by_its_smbios_uuid_or_serial_when_its_mac_is_not,
    |srv| {
        let mut m = MachineCreate::new("dmi1".parse().unwrap());
        m.state = MachineState::Deployed;
        m.hardware = Some(
            serde_json::from_value(serde_json::json!({
                "dmi": {"uuid": "8c5b1f2e-0d3a-4c7b-9e61-2a4f6b8d0c11", "serial": "CZ1234ABC"}
            }))
            .unwrap(),
        );
        srv.admin().create_machine(&m).await.unwrap();
        let disk = |s: &str| s.contains("sanboot --no-describe --drive 0x80");
        // The MAC is unknown; the UUID (any case) or the serial names it.
        let (_, s) = script(
            &srv,
            "mac=52:54:00:00:07:01&uuid=8C5B1F2E-0D3A-4C7B-9E61-2A4F6B8D0C11&serial=&platform=pcbios",
            None,
        )
        .await;
        assert!(disk(&s), "{s}");
        let (_, s) = script(&srv, "mac=52:54:00:00:07:01&uuid=&serial=CZ1234ABC", None).await;
        assert!(disk(&s), "{s}");
        // Placeholders, an unexpanded iPXE variable, a nil UUID or another
        // machine's ids name nothing.
        for q in [
            "uuid=00000000-0000-0000-0000-000000000000&serial=Not%20Specified",
            "uuid=%24%7Buuid%7D&serial=%24%7Bserial%3Auristring%7D",
            "uuid=11111111-2222-3333-4444-555555555555&serial=CZ9999",
        ] {
            let (_, s) = script(&srv, &format!("mac=52:54:00:00:07:01&{q}"), None).await;
            assert!(s.contains("not managed here"), "{q}: {s}");
        }
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_boots_the_agent_and_hosts_cannot_inject() {
    let settings = Settings {
        boot: Some(BootSettings {
            discovery: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let srv = TestServer::start_with(Backend::Sqlite, settings).await;
    let (status, s) = script(&srv, "mac=52:54:00:00:00:77", Some("10.0.0.1:7070")).await;
    assert_eq!(status, 200, "{s}");
    let kernel = s
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("{s}"));
    assert!(
        kernel.starts_with("kernel http://10.0.0.1:7070/boot/file/vmlinuz "),
        "{kernel}"
    );
    assert!(
        kernel.contains("kiln.mode=discover") && kernel.contains("kiln.server=http://10.0.0.1:7070"),
        "{kernel}"
    );
    assert!(
        s.contains("initrd http://10.0.0.1:7070/boot/file/kiln-agent.cpio.gz\n"),
        "{s}"
    );
    // A Host header is client data: one that could expand iPXE settings is refused.
    let (status, s) = script(&srv, "mac=52:54:00:00:00:77", Some("x${net0/ip}")).await;
    assert_eq!(status, 500, "{s}");
    assert!(!s.contains("kernel"));
    srv.stop().await;
}

/// A request sent as raw bytes: reqwest (like every URL library) removes
/// `..` segments before sending, and the server must refuse them itself.
async fn raw_status(srv: &TestServer, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = srv.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let head = String::from_utf8_lossy(&resp);
    let status = head
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {head}"));
    status.parse().unwrap_or_else(|_| panic!("{head}"))
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
        .to_str()
        .unwrap()
}

/// `/boot/file/`'s contract, the same whether the file comes from memory
/// or is streamed from disk.
async fn serves_files(srv: &TestServer) {
    let root = srv.state.boot.artifacts.clone();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("vmlinuz"), &data).unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/boot/file/vmlinuz", srv.url);

    let full = http.get(&url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(header(&full, "content-length"), "100000");
    assert_eq!(header(&full, "accept-ranges"), "bytes");
    let etag = header(&full, "etag").to_string();
    let last_modified = header(&full, "last-modified").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(full.bytes().await.unwrap().as_ref(), &data[..]);
    // Twice: the second time from the cache when there is one.
    let again = http.get(&url).send().await.unwrap();
    assert_eq!(header(&again, "etag"), etag);
    assert_eq!(again.bytes().await.unwrap().as_ref(), &data[..]);

    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), "100000");
    assert_eq!(header(&head, "last-modified"), last_modified);
    assert!(head.bytes().await.unwrap().is_empty());

    for (range, status, content_range, want) in [
        ("bytes=1000-1999", 206, "bytes 1000-1999/100000", &data[1000..2000]),
        ("bytes=99990-", 206, "bytes 99990-99999/100000", &data[99_990..]),
        ("bytes=-10", 206, "bytes 99990-99999/100000", &data[99_990..]),
        ("bytes=99000-200000", 206, "bytes 99000-99999/100000", &data[99_000..]),
        ("bytes=100000-", 416, "bytes */100000", &[][..]),
    ] {
        let r = http.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), status, "{range}");
        assert_eq!(header(&r, "content-range"), content_range, "{range}");
        assert_eq!(header(&r, "content-length"), want.len().to_string(), "{range}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), want, "{range}");
    }
    let r = http.head(&url).header("range", "bytes=0-9").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-length"), "10");
    // A resumed download of another version gets the whole file.
    let r = http
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"an-older-version\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 100_000);
    let r = http
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let r = http.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    let r = http
        .get(&url)
        .header("if-modified-since", &last_modified)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = http.get(&url).header("if-match", "\"other\"").send().await.unwrap();
    assert_eq!(r.status(), 412);

    // Replaced on disk: the next request gets the new file, whole and by range.
    let v2: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
    std::fs::write(root.join("vmlinuz"), &v2).unwrap();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(header(&r, "content-length"), "50000");
    assert_ne!(header(&r, "etag"), etag);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &v2[..]);
    // Same size, swapped in by rename (how artifacts should be updated).
    let v3: Vec<u8> = v2.iter().map(|b| b + 100).collect();
    std::fs::write(root.join(".vmlinuz.new"), &v3).unwrap();
    std::fs::rename(root.join(".vmlinuz.new"), root.join("vmlinuz")).unwrap();
    let r = http.get(&url).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &v3[10..20]);

    // Subdirectories, and symlinks that stay inside.
    std::fs::create_dir_all(root.join("debian/12")).unwrap();
    std::fs::write(root.join("debian/12/initrd.gz"), b"initrd").unwrap();
    std::os::unix::fs::symlink("debian/12/initrd.gz", root.join("initrd-link")).unwrap();
    for path in ["debian/12/initrd.gz", "initrd-link", "debian%2F12/initrd.gz"] {
        let r = http.get(format!("{}/boot/file/{path}", srv.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"initrd", "{path}");
    }

    // Nothing outside the root: the database and the secret key sit right
    // above it; a symlink may not lead there either.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("link-out")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("dir-out")).unwrap();
    for path in [
        "/boot/file/missing",
        "/boot/file/debian",
        "/boot/file/debian/",
        "/boot/file/../secret.key",
        "/boot/file/../kiln.db",
        "/boot/file/debian/../../secret.key",
        "/boot/file/%2e%2e/secret.key",
        "/boot/file/.%2E/secret.key",
        "/boot/file/%2e%2e%2fsecret.key",
        "/boot/file//etc/passwd",
        "/boot/file/%2fetc%2fpasswd",
        "/boot/file/link-out",
        "/boot/file/dir-out/secret",
        "/boot/file/vmlinuz%00",
    ] {
        assert_eq!(raw_status(srv, path).await, 404, "{path}");
    }
    assert_eq!(raw_status(srv, "/boot/file/vmlinuz").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_ranges_from_memory() {
    let srv = TestServer::start(Backend::Sqlite).await;
    serves_files(&srv).await;
    // Served from the cache: the files above, in their current versions.
    let used = srv.state.boot.files.cache().used();
    assert!(used >= 50_000, "nothing was cached ({used} bytes)");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_ranges_from_disk() {
    let settings = Settings {
        boot: Some(BootSettings {
            file_cache_mib: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let srv = TestServer::start_with(Backend::Sqlite, settings).await;
    serves_files(&srv).await;
    assert_eq!(srv.state.boot.files.cache().used(), 0);
    srv.stop().await;
}

/// iPXE's first stages are served at `/boot/file/` with no configuration:
/// from `[boot] ipxe_dir` (Debian's `ipxe` package, /usr/lib/ipxe, where
/// UEFI HTTP boot clients are sent for `snponly.efi`), unless the
/// artifacts directory has its own, which wins; other files of that
/// directory are not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipxe_first_stages_are_served_from_debians_package_and_the_artifacts_win() {
    let debian = std::path::Path::new(kiln_server::first_stage::DEBIAN_IPXE_DIR);
    assert!(
        debian.join("snponly.efi").is_file(),
        "Debian's iPXE is not installed: apt-get install ipxe (scripts/test installs it)"
    );
    let srv = TestServer::start(Backend::Sqlite).await;
    let http = reqwest::Client::new();
    let get = |name: &str| http.get(format!("{}/boot/file/{name}", srv.url)).send();
    for name in ["snponly.efi", "ipxe.efi", "undionly.kpxe"] {
        let r = get(name).await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let want = std::fs::read(debian.join(name)).unwrap();
        assert_eq!(header(&r, "content-length"), want.len().to_string(), "{name}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), &want[..], "{name}");
    }
    // Range works on them too (UEFI HTTP boot resumes).
    let r = http
        .get(format!("{}/boot/file/snponly.efi", srv.url))
        .header("range", "bytes=0-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"MZ", "a PE image");
    // Not the rest of /usr/lib/ipxe.
    assert_eq!(raw_status(&srv, "/boot/file/ipxe.lkrn").await, 404);
    assert_eq!(raw_status(&srv, "/boot/file/qemu/efi-virtio.rom").await, 404);
    // The operator's own build wins.
    std::fs::write(srv.state.boot.artifacts.join("snponly.efi"), b"my own iPXE").unwrap();
    let r = get("snponly.efi").await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"my own iPXE");
    srv.stop().await;
}
