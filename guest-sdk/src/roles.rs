//! The three things a plugin can be: a router (exchange type), a filter (per
//! binding) and a transform (per exchange, before routing).

use crate::{Error, FieldTable, Message, Properties};

/// The host's handle for one binding of an exchange. Routers return these.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BindingId(pub u32);

/// The exchange a router or transform instance serves.
#[derive(Debug)]
pub struct Exchange<'a> {
    /// The exchange name.
    pub name: &'a str,
    /// The exchange's declare arguments.
    pub arguments: &'a FieldTable,
}

/// Where a binding delivers: stable across restarts and hot swaps, unlike
/// the [`BindingId`], so it is what a router should hash or sort on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target<'a> {
    /// A queue, by name.
    Queue(&'a str),
    /// An exchange, by name (exchange-to-exchange binding).
    Exchange(&'a str),
}

impl<'a> Target<'a> {
    /// The queue or exchange name.
    pub fn name(&self) -> &'a str {
        match self {
            Target::Queue(n) | Target::Exchange(n) => n,
        }
    }
}

/// One binding, as given to [`Router::bind`] and [`Router::unbind`].
#[derive(Debug)]
pub struct Binding<'a> {
    /// The host's id for the binding; route to it by pushing it.
    pub id: BindingId,
    /// The binding key.
    pub key: &'a str,
    /// Where the binding delivers.
    pub target: Target<'a>,
    /// The binding arguments.
    pub arguments: &'a FieldTable,
}

/// The binding a filter instance guards.
#[derive(Debug)]
pub struct Subscription<'a> {
    /// The exchange the binding belongs to.
    pub exchange: &'a str,
    /// The binding key.
    pub key: &'a str,
    /// The binding arguments (the filter's parameters live here).
    pub arguments: &'a FieldTable,
}

/// An exchange type: keeps its own index of bindings and picks the bindings
/// each message goes to.
///
/// One instance serves one exchange. The host may run several instances of
/// the same exchange side by side (one per core) and replays the bindings
/// into each, so a router must not count on seeing every message.
pub trait Router: Sized + 'static {
    /// `true` when [`Router::route`] depends only on the routing key and the
    /// bindings (not on headers, body, time or chance). The host then caches
    /// decisions per routing key until the bindings change.
    const DETERMINISTIC: bool = false;

    /// Called when an exchange of this type is declared (or its instance is
    /// rebuilt). An error refuses the declaration with the message.
    fn new(exchange: &Exchange<'_>) -> Result<Self, Error>;

    /// A binding was added. An error refuses the binding with the message.
    fn bind(&mut self, binding: &Binding<'_>) -> Result<(), Error>;

    /// A binding was removed (it is the same key and arguments as bound).
    fn unbind(&mut self, binding: &Binding<'_>);

    /// Push the bindings `message` goes to. Pushing an id twice is harmless.
    fn route(&mut self, message: &Message<'_>, out: &mut Destinations);
}

/// A per-binding filter, like an SNS subscription filter policy: it sees each
/// message the exchange routed to its binding and says whether it passes.
pub trait Filter: Sized + 'static {
    /// Called when the binding is added; the parameters are in its arguments.
    fn new(subscription: &Subscription<'_>) -> Result<Self, Error>;

    /// `true` to deliver through the binding, `false` to drop it there.
    fn filter(&mut self, message: &Message<'_>) -> bool;
}

/// A per-exchange transform that runs before routing.
pub trait Transform: Sized + 'static {
    /// Called when the exchange is declared with this transform.
    fn new(exchange: &Exchange<'_>) -> Result<Self, Error>;

    /// Decide what happens to the message.
    fn transform(&mut self, message: &Message<'_>) -> Outcome;
}

/// What a [`Transform`] decided.
// One per message, returned by value and encoded at once: boxing the big
// variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Route the message as it is.
    Keep,
    /// Route a rewritten message.
    Rewrite(Rewrite),
    /// Drop the message (counted by the broker; not an error).
    Drop,
    /// Dead-letter the message; the reason goes into its headers.
    DeadLetter(String),
}

/// The header a delayed exchange (`x-delayed-message`) reads a message's
/// delay from, in milliseconds.
pub const DELAY_HEADER: &str = "x-delay";

impl Outcome {
    /// Hold `message` for `ms` milliseconds before it is routed: a rewrite
    /// that sets its [`DELAY_HEADER`]. A delayed exchange reads the header
    /// after its transform, so a transform on an `x-delayed-message`
    /// exchange decides each message's delay (a retry's back-off, say); on
    /// another exchange the header takes effect where the message reaches
    /// a delayed one. `ms` past 2^32 - 1 (49.7 days) is refused by the
    /// broker; 0 routes at once.
    pub fn delay(message: &Message<'_>, ms: u64) -> Outcome {
        let mut properties = message.properties().clone();
        let mut headers = properties.headers.take().unwrap_or_default();
        headers.insert(DELAY_HEADER, i64::try_from(ms).unwrap_or(i64::MAX));
        properties.headers = Some(headers);
        Outcome::Rewrite(Rewrite {
            routing_key: None,
            properties: Some(properties),
            body: None,
        })
    }
}

/// The parts of a message a transform replaces; `None` keeps the original.
#[derive(Debug, Default, PartialEq)]
pub struct Rewrite {
    /// A new routing key (at most 255 bytes).
    pub routing_key: Option<String>,
    /// New properties, replacing all of the old ones.
    pub properties: Option<Properties>,
    /// A new body.
    pub body: Option<Vec<u8>>,
}

/// Where a router writes its decision: the ids of the chosen bindings.
///
/// In the broker this writes straight into the reply buffer, so routing
/// allocates nothing per message.
#[derive(Debug)]
pub struct Destinations {
    bytes: Vec<u8>,
    start: usize,
}

impl Default for Destinations {
    fn default() -> Self {
        Self::new()
    }
}

impl Destinations {
    /// An empty decision (for tests).
    pub fn new() -> Self {
        Destinations {
            bytes: Vec::new(),
            start: 0,
        }
    }

    #[doc(hidden)]
    pub fn over(bytes: Vec<u8>) -> Self {
        let start = bytes.len();
        Destinations { bytes, start }
    }

    #[doc(hidden)]
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Route the message to `binding`.
    #[inline]
    pub fn push(&mut self, binding: BindingId) {
        self.bytes.extend_from_slice(&binding.0.to_le_bytes());
    }

    /// The chosen bindings, in the order pushed.
    pub fn ids(&self) -> Vec<BindingId> {
        self.bytes[self.start..]
            .chunks_exact(4)
            .map(|c| BindingId(u32::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }

    /// The chosen bindings, sorted and without repeats (handy in tests).
    pub fn sorted(&self) -> Vec<BindingId> {
        let mut ids = self.ids();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Forget the chosen bindings, keeping the allocation (for reuse).
    pub fn clear(&mut self) {
        self.bytes.truncate(self.start);
    }

    /// Whether no binding was chosen.
    pub fn is_empty(&self) -> bool {
        self.bytes.len() == self.start
    }
}
