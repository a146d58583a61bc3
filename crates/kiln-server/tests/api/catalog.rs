//! The catalog and what fits a machine.

use kiln_test_utils::api_test;
use kiln_types::auth::{Role, TenantCreate, TokenCreate};
use kiln_types::catalog::{Arch, OsImageCreate, OsKind, PlatformTag, StorageLayout, TaskCreate, TaskKind};
use serde_json::json;

fn image(name: &str, tags: &[PlatformTag], min_ram_gib: u64) -> OsImageCreate {
    OsImageCreate {
        name: name.into(),
        version: "1".into(),
        arch: Arch::X86_64,
        kind: OsKind::DiskImage,
        tags: tags.to_vec(),
        min_ram_bytes: min_ram_gib << 30,
        min_disk_bytes: 10 << 30,
        source: format!("http://images/{name}.raw"),
        sha256: Some("0".repeat(64)),
        format: None,
        content: Default::default(),
        templates: Default::default(),
    }
}

api_test!(offer_lists_what_fits, |srv| {
    let admin = srv.admin();
    admin
        .create_tenant(&TenantCreate {
            name: "acme".into(),
            description: None,
        })
        .await
        .unwrap();
    let m: kiln_types::machine::MachineCreate = serde_json::from_value(json!({
        "hostname": "gpu1", "owner": "acme",
        "hardware": {"arch": "x86_64", "memory_bytes": 68719476736u64,
                     "disks": [{"name": "sda", "size_bytes": 500107862016u64}, {"name": "sdb", "size_bytes": 500107862016u64}],
                     "gpus": [{"model": "A100"}]}
    })).unwrap();
    admin.create_machine(&m).await.unwrap();
    use PlatformTag::*;
    for img in [
        image("plain", &[Bm], 8),
        image("cuda", &[Bm, Gpu], 8),
        image("vmonly", &[Vm], 1),
        image("huge", &[Bm], 512),
        image("vgpu", &[Vm, Vgpu], 1),
    ] {
        admin.create_os_image(&img).await.unwrap();
    }
    for (name, tags) in [("nvidia-driver", vec![Gpu]), ("vm-agent", vec![Vm]), ("motd", vec![])] {
        admin
            .create_task(&TaskCreate {
                name: name.into(),
                kind: TaskKind::Script,
                tags,
                content: "true".into(),
            })
            .await
            .unwrap();
    }
    let tenant = admin
        .create_token(&TokenCreate {
            role: Role::Tenant,
            tenant: Some("acme".into()),
            name: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let offer = srv.client(Some(&tenant.token)).machine_offer("gpu1").await.unwrap();
    let names = |v: Vec<String>| v;
    assert_eq!(
        names(offer.os_images.iter().map(|i| i.name.clone()).collect()),
        ["cuda", "plain"]
    );
    assert_eq!(
        names(offer.tasks.iter().map(|t| t.name.clone()).collect()),
        ["motd", "nvidia-driver"]
    );
    assert_eq!(
        offer.layouts.iter().map(|l| l.name).collect::<Vec<_>>(),
        [
            StorageLayout::Flat,
            StorageLayout::Lvm,
            StorageLayout::LvmRaid0,
            StorageLayout::LvmRaid1,
            // Two disks: the OS on one, the other left alone.
            StorageLayout::LvmHba
        ]
    );
    // Tenants may read the catalog but not change it.
    let t = srv.client(Some(&tenant.token));
    assert_eq!(t.list_os_images().await.unwrap().len(), 5);
    assert_eq!(t.delete_os_image("plain-1").await.unwrap_err().status(), Some(403));
    assert_eq!(t.list_layouts().await.unwrap().len(), 8);
});

api_test!(catalog_validation, |srv| {
    let admin = srv.admin();
    let mut bad = image("deb", &[PlatformTag::Bm], 1);
    bad.sha256 = None;
    let e = admin.create_os_image(&bad).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("sha256 is required"), "{e}");
    admin.create_os_image(&image("deb", &[], 1)).await.unwrap();
    let e = admin.create_os_image(&image("deb", &[], 1)).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("already exists"));
    let e = admin.get_os_image("nope").await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    // Edits keep what they do not name and are validated as a whole.
    let patch = kiln_types::catalog::OsImagePatch {
        min_ram_bytes: Some(4 << 30),
        ..Default::default()
    };
    let edited = admin.update_os_image("deb-1", &patch).await.unwrap();
    assert_eq!(edited.min_ram_bytes, 4 << 30);
    assert_eq!(edited.source, "http://images/deb.raw");
    let patch = kiln_types::catalog::OsImagePatch {
        sha256: Some("xyz".into()),
        ..Default::default()
    };
    assert_eq!(
        admin.update_os_image("deb-1", &patch).await.unwrap_err().status(),
        Some(400)
    );
    admin
        .create_task(&TaskCreate {
            name: "motd".into(),
            kind: TaskKind::Script,
            tags: vec![],
            content: "v1".into(),
        })
        .await
        .unwrap();
    let patch = kiln_types::catalog::TaskPatch {
        content: Some("v2".into()),
        ..Default::default()
    };
    assert_eq!(admin.update_task("motd", &patch).await.unwrap().content, "v2");
    let events = admin
        .list_events(&kiln_types::event::EventFilter {
            target: Some("motd".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(events[0].action, "task.update");
    assert_eq!(events[0].before.as_ref().unwrap()["content"], "v1");
});
