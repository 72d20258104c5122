//! The endpoints through the router: status codes, and that a refused request changes nothing.

use std::collections::HashMap;

use super::*;
use crate::identity::BuiltinCa;
use crate::state::State;

struct Fixture {
    admin: Admin,
    request: watch::Receiver<bool>,
    stopped: watch::Sender<bool>,
}

fn fixture() -> Fixture {
    let cfg = Arc::new(
        Config::from_source(&HashMap::from([
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "default/web/web"),
            ("XDS_ADDRESS", ""),
        ]))
        .unwrap(),
    );
    let (_, state) = StateHandle::new(State::default());
    let certs = CertManager::new(Arc::new(
        BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap(),
    ));
    let (request_tx, request) = watch::channel(false);
    let (stopped, stopped_rx) = watch::channel(false);
    let (guard, _) = mpsc::channel(1);
    Fixture {
        admin: Admin {
            inputs: AdminInputs {
                cfg,
                state,
                certs,
                pods: None,
                logs: LogControl::detached("info").unwrap(),
                shutdown: ShutdownTrigger::new(
                    Arc::new(request_tx),
                    stopped_rx,
                    Duration::from_secs(5),
                ),
            },
            _guard: guard,
        },
        request,
        stopped,
    }
}

fn req(method: &str, target: &str) -> Request {
    Request {
        method: method.into(),
        target: target.into(),
    }
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[tokio::test]
async fn logging_lists_and_changes_the_level_and_reset_restores_it() {
    let f = fixture();
    let logs = &f.admin.inputs.logs;
    for m in ["GET", "POST"] {
        let r = f.admin.handle(req(m, "/logging")).await;
        assert_eq!(
            (r.status, text(&r)),
            (200, "current log level is info\n".into())
        );
    }
    let r = f.admin.handle(req("POST", "/logging?level=debug")).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(logs.current().contains("debug"), "{}", logs.current());
    let r = f.admin.handle(req("GET", "/logging")).await;
    assert!(text(&r).contains("debug"), "{}", text(&r));
    let r = f
        .admin
        .handle(req("POST", "/logging?level=meshnode%3A%3Aproxy%3Dtrace"))
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(
        logs.current().contains("meshnode::proxy=trace"),
        "{}",
        logs.current()
    );
    let r = f.admin.handle(req("POST", "/logging?reset")).await;
    assert_eq!(
        (r.status, logs.current()),
        (200, "info".into()),
        "{}",
        text(&r)
    );
}

#[tokio::test]
async fn bad_levels_methods_and_paths_get_4xx_and_change_nothing() {
    let f = fixture();
    let logs = &f.admin.inputs.logs;
    let cases = [
        ("POST", "/logging?level=loud", 400),
        ("POST", "/logging?level=access", 400),
        ("POST", "/logging?level=", 400),
        ("POST", "/logging?level=debug&level=info", 400),
        ("POST", "/logging?verbose=1", 400),
        ("POST", "/logging?level=%ff", 400),
        ("GET", "/logging?level=debug", 405),
        ("GET", "/logging?reset", 405),
        ("PUT", "/logging?level=debug", 405),
        ("DELETE", "/logging", 405),
        ("GET", "/quitquitquit", 405),
        ("POST", "/config_dump", 405),
        ("POST", "/", 405),
        ("GET", "/nothing/here", 404),
        ("POST", "/quitquitquit/now", 404),
        ("GET", "/debug/pprof/profile?seconds=0", 400),
        ("GET", "/debug/pprof/profile?seconds=301", 400),
        ("GET", "/debug/pprof/profile?seconds=ten", 400),
        ("GET", "/debug/pprof/profile?frequency=5000", 400),
        ("GET", "/debug/pprof/profile?rate=1", 400),
        ("POST", "/debug/pprof/profile", 405),
    ];
    for (m, target, status) in cases {
        let r = f.admin.handle(req(m, target)).await;
        assert_eq!(r.status, status, "{m} {target}: {}", text(&r));
        assert_eq!(logs.current(), "info", "{m} {target}");
        assert!(!*f.request.borrow(), "{m} {target} started a shutdown");
    }
    // The level refusal says what is wrong and how to ask.
    let r = f.admin.handle(req("POST", "/logging?level=loud")).await;
    let body = text(&r);
    assert!(
        body.contains("\"loud\"")
            && body.contains("unchanged")
            && body.contains("POST /logging?level="),
        "{body}"
    );
}

#[tokio::test]
async fn quitquitquit_starts_the_shutdown_and_answers_once_stopped() {
    let f = fixture();
    let mut request = f.request.clone();
    let admin = Arc::new(f.admin);
    let quit = tokio::spawn({
        let admin = admin.clone();
        async move { admin.handle(req("POST", "/quitquitquit")).await }
    });
    // Bounded only so that a broken trigger fails instead of hanging.
    tokio::time::timeout(Duration::from_secs(30), request.wait_for(|r| *r))
        .await
        .expect("/quitquitquit starts the shutdown")
        .unwrap();
    assert!(!quit.is_finished(), "answered before the proxy stopped");
    f.stopped.send_replace(true);
    let r = quit.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(text(&r).contains("stopped"), "{}", text(&r));
}

#[tokio::test]
async fn the_index_links_every_endpoint_and_the_heap_profile_says_what_is_missing() {
    let f = fixture();
    let r = f.admin.handle(req("GET", "/")).await;
    assert_eq!(
        (r.status, r.content_type),
        (200, "text/html; charset=utf-8")
    );
    for (path, _) in ENDPOINTS {
        assert!(text(&r).contains(&format!("href=\"/{path}\"")), "{path}");
    }
    let r = f.admin.handle(req("GET", "/debug/pprof/heap")).await;
    assert_eq!(r.status, 501);
    assert!(text(&r).contains("not enabled"), "{}", text(&r));
    let r = f
        .admin
        .handle(req("GET", "/debug/pprof/heap/profiling?activate=maybe"))
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    let r = f.admin.handle(req("GET", "/config_dump")).await;
    assert_eq!((r.status, r.content_type), (200, "application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(
        v["workloads"].is_array() && v["workloadState"].is_object(),
        "{v}"
    );
}
