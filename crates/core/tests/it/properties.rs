//! The registry against the model, over random operation sequences.
//!
//! After every step the harness checks (see [`crate::model::Harness::step`]):
//! - the registry's answer to each command is the model's, refusals included;
//! - the snapshot (instances, statuses, deadlines, indices, leases and their bindings) is the
//!   model's, and services without instances do not exist;
//! - default discovery (`Service::healthy`) returns exactly the instances that are registered,
//!   not in maintenance and not lapsed as of the last sweep;
//! - the index is never 0, never goes back, and moves (by one) exactly when something
//!   visible changed; instance and service indices move exactly where something changed;
//!   `snapshot.service_index` never goes back;
//! - a refused command changes nothing, deadlines included, and leaves nothing to commit;
//! - restoring from the mutations committed so far gives the same instances and leases,
//!   every one passing with one TTL of grace, at the stored index plus one, and no service
//!   index goes back.

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;

use crate::model::{Harness, op};
use crate::support::{config_with_preservation, config_without_preservation};

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn registry_follows_the_model_without_self_preservation(ops in vec(op(false), 1..80)) {
        let mut harness = Harness::new(config_without_preservation(3_000));
        for op in &ops {
            harness.step(op);
        }
    }

    /// Self-preservation engages often here (3 renewers suffice); whether a sweep may apply
    /// expirations is read from the registry and checked against the counts it reports, and
    /// everything else must still follow the model.
    #[test]
    fn registry_follows_the_model_with_self_preservation(ops in vec(op(true), 1..80)) {
        let mut harness =
            Harness::new(config_with_preservation(3_000, 3, Duration::from_secs(20)));
        for op in &ops {
            harness.step(op);
        }
    }
}
