//! The fake API server's watches, checked with the real kube-rs client and kube-runtime's
//! watcher: events of every kind, bookmarks, timeouts, 410 Gone, and the watcher resuming
//! and re-listing across drops and outages.

use crate::client::{client_for, scratch};
use crate::objects;
use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use std::collections::BTreeSet;
use std::time::Duration;
use tests::fakeapi::FakeApi;

/// A watch from a list's version delivers each change once, in order, with its version;
/// bookmarks when allowed; the stream ends after timeoutSeconds; an expired version gets
/// an ERROR event with a 410 Status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_watch_events_bookmarks_timeout_410() -> Result<()> {
    let fake = FakeApi::start()?;
    fake.set_bookmark_interval(Duration::from_millis(200));
    let dir = scratch("fakeapi-watch")?;
    let client = client_for(&fake, &dir).await?;
    let svcs: Api<Service> = Api::all(client.clone());
    fake.create(&objects::service("a", "198.19.0.1", 80, 8080))?;
    let list = svcs.list(&ListParams::default()).await?;
    let rv = list.metadata.resource_version.clone().unwrap_or_default();

    let wp = WatchParams::default().timeout(2);
    let mut stream = svcs.watch(&wp, &rv).await?.boxed();
    let rv_b = fake.create(&objects::service("b", "198.19.0.2", 80, 8080))?;
    let mut changed = objects::service("a", "198.19.0.1", 81, 8080);
    changed.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let rv_a2 = fake.update(&changed)?;
    let rv_del = fake.delete::<Service>("default", "b")?;
    // A node change is not a service event.
    fake.create(&objects::node("node-a", "198.18.0.1"))?;

    let mut seen = Vec::new();
    let mut bookmarks = 0;
    let started = std::time::Instant::now();
    while let Some(ev) = stream.try_next().await? {
        match ev {
            WatchEvent::Added(s) => seen.push(("ADDED", s)),
            WatchEvent::Modified(s) => seen.push(("MODIFIED", s)),
            WatchEvent::Deleted(s) => seen.push(("DELETED", s)),
            WatchEvent::Bookmark(b) => {
                bookmarks += 1;
                assert!(b.metadata.resource_version.parse::<u64>()? >= rv_del);
            }
            WatchEvent::Error(e) => anyhow::bail!("unexpected error event {e:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "stream ended after {took:?}, timeoutSeconds=2"
    );
    let got: Vec<(&str, String, String)> = seen
        .iter()
        .map(|(t, s)| {
            (
                *t,
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("ADDED", "b".to_string(), rv_b.to_string()),
            ("MODIFIED", "a".to_string(), rv_a2.to_string()),
            ("DELETED", "b".to_string(), rv_del.to_string()),
        ]
    );
    assert!(bookmarks >= 3, "{bookmarks} bookmarks in 2 s at 200 ms");

    // Resuming from the first list's version replays the same history.
    let mut replay = svcs
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await?
        .boxed();
    let mut n = 0;
    while let Some(ev) = replay.try_next().await? {
        assert!(
            !matches!(ev, WatchEvent::Bookmark(_)),
            "bookmarks not asked for"
        );
        n += 1;
    }
    assert_eq!(n, 3);

    fake.compact();
    let mut gone = svcs.watch(&WatchParams::default(), &rv).await?.boxed();
    match gone.try_next().await? {
        Some(WatchEvent::Error(e)) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => anyhow::bail!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(gone.try_next().await?.is_none(), "stream ends after 410");
    // A fresh list's version is watchable again.
    let rv2 = svcs
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut ok = svcs
        .watch(&WatchParams::default().timeout(1), &rv2)
        .await?
        .boxed();
    while let Some(ev) = ok.try_next().await? {
        assert!(!matches!(ev, WatchEvent::Error(_)), "{ev:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// What a kube-runtime watcher's consumer would hold: the names of the current objects,
/// and how many (re-)lists it went through.
struct WatcherView<'a, S> {
    events: &'a mut S,
    names: BTreeSet<String>,
    relists: u32,
}

impl<S> WatcherView<'_, S>
where
    S: futures::Stream<Item = std::result::Result<watcher::Event<Service>, watcher::Error>> + Unpin,
{
    /// Applies the watcher's events until `done` holds on the names, outside a re-list
    /// (20 s at most).
    async fn until(&mut self, done: impl Fn(&BTreeSet<String>) -> bool) -> Result<()> {
        let mut init: Option<BTreeSet<String>> = None;
        tokio::time::timeout(Duration::from_secs(20), async {
            while !done(&self.names) || init.is_some() {
                let ev = self.events.next().await.context("watcher ended")?;
                match ev {
                    Ok(watcher::Event::Init) => init = Some(BTreeSet::new()),
                    Ok(watcher::Event::InitApply(s)) => {
                        if let Some(i) = init.as_mut() {
                            i.insert(s.metadata.name.unwrap_or_default());
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        self.names = init.take().unwrap_or_default();
                        self.relists += 1;
                    }
                    Ok(watcher::Event::Apply(s)) => {
                        self.names.insert(s.metadata.name.unwrap_or_default());
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        self.names.remove(&s.metadata.name.unwrap_or_default());
                    }
                    // Errors are retried by the watcher itself (with backoff).
                    Err(_) => {}
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("timed out waiting for the watcher")?
    }
}

/// kube-runtime's watcher (what the agent's source uses): initial list, live changes,
/// resume after a dropped watch without re-listing, re-list after 410, recovery after an
/// outage with the changes made during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeapi_kube_runtime_watcher_resume_relist_outage() -> Result<()> {
    let fake = FakeApi::start()?;
    fake.set_bookmark_interval(Duration::from_millis(200));
    let dir = scratch("fakeapi-runtime")?;
    let client = client_for(&fake, &dir).await?;
    fake.create(&objects::service("a", "198.19.0.1", 80, 8080))?;
    fake.create(&objects::service("b", "198.19.0.2", 80, 8080))?;
    let svcs: Api<Service> = Api::all(client.clone());
    // The same backoff the agent uses, shortened by nothing: the default.
    use kube::runtime::WatchStreamExt as _;
    let mut events = watcher(svcs, watcher::Config::default())
        .default_backoff()
        .boxed();

    let mut view = WatcherView {
        events: &mut events,
        names: BTreeSet::new(),
        relists: 0,
    };
    let set = |v: &[&str]| {
        v.iter()
            .map(std::string::ToString::to_string)
            .collect::<BTreeSet<_>>()
    };

    view.until(|n| n == &set(&["a", "b"])).await?;
    assert_eq!(view.relists, 1);
    fake.create(&objects::service("c", "198.19.0.3", 80, 8080))?;
    view.until(|n| n.contains("c")).await?;

    // A dropped watch resumes from the last version: no re-list.
    let lists_before = fake.requests().iter().filter(|r| !r.watch).count();
    fake.drop_watches();
    fake.delete::<Service>("default", "a")?;
    view.until(|n| n == &set(&["b", "c"])).await?;
    assert_eq!(view.relists, 1, "a dropped watch must not cause a re-list");
    assert_eq!(
        fake.requests().iter().filter(|r| !r.watch).count(),
        lists_before
    );

    // History compacted while the watch is down: 410 → re-list, which also drops what was
    // deleted meanwhile (no DELETED event was ever seen for it).
    fake.pause();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while fake.open_watches() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.open_watches(), 0, "watches outlived the outage");
    fake.delete::<Service>("default", "b")?;
    fake.create(&objects::service("d", "198.19.0.4", 80, 8080))?;
    fake.compact();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fake.resume();
    view.until(|n| n == &set(&["c", "d"])).await?;
    assert_eq!(view.relists, 2, "410 must lead to exactly one re-list");
    let reqs = fake.requests();
    assert!(
        reqs.iter().any(|r| r.watch && r.status == 200)
            && reqs
                .iter()
                .filter(|r| r.watch)
                .all(|r| r.param("timeoutSeconds").is_some()
                    && r.param("allowWatchBookmarks").as_deref() == Some("true")),
        "watch requests: {:?}",
        reqs.iter()
            .filter(|r| r.watch)
            .map(|r| &r.query)
            .collect::<Vec<_>>()
    );

    // kube-rs needs nothing beyond what the server implements (no discovery calls).
    let unknown: Vec<_> = reqs.iter().filter(|r| r.status == 404).collect();
    assert!(
        unknown.is_empty(),
        "requests the server did not know: {unknown:?}"
    );

    // A hanging server: nothing arrives, then everything does.
    fake.hang();
    fake.create(&objects::service("e", "198.19.0.5", 80, 8080))?;
    let early =
        tokio::time::timeout(Duration::from_millis(700), view.until(|n| n.contains("e"))).await;
    assert!(early.is_err(), "an event arrived while the server hung");
    fake.resume();
    view.until(|n| n.contains("e")).await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
