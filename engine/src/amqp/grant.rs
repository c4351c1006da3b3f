//! The identity a channel checks its methods against, and the 403 it
//! answers with: the AMQP side of [`crate::access`].

use std::sync::Arc;

use super::AmqpError;
use crate::access::{Access, Permissions, resource_name};

/// The identity a channel checks against.
#[derive(Clone, Debug)]
pub(crate) struct Grant {
    /// The user.
    pub user: String,
    /// The connection's vhost.
    pub vhost: String,
    /// The user's permissions there.
    pub permissions: Arc<Permissions>,
    /// Tagged `impersonator` (RabbitMQ's tag): may publish with any
    /// `user-id` property.
    pub impersonator: bool,
    /// Tagged `administrator` or `monitoring`: a publish carrying
    /// `x-wasmq-trace` is traced (the admin API shows the trace).
    pub tracer: bool,
}

impl Grant {
    /// Allow `access` to the `kind` (`exchange` or `queue`) named `name`,
    /// or refuse it with 403 in RabbitMQ's words.
    pub(crate) fn check(&self, access: Access, kind: &str, name: &str) -> Result<(), AmqpError> {
        if self.permissions.allows(access, name) {
            return Ok(());
        }
        let name = resource_name(name);
        Err(AmqpError::new(
            403,
            format!(
                "ACCESS_REFUSED - {} access to {kind} '{name}' in vhost '{}' refused for user '{}'",
                access.as_str(),
                self.vhost,
                self.user
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Pattern;

    #[test]
    fn a_refusal_names_the_access_the_resource_and_the_user() {
        let g = Grant {
            tracer: false,
            user: "app".into(),
            vhost: "/".into(),
            permissions: Arc::new(Permissions::Patterns {
                configure: Pattern::new("").unwrap(),
                write: Pattern::new("x").unwrap(),
                read: Pattern::new("").unwrap(),
            }),
            impersonator: false,
        };
        assert!(g.check(Access::Write, "exchange", "box").is_ok());
        let e = g.check(Access::Write, "exchange", "").unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.text,
            "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'app'"
        );
    }
}
