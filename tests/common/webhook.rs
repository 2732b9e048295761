//! A budget-alert webhook receiver on loopback, for the tests of
//! `alerts`: it records every JSON body posted to it and answers 204, or
//! (`Hang`) reads the request and holds the connection without ever
//! answering, as a webhook that hangs does.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::raw_http::{read_request_body, read_request_head};
use super::util::poll;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `204 No Content`.
    Ok,
    /// Nothing, ever: the connection is held open until the gateway
    /// gives up on it.
    Hang,
}

#[derive(Default)]
struct Seen {
    alerts: Mutex<Vec<(String, Value)>>,
    /// Connections the receiver holds open now (`Hang`).
    holding: AtomicUsize,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    seen: Arc<Seen>,
}

impl WebhookReceiver {
    pub fn start(answer: Answer) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("its address");
        let seen = Arc::new(Seen::default());
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = Arc::clone(&s);
                std::thread::spawn(move || serve(conn, answer, &s));
            }
        });
        WebhookReceiver { addr, seen }
    }

    /// The URL to configure, with a path the alerts must be posted to.
    pub fn url(&self) -> String {
        format!("http://{}/hooks/budget", self.addr)
    }

    /// Every alert received so far, in order.
    pub fn alerts(&self) -> Vec<Value> {
        self.received().into_iter().map(|(_, v)| v).collect()
    }

    /// Every alert received so far with the request target it came to.
    pub fn received(&self) -> Vec<(String, Value)> {
        self.seen.alerts.lock().expect("alerts").clone()
    }

    /// Waits until at least `n` alerts arrived; returns them all.
    pub fn wait_alerts(&self, n: usize, timeout: Duration) -> Vec<Value> {
        poll(timeout, &format!("{n} alert(s) at the webhook"), || {
            let a = self.alerts();
            (a.len() >= n).then_some(a)
        })
    }

    /// Connections held open without an answer now.
    pub fn holding(&self) -> usize {
        self.seen.holding.load(Ordering::SeqCst)
    }
}

fn serve(conn: TcpStream, answer: Answer, seen: &Seen) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
    let Ok(Some(head)) = read_request_head(&mut reader) else {
        return;
    };
    let mut body = Vec::new();
    if read_request_body(&mut reader, &head, &mut |b| body.extend_from_slice(b)).is_err() {
        return;
    }
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.alerts
        .lock()
        .expect("alerts")
        .push((format!("{} {}", head.method, head.target), value));
    match answer {
        Answer::Ok => {
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
        Answer::Hang => {
            seen.holding.fetch_add(1, Ordering::SeqCst);
            // Until the gateway closes its end.
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
            seen.holding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
