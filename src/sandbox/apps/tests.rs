//! The apps and the client on loopback: bookinfo routes, productpage's page with upstreams up and down,
//! refusals (404/405/400/431), and each client outcome against a misbehaving server.

use super::*;
use std::io::{Read, Write};
use std::net::TcpListener as StdListener;
use std::thread;

const T: Duration = Duration::from_secs(5);

/// One app serving on 127.0.0.1 on its own thread and current-thread runtime (as `run` does).
struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<Result<(), AppError>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(app: &str, upstreams: &[(&str, SocketAddr)]) -> Running {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = AppConfig {
        app: app.parse().unwrap(),
        listen: addr,
        upstreams: upstreams.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            serve(cfg, listener, async move {
                let _ = stopped.await;
            })
            .await
        })
    });
    Running {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// A port nobody listens on.
fn closed_port() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn answered(o: Outcome) -> (u16, String, String) {
    match o {
        Outcome::Answered { status, app, body } => (status, app.unwrap_or_default(), body),
        other => panic!("expected an answer, got {other}"),
    }
}

#[test]
fn app_names_parse_and_print_like_bookinfo() {
    for name in [
        "productpage",
        "details",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "ratings",
    ] {
        assert_eq!(name.parse::<App>().unwrap().to_string(), name);
    }
    assert!(matches!(
        "reviews-v4".parse::<App>(),
        Err(AppError::UnknownApp { .. })
    ));
    assert!(matches!(
        "reviews".parse::<App>(),
        Err(AppError::UnknownApp { .. })
    ));
    assert_eq!(App::Productpage.upstreams(), ["details", "reviews"]);
    assert_eq!(App::Reviews(3).upstreams(), ["ratings"]);
    assert!(App::Reviews(1).upstreams().is_empty() && App::Ratings.upstreams().is_empty());
}

#[test]
fn details_ratings_and_reviews_v1_answer_bookinfo_json_with_x_app() {
    let details = start("details", &[]);
    let ratings = start("ratings", &[]);
    let reviews = start("reviews-v1", &[]);

    let (status, app, body) = answered(get(details.addr, "/details/7", T));
    assert_eq!((status, app.as_str()), (200, "details"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["id"].as_u64(), v["author"].as_str()),
        (Some(7), Some("William Shakespeare"))
    );

    let (status, app, body) = answered(get(ratings.addr, "/ratings/7", T));
    assert_eq!((status, app.as_str()), (200, "ratings"));
    assert_eq!(body, r#"{"id":7,"ratings":{"Reviewer1":5,"Reviewer2":4}}"#);

    let (status, app, body) = answered(get(reviews.addr, "/reviews/7", T));
    assert_eq!((status, app.as_str()), (200, "reviews-v1"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["podname"].as_str(), v["version"].as_str()),
        (Some("reviews-v1"), Some("v1"))
    );
    assert_eq!(v["reviews"].as_array().map(Vec::len), Some(2));
    assert!(v["reviews"][0].get("rating").is_none(), "{body}");

    assert_eq!(answered(get(ratings.addr, "/health", T)).2, "ok");
    assert_eq!(answered(get(details.addr, "/details/x", T)).0, 400);
}

#[test]
fn productpage_shows_details_and_reviews_v2_black_stars() {
    let details = start("details", &[]);
    let ratings = start("ratings", &[]);
    let reviews = start("reviews-v2", &[("ratings", ratings.addr)]);
    let page = start(
        "productpage",
        &[("details", details.addr), ("reviews", reviews.addr)],
    );
    for path in ["/productpage", "/", "/productpage?u=normal"] {
        let (status, app, body) = answered(get(page.addr, path, T));
        assert_eq!((status, app.as_str()), (200, "productpage"));
        assert!(
            body.contains("\ndetails: ok (William Shakespeare)\n"),
            "{body}"
        );
        assert!(
            body.contains("\nreviews: ok (reviews-v2, ratings: black stars)\n"),
            "{body}"
        );
    }
}

#[test]
fn reviews_v3_stars_are_red_and_v2_without_ratings_stays_200_with_bookinfo_error() {
    let ratings = start("ratings", &[]);
    let v3 = start("reviews-v3", &[("ratings", ratings.addr)]);
    let v: Value = serde_json::from_str(&answered(get(v3.addr, "/reviews/0", T)).2).unwrap();
    assert_eq!(
        v["reviews"][0]["rating"],
        json!({"stars": 5, "color": "red"})
    );
    assert_eq!(
        v["reviews"][1]["rating"],
        json!({"stars": 4, "color": "red"})
    );

    let v2 = start("reviews-v2", &[("ratings", closed_port())]);
    let (status, _, body) = answered(get(v2.addr, "/reviews/0", T));
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["reviews"][0]["rating"]["error"], RATINGS_UNAVAILABLE);

    let page = start(
        "productpage",
        &[("details", closed_port()), ("reviews", v2.addr)],
    );
    let body = answered(get(page.addr, "/productpage", T)).2;
    assert!(
        body.contains("details: unavailable (connection refused)"),
        "{body}"
    );
    assert!(
        body.contains("reviews: ok (reviews-v2, ratings: unavailable)"),
        "{body}"
    );
}

#[test]
fn productpage_with_reviews_down_is_still_200_and_says_unavailable() {
    let details = start("details", &[]);
    let page = start(
        "productpage",
        &[("details", details.addr), ("reviews", closed_port())],
    );
    let (status, _, body) = answered(get(page.addr, "/productpage", T));
    assert_eq!(status, 200);
    assert!(body.contains("details: ok (William Shakespeare)"), "{body}");
    assert!(
        body.contains("reviews: unavailable (connection refused)"),
        "{body}"
    );
}

#[test]
fn unknown_paths_get_404_other_methods_405_and_garbage_400() {
    let details = start("details", &[]);
    assert_eq!(answered(get(details.addr, "/productpage", T)).0, 404);
    assert_eq!(answered(get(details.addr, "/ratings/1", T)).0, 404);
    let post = raw(
        details.addr,
        b"POST /details/1 HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
    );
    assert!(
        post.starts_with("HTTP/1.1 405 ") && post.contains("allow: GET\r\n"),
        "{post}"
    );
    for garbage in [
        &b"HELLO\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /x SPDY/3\r\n\r\n",
        b"GET x HTTP/1.1\r\n\r\n",
    ] {
        let out = raw(details.addr, garbage);
        assert!(
            out.starts_with("HTTP/1.1 400 ") && out.contains("x-app: details\r\n"),
            "{out}"
        );
    }
}

#[test]
fn oversized_request_head_is_refused_with_431_and_the_app_keeps_serving() {
    let ratings = start("ratings", &[]);
    let long = format!("/ratings/{}", "1".repeat(MAX_HEAD + 100));
    assert_eq!(answered(get(ratings.addr, &long, T)).0, 431);
    assert_eq!(answered(get(ratings.addr, "/ratings/1", T)).0, 200);
}

#[test]
fn missing_upstream_is_an_error_naming_it() {
    let cfg = AppConfig {
        app: App::Reviews(2),
        listen: closed_port(),
        upstreams: BTreeMap::new(),
    };
    let err = run(cfg).unwrap_err();
    assert!(
        matches!(
            err,
            AppError::MissingUpstream {
                upstream: "ratings",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "reviews-v2 calls ratings but no --upstream ratings=IP:PORT was given"
    );
    let cfg = AppConfig {
        app: App::Productpage,
        listen: closed_port(),
        upstreams: [("details".to_string(), closed_port())]
            .into_iter()
            .collect(),
    };
    assert!(matches!(
        run(cfg),
        Err(AppError::MissingUpstream {
            upstream: "reviews",
            ..
        })
    ));
}

/// A server thread that accepts one connection, reads the request head, then does `then` with it.
fn misbehaving(then: impl FnOnce(std::net::TcpStream) + Send + 'static) -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        then(s);
    });
    addr
}

#[test]
fn client_reports_refused_for_a_closed_port() {
    let o = get(closed_port(), "/", T);
    assert_eq!(o, Outcome::Refused);
    assert_eq!(o.to_string(), "connection refused");
}

#[test]
fn client_reports_reset_when_the_server_aborts() {
    let addr = misbehaving(|s| {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let o = get(addr, "/", T);
    assert_eq!(
        (o.clone(), o.to_string().as_str()),
        (Outcome::Reset, "connection reset")
    );
}

#[test]
fn client_reports_closed_when_the_server_hangs_up_without_answering() {
    let addr = misbehaving(drop);
    let o = get(addr, "/", T);
    assert_eq!(
        (o.clone(), o.to_string().as_str()),
        (Outcome::Closed, "closed without an answer")
    );
}

#[test]
fn client_reports_timed_out_when_the_server_never_answers() {
    let addr = misbehaving(|s| {
        thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    let after = Duration::from_millis(300);
    let o = get(addr, "/", after);
    assert_eq!(o, Outcome::TimedOut { after });
    assert_eq!(o.to_string(), "timed out after 300 ms");
    assert_eq!(
        Outcome::TimedOut { after: T }.to_string(),
        "timed out after 5 s"
    );
}

#[test]
fn client_reads_answers_without_content_length_until_eof_and_names_the_app() {
    let addr = misbehaving(|mut s| {
        let _ = s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nX-App: fake\r\n\r\nno");
    });
    let o = get(addr, "/", T);
    assert_eq!(o.to_string(), "HTTP 503 from fake");
    assert_eq!(answered(o).2, "no");
}

#[test]
fn a_kept_alive_connection_is_answered_again_and_again_and_connection_close_still_closes() {
    let app = start("details", &[]);
    let mut conn = KeptAlive::open(app.addr, T).unwrap();
    for id in [1, 2, 3] {
        let (status, x_app, body) = answered(conn.get(&format!("/details/{id}")));
        assert_eq!((status, x_app.as_str()), (200, "details"));
        assert!(body.contains(&format!("\"id\":{id}")), "{body}");
    }
    // The client's `connection: close` (what `get` sends) is answered with a close.
    let answer = raw(
        app.addr,
        b"GET /details/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.contains("connection: close"), "{answer}");
    // HTTP/1.0 is not kept alive either.
    let answer = raw(app.addr, b"GET /details/1 HTTP/1.0\r\nhost: x\r\n\r\n");
    assert!(answer.contains("connection: close"), "{answer}");
}
