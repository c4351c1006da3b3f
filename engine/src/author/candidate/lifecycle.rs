//! A trial's life: staged beside the serving version (every use of the
//! plugin gets a candidate handle, all or nothing), judged, and ended by
//! promotion, rollback or an operator; and rollback to a kept version.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Candidates, Event, Mode, Policy, RolloutError, Trial};
use crate::broker::Broker;
use crate::broker::exchange::{Binding, Exchange};
use crate::broker::plugins::Handles;
use crate::plugin::FilterPlugin;

impl Broker {
    /// The staged rollouts.
    pub fn candidates(&self) -> &Candidates {
        &self.candidates
    }

    /// Stage `bytes` as a candidate of plugin `name` beside its serving
    /// version. A trial already running for the plugin is aborted first.
    pub fn stage_candidate(
        &self,
        name: &str,
        bytes: &[u8],
        mode: Mode,
        policy: Policy,
    ) -> Result<Arc<Trial>, RolloutError> {
        if self.cluster().is_some() {
            return Err(RolloutError::Clustered);
        }
        let version = self.check_candidate(name, bytes, &mode, &policy)?;
        self.start_trial(version, bytes, mode, policy)
    }

    /// What staging `bytes` as `name`'s candidate would be refused for,
    /// and else the candidate version, compiled.
    pub(crate) fn check_candidate(
        &self,
        name: &str,
        bytes: &[u8],
        mode: &Mode,
        policy: &Policy,
    ) -> Result<Arc<crate::plugin::PluginVersion>, RolloutError> {
        match mode {
            Mode::Shadow { every: 0 } => {
                return Err(RolloutError::Invalid(
                    "sample: one in 0 is no sample".into(),
                ));
            }
            Mode::Canary { percent, .. } if !(*percent > 0.0 && *percent <= 100.0) => {
                return Err(RolloutError::Invalid(format!(
                    "percent {percent}: give more than 0 and at most 100"
                )));
            }
            _ => {}
        }
        policy.check().map_err(RolloutError::Invalid)?;
        let serving = self
            .registry
            .get(name)
            .ok_or_else(|| RolloutError::NotServing(name.to_owned()))?;
        if serving.builtin {
            return Err(RolloutError::Builtin(name.to_owned()));
        }
        if serving.hash == crate::plugin::content_hash(bytes) {
            return Err(RolloutError::SameVersion(name.to_owned()));
        }
        self.host
            .load(name, bytes, false)
            .map_err(|e| RolloutError::Refused(e.to_string()))
    }

    /// Put `version` on trial beside the serving version of its plugin
    /// (in a cluster: as the log applies the stage, on every node).
    pub(crate) fn start_trial(
        &self,
        version: Arc<crate::plugin::PluginVersion>,
        bytes: &[u8],
        mode: Mode,
        policy: Policy,
    ) -> Result<Arc<Trial>, RolloutError> {
        let plugin = version.name.clone();
        let name = plugin.as_str();
        let serving = self
            .registry
            .get(name)
            .ok_or_else(|| RolloutError::NotServing(name.to_owned()))?;
        if let Some(old) = self.candidates.get(name) {
            self.end_trial(
                &old,
                Event::Aborted,
                Some("replaced by a new candidate".into()),
            );
        }
        let trial = Trial::new(version, serving.hash.clone(), bytes.into(), mode, policy);
        trial
            .start_shadow()
            .map_err(|e| RolloutError::Refused(format!("no thread for the shadow: {e}")))?;
        {
            let _serial = self.swapping.lock();
            self.attach_locked(&trial).map_err(RolloutError::Refused)?;
            self.candidates
                .trials
                .lock()
                .insert(name.to_owned(), trial.clone());
        }
        let event = match trial.mode {
            Mode::Shadow { .. } => Event::ShadowStarted,
            Mode::Canary { .. } => Event::CanaryStarted,
        };
        self.candidates
            .record(name, event, &serving.hash, &trial.version.hash, None);
        Ok(trial)
    }

    /// Build the candidate's handles for every use of its plugin and put
    /// them beside the serving ones; all or nothing, as a swap.
    fn attach_locked(&self, trial: &Arc<Trial>) -> Result<(), String> {
        let _swap = self.swap.write();
        let users = self.users_of(&trial.plugin);
        if users.is_empty() {
            return Err(format!(
                "no exchange or binding uses plugin '{}': nothing to try it on",
                trial.plugin
            ));
        }
        let _controls: Vec<_> = users.iter().map(|(_, x)| x.control.lock()).collect();
        let mut prepared = Vec::with_capacity(users.len());
        for (vhost, x) in &users {
            let table = x.bindings.load_full();
            let handles = self
                .handles_for(&trial.version, x, &table)
                .map_err(|e| format!("exchange '{}' in vhost '{vhost}': {e}", x.name))?;
            prepared.push((x, table, handles));
        }
        for (x, table, mut handles) in prepared {
            let filtered = handles.bindings(&table, |b, filter| Binding {
                filter_candidate: Some((filter, trial.clone())),
                ..b
            });
            if let Some(b) = filtered {
                x.bindings.store(Arc::new(b));
            }
            self.place_candidates(x, handles, trial);
            x.reset_memo();
        }
        Ok(())
    }

    /// Put `handles`' router and transform beside `x`'s serving ones, as
    /// candidates of `trial`, and mark `x` staged.
    fn place_candidates(&self, x: &Exchange, handles: Handles, trial: &Arc<Trial>) {
        if handles.router.is_some() || handles.transform.is_some() {
            let mut c = x
                .candidates
                .load_full()
                .map(|c| (*c).clone())
                .unwrap_or_default();
            if let Some(r) = handles.router {
                c.router = Some((Arc::new(r), trial.clone()));
            }
            if let Some(t) = handles.transform {
                c.transform = Some((Arc::new(t), trial.clone()));
            }
            x.candidates.store(Some(Arc::new(c)));
        }
        x.staged.store(true, Ordering::Relaxed);
    }

    /// Take `trial`'s handles out of every exchange and binding.
    fn detach_locked(&self, trial: &Arc<Trial>) {
        let _swap = self.swap.write();
        fn of<T>(slot: &Option<(Arc<T>, Arc<Trial>)>, trial: &Arc<Trial>) -> bool {
            slot.as_ref().is_some_and(|(_, t)| Arc::ptr_eq(t, trial))
        }
        // A candidate only ever stands beside a use of its plugin.
        for (_, x) in self.users_of(&trial.plugin) {
            let _control = x.control.lock();
            if let Some(c) = x.candidates.load_full() {
                let mut c = (*c).clone();
                if of(&c.router, trial) {
                    c.router = None;
                }
                if of(&c.transform, trial) {
                    c.transform = None;
                }
                x.candidates.store((!c.is_empty()).then(|| Arc::new(c)));
            }
            let table = x.bindings.load_full();
            let mut next = (*table).clone();
            for b in table.iter().filter(|b| of(&b.filter_candidate, trial)) {
                next = next.replaced(Binding {
                    filter_candidate: None,
                    ..(**b).clone()
                });
            }
            let still =
                x.candidates.load().is_some() || next.iter().any(|b| b.filter_candidate.is_some());
            x.bindings.store(Arc::new(next));
            x.staged.store(still, Ordering::Relaxed);
            x.reset_memo();
        }
    }

    /// End `trial`: detach it, and on [`Event::Promoted`] serve it.
    pub(crate) fn end_trial(&self, trial: &Arc<Trial>, event: Event, reason: Option<String>) {
        trial.stopped.store(true, Ordering::Relaxed);
        trial.stop_shadow();
        {
            let _serial = self.swapping.lock();
            let mut trials = self.candidates.trials.lock();
            if trials
                .get(&trial.plugin)
                .is_some_and(|t| Arc::ptr_eq(t, trial))
            {
                trials.remove(&trial.plugin);
            }
            drop(trials);
            self.detach_locked(trial);
        }
        let serving = self
            .registry
            .get(&trial.plugin)
            .map(|v| v.hash.clone())
            .unwrap_or_default();
        self.candidates.record(
            &trial.plugin,
            event.clone(),
            &serving,
            &trial.version.hash,
            reason,
        );
        // In a cluster the promotion's log entry activates the version on
        // every node.
        if event == Event::Promoted
            && self.cluster().is_none()
            && let Err(e) = self.serve_bytes(&trial.plugin, &trial.bytes)
        {
            tracing::error!(plugin = %trial.plugin, "promoting the candidate failed; the serving version stays: {e}");
        }
    }

    /// Promote the candidate of `name` now.
    pub fn promote_candidate(&self, name: &str) -> Result<(), RolloutError> {
        let trial = self
            .candidates
            .get(name)
            .ok_or_else(|| RolloutError::NoCandidate(name.to_owned()))?;
        self.end_trial(&trial, Event::Promoted, None);
        Ok(())
    }

    /// Remove the candidate of `name`; the serving version keeps serving.
    pub fn abort_candidate(&self, name: &str) -> Result<(), RolloutError> {
        let trial = self
            .candidates
            .get(name)
            .ok_or_else(|| RolloutError::NoCandidate(name.to_owned()))?;
        self.end_trial(&trial, Event::Aborted, None);
        Ok(())
    }

    /// Serve `bytes` as plugin `name` everywhere at once, and write them
    /// into the plugin folder so a restart serves them too. A folder that
    /// cannot be written (read-only, as a Kubernetes ConfigMap is) is
    /// logged: the version serves until the next restart.
    fn serve_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        self.install_plugin(name, bytes)?;
        if let Err(e) = self.write_plugin_file(name, bytes) {
            tracing::warn!(
                plugin = name,
                "the version serves, but {name}.wasm could not be written into {} ({e}): a restart serves the folder's file",
                self.plugin_dir().display()
            );
        }
        Ok(())
    }

    /// Serve a kept version of `name` again at once: `hash` (a prefix is
    /// enough), or the newest kept version that is not serving.
    pub fn rollback_plugin(&self, name: &str, hash: Option<&str>) -> Result<String, RolloutError> {
        if self.cluster().is_some() {
            return Err(RolloutError::Clustered);
        }
        let serving = self
            .registry
            .get(name)
            .ok_or_else(|| RolloutError::NotServing(name.to_owned()))?;
        let store = self.store().ok_or_else(|| RolloutError::NotKept {
            plugin: name.to_owned(),
            hash: hash.unwrap_or("previous").to_owned(),
        })?;
        let kept = store.kept_versions(name);
        let chosen = match hash {
            Some(h) => kept.into_iter().find(|k| k.hash.starts_with(h)),
            None => kept.into_iter().find(|k| k.hash != serving.hash),
        }
        .ok_or_else(|| RolloutError::NotKept {
            plugin: name.to_owned(),
            hash: hash.unwrap_or("previous").to_owned(),
        })?;
        let bytes = std::fs::read(&chosen.path).map_err(|e| {
            RolloutError::Refused(format!("reading {}: {e}", chosen.path.display()))
        })?;
        if let Some(t) = self.candidates.get(name) {
            self.end_trial(&t, Event::Aborted, Some("rollback asked".into()));
        }
        self.serve_bytes(name, &bytes)
            .map_err(RolloutError::Refused)?;
        self.candidates.record(
            name,
            Event::Rollback,
            &serving.hash,
            &chosen.hash,
            Some("asked by an operator".into()),
        );
        Ok(chosen.hash)
    }

    /// Judge every canary: roll back one past a bound, promote one that
    /// has decided enough for long enough. Called periodically.
    pub fn judge_candidates(&self) {
        for trial in self.candidates.all() {
            if let Some(reason) = trial.failure() {
                self.conclude(&trial, Event::RolledBack, Some(reason));
                continue;
            }
            if !matches!(trial.mode, Mode::Canary { .. }) {
                continue;
            }
            let p = &trial.policy;
            let calls = trial.calls.load(Ordering::Relaxed);
            if p.max_p99_us > 0
                && trial.latency.snapshot().count() >= p.p99_min_calls
                && let Some(p99) = trial.latency_us(0.99)
                && p99 > p.max_p99_us
            {
                let reason = format!("p99 {p99} µs passed {} µs", p.max_p99_us);
                trial.fail(reason.clone());
                self.conclude(&trial, Event::RolledBack, Some(reason));
                continue;
            }
            if calls >= p.promote_after_messages
                && trial.elapsed() >= Duration::from_secs(p.promote_after_secs)
            {
                self.conclude(&trial, Event::Promoted, None);
            }
        }
    }

    /// A binding was added to `x` (its control lock held): apply it to a
    /// staged router candidate too. A candidate that refuses a binding the
    /// serving version took would misroute: it is rolled back.
    pub(crate) fn bind_candidate(&self, x: &Exchange, id: u32, input: &[u8]) {
        if !x.staged.load(Ordering::Relaxed) {
            return;
        }
        if let Some(c) = x.candidates.load_full()
            && let Some((router, trial)) = &c.router
            && let Err(e) = router.bind(id, input)
        {
            trial.fail(format!("refused a binding the serving version took: {e}"));
        }
    }

    /// A binding was removed from `x`: from a staged router candidate too.
    pub(crate) fn unbind_candidate(&self, x: &Exchange, id: u32, input: &[u8]) {
        if !x.staged.load(Ordering::Relaxed) {
            return;
        }
        if let Some(c) = x.candidates.load_full()
            && let Some((router, _)) = &c.router
        {
            router.unbind(id, input);
        }
    }

    /// A new exchange: if its router or transform plugin is on trial, put
    /// the candidate beside it. A candidate that refuses the exchange the
    /// serving version took would misroute there: it is rolled back.
    pub(crate) fn stage_on_new_exchange(&self, x: &Exchange) {
        let router = Self::routes_with(x, x.router_kind()).then_some(x.router_kind());
        let transform = x.transform_name();
        let mut trials: Vec<Arc<Trial>> = [router, transform.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(|name| self.candidates.get(name))
            .collect();
        trials.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for trial in trials {
            match self.handles_for(&trial.version, x, &x.bindings.load()) {
                Ok(handles) => self.place_candidates(x, handles, &trial),
                Err(e) => trial.fail(format!(
                    "refused exchange '{}', which the serving version took: {e}",
                    x.name
                )),
            }
        }
    }

    /// A new binding of `x` with filter `name`: the candidate's filter for
    /// it, if `name` is on trial.
    pub(crate) fn candidate_filter(
        &self,
        x: &Exchange,
        name: &str,
        key: &str,
        encoded_arguments: &[u8],
    ) -> Option<(Arc<FilterPlugin>, Arc<Trial>)> {
        let trial = self.candidates.get(name)?;
        match FilterPlugin::new(&self.host, &trial.version, &x.name, key, encoded_arguments) {
            Ok(f) => {
                x.staged.store(true, Ordering::Relaxed);
                Some((Arc::new(f), trial))
            }
            Err(e) => {
                trial.fail(format!("refused a binding the serving version took: {e}"));
                None
            }
        }
    }
}
