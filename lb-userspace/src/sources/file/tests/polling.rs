//! Noticing changes: a settled change is loaded, a half-written file is not, and the
//! running source follows edits live.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::*;
use crate::sources::Update;

#[test]
fn quick_same_size_rewrite_is_noticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    write(&file, &manifest("a", "198.18.100.1", "80", &[]));
    let mut src = FileSource::new(&file);
    src.load().expect("load");
    assert!(src.poll().expect("poll").is_none(), "nothing changed yet");
    // Same length, written right away: size and (coarse) mtime may be unchanged.
    write(&file, &manifest("a", "198.18.100.2", "80", &[]));
    assert!(
        src.poll().expect("poll").is_none(),
        "loaded on the second look"
    );
    let state = src.poll().expect("poll").expect("a change");
    assert_eq!(
        vips(&state, &id("t", "a", "http", Protocol::Tcp)),
        vec!["198.18.100.2:80"]
    );
}

#[test]
fn a_file_caught_between_truncate_and_write_is_not_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    write(&file, &manifest("a", "198.18.100.1", "80", &[]));
    let mut src = FileSource::new(&file);
    src.load().expect("load");
    // An in-place save truncates first; a poll may see the empty file.
    write(&file, "");
    assert!(src.poll().expect("poll").is_none());
    write(&file, &manifest("a", "198.18.100.22", "80", &[]));
    assert!(src.poll().expect("poll").is_none());
    let state = src.poll().expect("poll").expect("the settled change");
    assert_eq!(
        vips(&state, &id("t", "a", "http", Protocol::Tcp)),
        vec!["198.18.100.22:80"]
    );
}

/// Waits until the watched state satisfies `f`, at most `limit`.
async fn wait_for(
    rx: &mut watch::Receiver<Update>,
    limit: Duration,
    f: impl Fn(&DesiredState) -> bool,
) -> Duration {
    let start = Instant::now();
    tokio::time::timeout(limit, rx.wait_for(|u| f(&u.state)))
        .await
        .unwrap_or_else(|_| panic!("state did not change within {limit:?}"))
        .expect("source stopped");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_applies_edits_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.yaml");
    write(&file, &manifest("a", "198.18.100.1", "80", &["198.18.1.1"]));
    let (tx, mut rx) = watch::channel(Update::new(DesiredState::default(), false));
    let task = tokio::spawn(FileSource::new(dir.path()).run(tx));
    let a = id("t", "a", "http", Protocol::Tcp);
    wait_for(&mut rx, Duration::from_secs(5), |s| {
        s.services.contains_key(&a)
    })
    .await;

    // An in-place edit: a second endpoint.
    write(
        &file,
        &manifest("a", "198.18.100.1", "80", &["198.18.1.1", "198.18.1.2"]),
    );
    let took = wait_for(&mut rx, Duration::from_secs(1), |s| {
        s.services.get(&a).is_some_and(|p| p.endpoints.len() == 2)
    })
    .await;
    assert!(took < Duration::from_secs(1), "{took:?}");

    // An editor's save: write a temporary file, rename it over the original.
    let tmp = dir.path().join(".svc.yaml.swp");
    write(&tmp, &manifest("a", "198.18.100.7", "80", &["198.18.1.2"]));
    std::fs::rename(&tmp, &file).expect("rename");
    wait_for(&mut rx, Duration::from_secs(1), |s| {
        s.services
            .get(&a)
            .is_some_and(|p| p.frontends[0].addr.to_string() == "198.18.100.7")
    })
    .await;

    // An invalid Service keeps its previous version while its (valid) EndpointSlice
    // changes: objects are independent. A new file adds a service.
    write(&file, &manifest("a", "198.18.100.9", "0", &["198.18.1.3"]));
    write(
        &dir.path().join("b.yaml"),
        &manifest("b", "198.18.100.8", "80", &[]),
    );
    let b = id("t", "b", "http", Protocol::Tcp);
    wait_for(&mut rx, Duration::from_secs(1), |s| {
        s.services.contains_key(&b)
    })
    .await;
    let now = rx.borrow().state.clone();
    assert_eq!(vips(&now, &a), vec!["198.18.100.7:80"]);
    assert_eq!(backends(&now, &a), vec!["198.18.1.3:8080"]);

    // Removing the document removes the service (a file left with a comment; a zero-byte
    // one would be taken as being written).
    write(&file, "# removed\n");
    wait_for(&mut rx, Duration::from_secs(1), |s| {
        !s.services.contains_key(&a)
    })
    .await;

    // Dropping the receiver stops the source.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("run stops when the receiver is dropped")
        .expect("task")
        .expect("run");
}

#[tokio::test]
async fn run_fails_when_the_path_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = watch::channel(Update::new(DesiredState::default(), false));
    let err = FileSource::new(dir.path().join("missing"))
        .run(tx)
        .await
        .expect_err("missing path");
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}
