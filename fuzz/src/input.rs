//! Inputs for the fuzz targets: AMQP that is mostly well-formed, so that it
//! gets past the decoder into the broker, then mutated.
//!
//! A purely random byte string dies at the first frame header. So frames
//! are built from a grammar of the client methods' field layouts, with
//! values drawn from what makes the broker do work (names of queues and
//! exchanges that exist, queue arguments it parses, properties it reads)
//! and from what has broken parsers before: field tables nested thousands
//! deep, strings of 255 bytes ending inside a UTF-8 character, invalid
//! UTF-8, lengths of 0 and 2^32 - 1, body sizes past any limit. Then a
//! case is mutated (bits flipped, bytes cut, inserted or repeated, length
//! fields overwritten) so that the decoder's error paths run too.
//!
//! Every case comes from a 64-bit seed, so a failure is replayed from its
//! seed alone.

/// SplitMix64: small, fast, and enough for drawing fuzz inputs (no
/// statistical or cryptographic claims are needed here).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The seed of case `index` of a run seeded `seed`.
pub fn case_seed(seed: u64, index: u64) -> u64 {
    Rng::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407)).next_u64()
}

/// Names the broker knows or reserves, and strings that broke things.
fn short_strings() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "",
        "q",
        "q2",
        "x",
        "dlx",
        "amq.direct",
        "amq.topic",
        "amq.fanout",
        "amq.headers",
        "amq.match",
        "amq.gen-1",
        "amq.rabbitmq.trace",
        "direct",
        "topic",
        "fanout",
        "headers",
        "no-such-type",
        "/",
        "a.b.c",
        "#",
        "*.x",
        "ctag",
        "PLAIN",
        "AMQPLAIN",
        "en_US",
        "guest",
        "0",
        "1000",
        "-1",
        "classic",
        "quorum",
        "reject-publish-dlx",
        "drop-head",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push(vec![b'n'; 255]);
    // 255 bytes: 'a' then 127 two-byte characters; cut at 255 mid-way.
    v.push(format!("a{}", "é".repeat(127)).into_bytes());
    v.push(vec![0xff, 0xfe, 0x80]);
    v.push(b"\0\0".to_vec());
    v
}

const ARG_KEYS: &[&str] = &[
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-message-ttl",
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-priority",
    "x-queue-type",
    "x-match",
    "x-single-active-consumer",
    "alternate-exchange",
    "x-wasmq-filter",
    "x-death",
    "capabilities",
    "consumer_cancel_notify",
    "LOGIN",
    "PASSWORD",
    "k",
];

/// Field layouts of the methods a client sends (and a few it must not):
/// `o` octet (bits too), `u` short, `l` long, `L` long long, `s` short
/// string, `S` long string, `t` field table.
const METHODS: &[(u16, u16, &str)] = &[
    (10, 10, "ootSS"),
    (10, 11, "tsSs"),
    (10, 31, "ulu"),
    (10, 40, "sso"),
    (10, 50, "usuu"),
    (10, 51, ""),
    (10, 70, "Ss"),
    (20, 10, "s"),
    (20, 20, "o"),
    (20, 21, "o"),
    (20, 40, "usuu"),
    (20, 41, ""),
    (40, 10, "ussot"),
    (40, 20, "uso"),
    (40, 30, "usssot"),
    (40, 40, "usssot"),
    (50, 10, "usot"),
    (50, 20, "usssot"),
    (50, 30, "uso"),
    (50, 40, "uso"),
    (50, 50, "ussst"),
    (60, 10, "luo"),
    (60, 20, "ussot"),
    (60, 30, "so"),
    (60, 40, "usso"),
    (60, 70, "uso"),
    (60, 80, "Lo"),
    (60, 90, "Lo"),
    (60, 100, "o"),
    (60, 110, "o"),
    (60, 120, "Lo"),
    (85, 10, "o"),
    (90, 10, ""),
    (90, 20, ""),
    (90, 30, ""),
];

/// Draws cases.
#[derive(Debug)]
pub struct Gen {
    rng: Rng,
    strings: Vec<Vec<u8>>,
}

impl Gen {
    /// A generator for one case.
    pub fn new(seed: u64) -> Self {
        Gen {
            rng: Rng::new(seed),
            strings: short_strings(),
        }
    }

    /// The generator's random source.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn short_string(&mut self, out: &mut Vec<u8>) {
        let s = self.rng.pick(&self.strings).clone();
        let s = if self.rng.one_in(10) {
            let n = self.rng.below(256);
            (0..n).map(|_| self.rng.next_u64() as u8).collect()
        } else {
            s
        };
        out.push(s.len().min(255) as u8);
        out.extend_from_slice(&s[..s.len().min(255)]);
    }

    fn long_string(&mut self, out: &mut Vec<u8>) {
        let s: Vec<u8> = match self.rng.below(4) {
            0 => b"\0guest\0guest".to_vec(),
            1 => self.rng.pick(&self.strings).clone(),
            2 => {
                // An AMQPLAIN response: a table body.
                let t = self.table(2);
                t[4..].to_vec()
            }
            _ => (0..self.rng.below(64))
                .map(|_| self.rng.next_u64() as u8)
                .collect(),
        };
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(&s);
    }

    /// A text of a few bytes, sometimes not UTF-8.
    fn text(&mut self) -> String {
        let s = self.rng.pick(&self.strings).clone();
        String::from_utf8_lossy(&s).into_owned()
    }

    /// A frame of the message traffic between cluster nodes, well formed
    /// (the caller mutates half of them).
    pub fn traffic(&mut self) -> Vec<u8> {
        use wasmq::nodes::remote::{Origin, QueueAnswer, Settlement, Traffic};
        let origin = Origin {
            conn: self.rng.next_u64(),
            channel: self.rng.next_u64() as u16,
        };
        let body: bytes::Bytes = (0..self.rng.below(64))
            .map(|_| self.rng.next_u64() as u8)
            .collect::<Vec<u8>>()
            .into();
        let properties = bytes::Bytes::from(self.properties());
        let t = match self.rng.below(10) {
            0 => Traffic::Forward {
                origin,
                seq: self.rng.next_u64(),
                vhost: self.text(),
                queues: (0..self.rng.below(4)).map(|_| self.text()).collect(),
                exchange: self.text(),
                routing_key: self.text(),
                properties,
                body,
            },
            1 => Traffic::Forwarded {
                origin,
                seq: self.rng.next_u64(),
                ok: self.rng.one_in(2),
            },
            2 => Traffic::Consume {
                origin,
                tag: self.text(),
                vhost: self.text(),
                queue: self.text(),
                prefetch: self.rng.next_u64() as u32,
                no_ack: self.rng.one_in(2),
                exclusive: self.rng.one_in(2),
                // A table's body, as a consume's arguments travel.
                arguments: self.table(3).split_off(4).into(),
            },
            3 => Traffic::Refused {
                origin,
                tag: self.text(),
                code: self.rng.next_u64() as u16,
                text: self.text(),
            },
            4 => Traffic::Cancel {
                origin,
                tag: self.text(),
            },
            5 => Traffic::Deliver {
                origin,
                tag: self.text(),
                id: self.rng.next_u64(),
                redelivered: self.rng.one_in(2),
                exchange: self.text(),
                routing_key: self.text(),
                properties,
                body,
            },
            6 => Traffic::Settle {
                how: *self
                    .rng
                    .pick(&[Settlement::Ack, Settlement::Requeue, Settlement::Reject]),
                ids: (0..self.rng.below(8))
                    .map(|_| self.rng.next_u64())
                    .collect(),
            },
            7 => Traffic::Get {
                origin,
                vhost: self.text(),
                queue: self.text(),
                no_ack: self.rng.one_in(2),
            },
            8 => Traffic::Purge {
                origin,
                vhost: self.text(),
                queue: self.text(),
            },
            _ => Traffic::Answer {
                origin,
                outcome: match self.rng.below(4) {
                    0 => QueueAnswer::Empty,
                    1 => QueueAnswer::Purged {
                        message_count: self.rng.next_u64() as u32,
                    },
                    2 => QueueAnswer::Error {
                        code: self.rng.next_u64() as u16,
                        text: self.text(),
                    },
                    _ => QueueAnswer::Message {
                        id: self.rng.next_u64(),
                        redelivered: self.rng.one_in(2),
                        exchange: self.text(),
                        routing_key: self.text(),
                        message_count: self.rng.next_u64() as u32,
                        properties,
                        body,
                    },
                },
            },
        };
        t.encode().to_vec()
    }

    /// A field table (length first); `depth` bounds ordinary nesting, and
    /// now and then one entry is an array nested thousands deep.
    pub fn table(&mut self, depth: usize) -> Vec<u8> {
        let mut body = Vec::new();
        for _ in 0..self.rng.below(5) {
            let key = self.rng.pick(ARG_KEYS).as_bytes();
            body.push(key.len() as u8);
            body.extend_from_slice(key);
            self.value(&mut body, depth);
        }
        if self.rng.one_in(20) {
            body.extend_from_slice(b"\x01d");
            body.extend_from_slice(&deep_array(self.rng.below(20_000) + 1));
        }
        let mut t = (body.len() as u32).to_be_bytes().to_vec();
        t.extend_from_slice(&body);
        t
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) {
        let kinds: &[u8] = if depth == 0 {
            b"tbBsuIilLfdDSTxV"
        } else {
            b"tbBsuIilLfdDSTxVFAFA"
        };
        let kind = *self.rng.pick(kinds);
        out.push(kind);
        let r = self.rng.next_u64();
        match kind {
            b't' | b'b' | b'B' => out.push(r as u8),
            b's' | b'u' => out.extend_from_slice(&(r as u16).to_be_bytes()),
            b'I' | b'i' | b'f' => {
                let v = *self
                    .rng
                    .pick(&[0u32, 1, 1000, u32::MAX, i32::MAX as u32, r as u32]);
                out.extend_from_slice(&v.to_be_bytes());
            }
            b'l' | b'L' | b'd' | b'T' => {
                let v = *self
                    .rng
                    .pick(&[0u64, 1, 60_000, u64::MAX, i64::MAX as u64, r]);
                out.extend_from_slice(&v.to_be_bytes());
            }
            b'D' => out.extend_from_slice(&r.to_be_bytes()[..5]),
            b'S' | b'x' => self.long_string(out),
            b'F' => {
                let t = self.table(depth - 1);
                out.extend_from_slice(&t);
            }
            b'A' => {
                let mut items = Vec::new();
                for _ in 0..self.rng.below(4) {
                    self.value(&mut items, depth - 1);
                }
                out.extend_from_slice(&(items.len() as u32).to_be_bytes());
                out.extend_from_slice(&items);
            }
            _ => {}
        }
    }

    /// Encoded basic properties: random flags, each present field drawn.
    pub fn properties(&mut self) -> Vec<u8> {
        let flags = (self.rng.next_u64() as u16) & 0xFFFC;
        let mut out = flags.to_be_bytes().to_vec();
        for bit in (2..16).rev() {
            if flags & (1 << bit) == 0 {
                continue;
            }
            match bit {
                13 => {
                    let t = self.table(3);
                    out.extend_from_slice(&t);
                }
                12 | 11 => out.push(*self.rng.pick(&[0u8, 1, 2, 9, 255])),
                6 => out.extend_from_slice(&self.rng.next_u64().to_be_bytes()),
                8 => {
                    // expiration: a number of ms, or not.
                    let e = self
                        .rng
                        .pick(&["0", "100", "-5", "x", "99999999999999999999"]);
                    out.push(e.len() as u8);
                    out.extend_from_slice(e.as_bytes());
                }
                _ => self.short_string(&mut out),
            }
        }
        out
    }

    fn method(&mut self, out: &mut Vec<u8>, channel: u16) {
        let &(class, method, fields) = self.rng.pick(METHODS);
        let mut p = Vec::new();
        p.extend_from_slice(&class.to_be_bytes());
        p.extend_from_slice(&method.to_be_bytes());
        for f in fields.bytes() {
            let r = self.rng.next_u64();
            match f {
                b'o' => p.push(r as u8 & 0x0F),
                b'u' => {
                    let v = *self.rng.pick(&[0u16, 1, 10, 200, u16::MAX, r as u16]);
                    p.extend_from_slice(&v.to_be_bytes());
                }
                b'l' => {
                    let v = *self.rng.pick(&[0u32, 1, 4096, 131_072, u32::MAX, r as u32]);
                    p.extend_from_slice(&v.to_be_bytes());
                }
                b'L' => {
                    let v = *self.rng.pick(&[0u64, 1, 2, 3, u64::MAX, r % 100]);
                    p.extend_from_slice(&v.to_be_bytes());
                }
                b's' => self.short_string(&mut p),
                b'S' => self.long_string(&mut p),
                _ => {
                    let t = self.table(3);
                    p.extend_from_slice(&t);
                }
            }
        }
        frame(out, 1, channel, &p);
    }

    /// A publish with its content: a header whose announced size matches
    /// the body frames that follow, or not.
    fn content(&mut self, out: &mut Vec<u8>, channel: u16) {
        let body_len = *self.rng.pick(&[0usize, 1, 100, 5000, 200_000]);
        let announced = match self.rng.below(6) {
            0 => u64::MAX,
            1 => body_len as u64 + 1,
            2 => 1 << 40,
            _ => body_len as u64,
        };
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&announced.to_be_bytes());
        p.extend_from_slice(&self.properties());
        frame(out, 2, channel, &p);
        let chunk = *self.rng.pick(&[1usize, 4000, 131_064, 200_000]);
        let body = vec![self.rng.next_u64() as u8; body_len];
        for part in body.chunks(chunk.max(1)) {
            frame(out, 3, channel, part);
        }
    }

    /// A stream of frames for an open connection: channels opened, then
    /// methods and publishes on channels 0 to 3.
    pub fn frames(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for ch in 1..=self.rng.below(3) as u16 + 1 {
            frame(&mut out, 1, ch, &[0, 20, 0, 10, 0]);
        }
        for _ in 0..self.rng.below(12) + 1 {
            let channel = *self.rng.pick(&[1u16, 1, 1, 2, 3, 0]);
            match self.rng.below(10) {
                0..=5 => self.method(&mut out, channel),
                6 | 7 => {
                    let mut p = vec![0, 60, 0, 40, 0, 0];
                    self.short_string(&mut p);
                    self.short_string(&mut p);
                    p.push(self.rng.next_u64() as u8 & 3);
                    frame(&mut out, 1, channel, &p);
                    self.content(&mut out, channel);
                }
                8 => frame(&mut out, 8, channel, &[]),
                _ => {
                    let kind = self.rng.next_u64() as u8;
                    let n = self.rng.below(32);
                    let junk: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                    frame(&mut out, kind, channel, &junk);
                }
            }
        }
        out
    }

    /// What a client sends before it is logged in: the protocol header
    /// (usually ours), a start-ok, a tune-ok, an open, each drawn.
    pub fn handshake(&mut self) -> Vec<u8> {
        let mut out = if self.rng.one_in(8) {
            (0..8).map(|_| self.rng.next_u64() as u8).collect()
        } else {
            wasmq::amqp::frame::PROTOCOL_HEADER.to_vec()
        };
        for _ in 0..self.rng.below(4) + 1 {
            match self.rng.below(5) {
                0 | 1 => {
                    let mut p = vec![0, 10, 0, 11];
                    let t = self.table(4);
                    p.extend_from_slice(&t);
                    p.extend_from_slice(b"\x05PLAIN");
                    self.long_string(&mut p);
                    self.short_string(&mut p);
                    frame(&mut out, 1, 0, &p);
                }
                2 => self.method(&mut out, 0),
                3 => frame(&mut out, 1, 0, &[0, 10, 0, 31, 0, 16, 0, 2, 0, 0, 0, 0]),
                _ => {
                    let mut p = vec![0, 10, 0, 40];
                    self.short_string(&mut p);
                    p.extend_from_slice(&[0, 0]);
                    frame(&mut out, 1, 0, &p);
                }
            }
        }
        out
    }

    /// What a peer sends the cluster port before it has proven anything:
    /// hellos (4-byte little-endian length, JSON) with the protocol and
    /// node names drawn from what has broken logs and allocators (a
    /// newline starting a forged line, names of megabytes announced,
    /// lengths past every bound), sometimes a proof after them.
    pub fn cluster_hello(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..self.rng.below(3) + 1 {
            let protocol = match self.rng.below(4) {
                0 => "wasmq-cluster/2".to_owned(),
                1 => self.text(),
                _ => "wasmq-cluster/3".to_owned(),
            };
            let node = match self.rng.below(6) {
                0 => "n2\n2026-01-01T00:00:00Z  INFO wasmq::admin: FORGED".to_owned(),
                1 => "x".repeat(self.rng.below(8192)),
                2 => "\u{1b}[2J\u{202e}".to_owned(),
                3 => self.text(),
                _ => format!("node-{}", self.rng.below(100)),
            };
            let nonce: Vec<u8> = (0..32).map(|_| self.rng.next_u64() as u8).collect();
            let body = if self.rng.one_in(4) {
                serde_json::json!({ "proof": nonce })
                    .to_string()
                    .into_bytes()
            } else {
                serde_json::json!({ "protocol": protocol, "node": node, "nonce": nonce })
                    .to_string()
                    .into_bytes()
            };
            let len = match self.rng.below(6) {
                0 => 64u32 << 20,
                1 => u32::MAX,
                _ => body.len() as u32,
            };
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    /// An HTTP/1.1 request to the admin port by someone not logged in:
    /// every path the API has (and some it has not), wrong methods,
    /// headers long, many or malformed, bodies whose length lies, chunked
    /// encodings that are not, bad credentials.
    pub fn http_request(&mut self) -> Vec<u8> {
        let method = *self.rng.pick(&[
            "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "G\0T", "OPTIONS",
        ]);
        let name = match self.rng.below(4) {
            0 => "x".repeat(self.rng.below(6000)),
            1 => "%2F".to_owned(),
            2 => "..%2F..%2Fetc".to_owned(),
            _ => "direct".to_owned(),
        };
        let path = match self.rng.below(14) {
            0 => "/metrics".to_owned(),
            1 => "/ready".to_owned(),
            2 => "/api/overview".to_owned(),
            3 => format!("/api/plugins/{name}/logs?follow=true"),
            4 => format!("/api/plugins/{name}"),
            5 => format!("/api/exchanges/%2F/{name}/capture"),
            6 => "/api/traces".to_owned(),
            7 => "/api/definitions".to_owned(),
            8 => format!("/api/queues/%2F/{name}/members/n2"),
            9 => format!("/api/plugins/{name}/candidate?mode=canary&percent=-1"),
            10 => "/".repeat(self.rng.below(3000) + 1),
            11 => "/api/cluster".to_owned(),
            12 => format!("/api/plugins/{name}/wasm"),
            _ => String::from_utf8_lossy(self.rng.pick(&self.strings).clone().as_slice())
                .into_owned(),
        };
        let version = *self
            .rng
            .pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9"]);
        let mut out = format!("{method} {path} {version}\r\nHost: wasmq\r\n").into_bytes();
        let body: Vec<u8> = match self.rng.below(4) {
            0 => b"[]".to_vec(),
            1 => b"{\"count\": 1, \"max_bytes\": 0}".to_vec(),
            2 => (0..self.rng.below(512))
                .map(|_| self.rng.next_u64() as u8)
                .collect(),
            _ => Vec::new(),
        };
        for _ in 0..self.rng.below(6) {
            let header: Vec<u8> = match self.rng.below(8) {
                0 => format!("Content-Length: {}\r\n", body.len()).into_bytes(),
                1 => format!("Content-Length: {}\r\n", self.rng.next_u64()).into_bytes(),
                2 => b"Transfer-Encoding: chunked\r\n".to_vec(),
                3 => b"Authorization: Basic Z3Vlc3Q6d3Jvbmc=\r\n".to_vec(),
                4 => format!(
                    "Authorization: Basic {}\r\n",
                    "A".repeat(self.rng.below(70_000))
                )
                .into_bytes(),
                5 => format!("X-Long: {}\r\n", "v".repeat(self.rng.below(100_000))).into_bytes(),
                6 => b"Connection: keep-alive\r\n".to_vec(),
                _ => {
                    let mut h = b"X-Bytes: ".to_vec();
                    h.extend((0..self.rng.below(64)).map(|_| self.rng.next_u64() as u8));
                    h.extend_from_slice(b"\r\n");
                    h
                }
            };
            out.extend_from_slice(&header);
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }

    /// A stream of RESP commands to the Redis front end: half of them log
    /// in first; well-formed commands of every kind it serves (and some it
    /// refuses), inline commands, and hostile lengths: multibulks of 2^31
    /// elements, bulks past the limit, nested arrays, unterminated lines.
    pub fn resp(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.rng.one_in(2) {
            resp_command(&mut out, &[b"AUTH", b"guest", b"guest"]);
        }
        let keys: [&[u8]; 4] = [b"q", b"fuzz.list", b"", b"news.*"];
        for _ in 0..self.rng.below(12) + 1 {
            let key = *self.rng.pick(&keys);
            let value: Vec<u8> = (0..self.rng.below(300))
                .map(|_| self.rng.next_u64() as u8)
                .collect();
            let count = self.rng.below(5).to_string();
            let timeout = *self.rng.pick(&["0.01", "0", "-1", "soon", "1e400", "0.05"]);
            match self.rng.below(22) {
                0 => resp_command(&mut out, &[b"LPUSH", key, &value, &value]),
                1 => resp_command(&mut out, &[b"RPUSH", key, &value]),
                2 => resp_command(&mut out, &[b"RPOP", key, count.as_bytes()]),
                3 => resp_command(&mut out, &[b"LPOP", key]),
                4 => resp_command(&mut out, &[b"BRPOP", key, b"q", timeout.as_bytes()]),
                5 => resp_command(&mut out, &[b"LMOVE", key, b"q", b"RIGHT", b"LEFT"]),
                6 => resp_command(
                    &mut out,
                    &[b"BLMOVE", key, b"q", b"RIGHT", b"UP", timeout.as_bytes()],
                ),
                7 => resp_command(&mut out, &[b"SUBSCRIBE", key, &value]),
                8 => resp_command(&mut out, &[b"PSUBSCRIBE", key]),
                9 => resp_command(&mut out, &[b"PUBLISH", key, &value]),
                10 => resp_command(&mut out, &[b"UNSUBSCRIBE"]),
                11 => resp_command(
                    &mut out,
                    &[
                        b"HELLO",
                        *self.rng.pick::<&[u8]>(&[b"3", b"2", b"9"]),
                        b"AUTH",
                        b"guest",
                        &value,
                    ],
                ),
                12 => resp_command(&mut out, &[b"CLIENT", b"SETNAME", &value]),
                13 => resp_command(&mut out, &[b"PUBSUB", b"CHANNELS", key]),
                14 => resp_command(&mut out, &[b"DEL", key, b"q"]),
                15 => resp_command(&mut out, &[b"COMMAND", b"INFO", b"lpush", &value]),
                16 => resp_command(&mut out, &[b"INFO"]),
                17 => {
                    // Inline, sometimes with quotes that do not close.
                    out.extend_from_slice(self.rng.pick::<&[u8]>(&[
                        b"PING\r\n",
                        b"LPUSH q \"a b\" 'c'\n",
                        b"ECHO \"\\x4",
                        b"  \r\n",
                    ]));
                }
                18 => out.extend_from_slice(self.rng.pick::<&[u8]>(&[
                    b"*2147483648\r\n",
                    b"*-1\r\n",
                    b"*1\r\n$536870913\r\n",
                    b"*1\r\n$-7\r\n",
                    b"*1\r\n*1\r\n$1\r\nx\r\n",
                    b"*1048577\r\n",
                    b"*3\r\n$1\r\n",
                ])),
                19 => out.extend(
                    std::iter::repeat_n(b"*1\r\n".iter().copied(), self.rng.below(2000)).flatten(),
                ),
                20 => out.extend(std::iter::repeat_n(b'a', self.rng.below(70_000))),
                _ => {
                    let name = self.text();
                    resp_command(&mut out, &[name.as_bytes(), key]);
                }
            }
        }
        out
    }

    /// Change `bytes` the way a broken or hostile peer would: flip bits,
    /// cut, insert, repeat a range, or overwrite a length with an extreme.
    pub fn mutate(&mut self, bytes: &mut Vec<u8>) {
        for _ in 0..self.rng.below(4) + 1 {
            if bytes.is_empty() {
                bytes.push(self.rng.next_u64() as u8);
                continue;
            }
            let at = self.rng.below(bytes.len());
            match self.rng.below(6) {
                0 => bytes[at] ^= 1 << self.rng.below(8),
                1 => bytes.truncate(at),
                2 => {
                    let n = self.rng.below(16) + 1;
                    let junk: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                    bytes.splice(at..at, junk);
                }
                3 => {
                    let end = (at + self.rng.below(64) + 1).min(bytes.len());
                    let copy = bytes[at..end].to_vec();
                    bytes.splice(end..end, copy);
                }
                4 => {
                    let v = *self.rng.pick(&[0u32, 1, 0x7FFF_FFFF, u32::MAX, 255, 256]);
                    let end = (at + 4).min(bytes.len());
                    let b = v.to_be_bytes();
                    bytes[at..end].copy_from_slice(&b[..end - at]);
                }
                _ => bytes[at] = *self.rng.pick(&[0u8, 0xCE, 0xFF, b'F', b'A', b'S']),
            }
        }
    }
}

/// Append a RESP multibulk command.
pub fn resp_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Append a frame of `kind` on `channel` around `payload`.
pub fn frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
}

/// The value of an array nested `levels` deep (its type octet first),
/// built without recursion.
pub fn deep_array(levels: usize) -> Vec<u8> {
    // Level k, counted from the innermost (an empty array, 5 bytes), takes
    // 5k bytes: its type octet and length, then level k - 1.
    let mut out = Vec::with_capacity(levels * 5);
    for k in (2..=levels.max(1)).rev() {
        out.push(b'A');
        out.extend_from_slice(&(5 * (k as u32 - 1)).to_be_bytes());
    }
    out.extend_from_slice(b"A\0\0\0\0");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_arrays_nest_as_asked() {
        let mut t = b"\x01d".to_vec();
        t.extend_from_slice(&deep_array(3));
        let mut framed = (t.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&t);
        let (rest, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            wasmq::amqp::field_table::value_depth(&amq_protocol::types::AMQPValue::FieldTable(
                table
            )),
            4
        );
    }

    #[test]
    fn cases_replay_from_their_seed() {
        let a = Gen::new(case_seed(7, 3)).frames();
        let b = Gen::new(case_seed(7, 3)).frames();
        assert_eq!(a, b);
        assert_ne!(a, Gen::new(case_seed(7, 4)).frames());
    }

    #[test]
    fn generated_frames_mostly_decode() {
        let mut whole = 0;
        for i in 0..200 {
            let mut buf = bytes::BytesMut::from(&Gen::new(case_seed(1, i)).frames()[..]);
            let mut ok = true;
            while !buf.is_empty() {
                match wasmq::amqp::frame::decode(&mut buf, 1 << 20) {
                    Ok(Some(_)) => {}
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            whole += usize::from(ok);
        }
        assert!(whole > 20, "only {whole} of 200 streams decode whole");
    }
}
