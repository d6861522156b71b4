//! The ops server over real HTTP on loopback: /healthz, /readyz and /metrics as a kubelet
//! and a scraper see them.

use super::*;
use crate::ops::{Ops, SyncOutcome};
use crate::reconciler::ApplyStats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_server_answers_health_readiness_and_metrics_over_http() {
    let ops = Ops::with_stall_after("/nonexistent/xdplb-ops-http", Duration::from_secs(2));
    let server = ops
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind loopback");
    let addr = server.local_addr;

    let (st, _, body) = get_async(addr, "/healthz").await.expect("healthz");
    assert_eq!((st, body.as_str()), (200, "ok\n"));
    let (st, _, body) = get_async(addr, "/readyz").await.expect("readyz");
    assert_eq!(st, 503, "{body}");

    ops.heartbeat();
    ops.set_ready();
    ops.record_sync(
        SyncOutcome::Applied(&ApplyStats::default()),
        Instant::now(),
        true,
    );
    let (st, _, _) = get_async(addr, "/readyz").await.expect("readyz");
    assert_eq!(st, 200);

    let (st, headers, body) = get_async(addr, "/metrics").await.expect("metrics");
    assert_eq!(st, 200);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let (_, s) = parse(&body);
    assert_eq!(value(&s, "xdplb_resyncs_total", &[]), Some(1.0));
    assert_eq!(value(&s, "xdplb_ready", &[]), Some(1.0));

    // The main loop stops turning: liveness and readiness fail.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let (st, _, body) = get_async(addr, "/healthz").await.expect("healthz");
    assert_eq!(st, 503);
    assert!(body.contains("stalled"), "{body}");
    let (st, _, _) = get_async(addr, "/readyz").await.expect("readyz");
    assert_eq!(st, 503);

    // Binding a taken port is an error, not a panic.
    let err = ops.serve(addr).await.err().expect("port in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let (st, _, _) = get_async(addr, "/nope").await.expect("404");
    assert_eq!(st, 404);
    drop(server);
    wait_closed(addr).await;
}
