//! The error a channel method fails with: a reply code and text, and the
//! method it answers, closing the channel (or, for a connection error, the
//! connection).

use amq_protocol::protocol::AMQPClass;
use amq_protocol::types::ShortString;

use crate::amqp::frame::short_string;
use crate::broker::BrokerError;

/// An error from handling a frame: closes the channel or the connection.
#[derive(Debug)]
pub(crate) struct AmqpError {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    pub(crate) fn new(code: u16, text: impl Into<String>) -> Self {
        AmqpError {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Raised by `basic.publish` (class 60, method 40): for errors found
    /// in a publish's content, after the method itself was handled.
    pub(super) fn on_publish(mut self) -> Self {
        (self.class_id, self.method_id) = (60, 40);
        self
    }

    pub(super) fn on(mut self, method: &AMQPClass) -> Self {
        self.class_id = method.get_amqp_class_id();
        self.method_id = method.get_amqp_method_id();
        self
    }

    /// Whether the code is a connection-level error (the spec's "hard" errors).
    pub(crate) fn is_connection_error(&self) -> bool {
        matches!(self.code, 320 | 402 | 501..=506 | 530 | 540 | 541)
    }

    /// Reply text, cut to the 255 bytes a short string holds.
    pub(crate) fn reply_text(&self) -> ShortString {
        short_string(&self.text)
    }
}

impl From<BrokerError> for AmqpError {
    fn from(e: BrokerError) -> Self {
        AmqpError::new(e.reply_code(), e.to_string())
    }
}

/// A method only the server sends (e.g. `queue.declare-ok`) arrived from
/// the client.
pub(super) fn server_only(class: &str) -> AmqpError {
    AmqpError::new(
        503,
        format!("COMMAND_INVALID - server-side {class} method sent by client"),
    )
}

/// An exchange named by a declare argument, for the permission check (a
/// malformed one is refused by the declare itself).
pub(super) fn exchange_arg(args: &amq_protocol::types::FieldTable, key: &str) -> Option<String> {
    crate::broker::string_arg(args, key).ok().flatten()
}

pub(super) fn unexpected(what: &str) -> AmqpError {
    AmqpError::new(505, format!("UNEXPECTED_FRAME - {what}"))
}
