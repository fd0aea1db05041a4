//! The tests' one raw HTTP client, for servers whose API a test calls directly (the agent's admin
//! endpoints, Prometheus, witnesses, OpenBao, pods). HTTP/1.0, a request per connection: the
//! server ends its answer by closing the connection and never sends it chunked, so the whole
//! answer is what `read_to_string` returns.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

/// How long a read may wait for the server.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One request (`method path`, extra `headers`, `body`): the whole response (status line,
/// headers, body); None when the server cannot be reached, or a write or read fails.
pub fn raw(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// The status and body of a response; None when it is not HTTP/1.x.
pub fn parse(response: &str) -> Option<(u16, String)> {
    // "HTTP/1.x NNN reason": any HTTP/1 minor version.
    let status = response.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// [`raw`] then [`parse`]: the status and body.
pub fn request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    parse(&raw(addr, method, path, headers, body)?)
}
