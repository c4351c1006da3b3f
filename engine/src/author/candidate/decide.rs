//! The publish path's side of a staged rollout: at each decision (route,
//! transform, filter), which version decides, and the shadow's sample.
//! Each function is the serving version's call when nothing is staged;
//! the staged branch is out of line.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{By, Job, Trial};
use crate::broker::exchange::{Binding, Exchange};
use crate::message::Message;
use crate::plugin::{FilterPlugin, PluginFault, TransformDecision, TransformPlugin};

/// The routing step with a staged router: the candidate routes a canary's
/// share, the serving router the rest (and a shadow's sample is queued for
/// comparison).
pub(crate) fn route(
    x: &Arc<Exchange>,
    message: &Arc<Message>,
    out: &mut Vec<u32>,
) -> Result<By, PluginFault> {
    if !x.staged.load(Ordering::Relaxed) {
        x.route_ids(message, out)?;
        return Ok(By::Serving);
    }
    route_staged(x, message, out)
}

#[cold]
fn route_staged(
    x: &Arc<Exchange>,
    message: &Arc<Message>,
    out: &mut Vec<u32>,
) -> Result<By, PluginFault> {
    let staged = x.candidates.load();
    let Some((candidate, trial)) = staged.as_ref().and_then(|c| c.router.as_ref()) else {
        x.route_ids(message, out)?;
        return Ok(By::Serving);
    };
    if trial.picks(message) {
        let start = out.len();
        let started = Instant::now();
        let r = candidate.route(message, &**x, out);
        trial.record(started.elapsed(), r.as_ref().err());
        if r.is_ok() {
            return Ok(By::Candidate);
        }
        out.truncate(start);
    }
    let start = out.len();
    x.route_ids(message, out)?;
    if trial.sampled() {
        trial.send(Job::Route {
            exchange: x.clone(),
            candidate: candidate.clone(),
            message: message.clone(),
            serving: out[start..].to_vec(),
        });
    }
    Ok(By::Serving)
}

/// The transform step, with a staged transform as [`route`] does.
pub(crate) fn transform(
    x: &Exchange,
    serving: &TransformPlugin,
    message: &Arc<Message>,
) -> (Result<TransformDecision, PluginFault>, By) {
    if !x.staged.load(Ordering::Relaxed) {
        return (serving.transform(message), By::Serving);
    }
    transform_staged(x, serving, message)
}

#[cold]
fn transform_staged(
    x: &Exchange,
    serving: &TransformPlugin,
    message: &Arc<Message>,
) -> (Result<TransformDecision, PluginFault>, By) {
    let staged = x.candidates.load();
    let Some((candidate, trial)) = staged.as_ref().and_then(|c| c.transform.as_ref()) else {
        return (serving.transform(message), By::Serving);
    };
    if trial.picks(message) {
        let started = Instant::now();
        let r = candidate.transform(message);
        trial.record(started.elapsed(), r.as_ref().err());
        if r.is_ok() {
            return (r, By::Candidate);
        }
    }
    let decided = serving.transform(message);
    if let Ok(d) = &decided
        && trial.sampled()
    {
        trial.send(Job::Transform {
            exchange: x.name.clone(),
            candidate: candidate.clone(),
            message: message.clone(),
            serving: d.clone(),
        });
    }
    (decided, By::Serving)
}

/// A binding's filter step, with a staged filter as [`route`] does.
pub(crate) fn filter(
    exchange: &Exchange,
    binding: &Binding,
    serving: &FilterPlugin,
    message: &Arc<Message>,
) -> (Result<bool, PluginFault>, By) {
    match &binding.filter_candidate {
        None => (serving.filter(message), By::Serving),
        Some((candidate, trial)) => filter_staged(exchange, serving, candidate, trial, message),
    }
}

#[cold]
fn filter_staged(
    exchange: &Exchange,
    serving: &FilterPlugin,
    candidate: &Arc<FilterPlugin>,
    trial: &Trial,
    message: &Arc<Message>,
) -> (Result<bool, PluginFault>, By) {
    if trial.picks(message) {
        let started = Instant::now();
        let r = candidate.filter(message);
        trial.record(started.elapsed(), r.as_ref().err());
        if r.is_ok() {
            return (r, By::Candidate);
        }
    }
    let decided = serving.filter(message);
    if let Ok(pass) = decided
        && trial.sampled()
    {
        trial.send(Job::Filter {
            exchange: exchange.name.clone(),
            candidate: candidate.clone(),
            message: message.clone(),
            serving: pass,
        });
    }
    (decided, By::Serving)
}
