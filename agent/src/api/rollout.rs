//! `knhk.agent.v1.RolloutService`: start, read, promote, pause, resume and abort a rollout.
//! Translation only; the rollout is `control`'s.

use super::{convert, pb, status_of};
use crate::{
    control::{ControlError, Controller, RolloutRequest, RolloutStatus},
    model::{rollout::check_steps, FeatureFlag, FeatureFlags},
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The service.
pub struct RolloutApi(pub Arc<Controller>);

/// Maps rollout refusals: one running, none running, nothing to roll out → FAILED_PRECONDITION.
fn status_of_rollout(e: ControlError) -> Status {
    match e {
        ControlError::RolloutInProgress { .. } | ControlError::Rollout(_) => {
            Status::failed_precondition(e.to_string())
        }
        other => status_of(other),
    }
}

/// A start request as a domain request; errors name the field.
pub fn request_from_proto(
    req: &pb::StartRolloutRequest,
    controller: &Controller,
) -> Result<RolloutRequest, Vec<String>> {
    let mut errors = Vec::new();
    let policy = match &req.policy {
        Some(doc) => match convert::policy_from_proto(
            Some(doc),
            controller.defaults(),
            controller.max_rules(),
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.extend(e.into_iter().map(|m| format!("policy.{m}")));
                None
            }
        },
        None => None,
    };
    let flags = if req.set_feature_flags {
        let mut set = FeatureFlags::new();
        for (i, name) in req.feature_flags.iter().enumerate() {
            match name.parse::<FeatureFlag>() {
                Ok(f) => {
                    if !set.insert(f) {
                        errors.push(format!("feature_flags[{i}]: {name} is listed twice"));
                    }
                }
                Err(e) => errors.push(format!("feature_flags[{i}]: {e}")),
            }
        }
        Some(set)
    } else {
        if !req.feature_flags.is_empty() {
            errors.push(
                "feature_flags: given without set_feature_flags = true (set it to change the candidate's flags)"
                    .into(),
            );
        }
        None
    };
    let steps = if req.steps.is_empty() {
        None
    } else {
        match check_steps(&req.steps) {
            Ok(s) => Some(s),
            Err(e) => {
                errors.push(format!("steps: {e}"));
                None
            }
        }
    };
    if req.beats_per_step > 100_000 {
        errors.push(format!(
            "beats_per_step: {} is outside 1-100000 (0: the configured default)",
            req.beats_per_step
        ));
    }
    if req.seed.len() > 256 {
        errors.push(format!("seed: {} bytes is longer than 256", req.seed.len()));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(RolloutRequest {
        policy,
        flags,
        steps,
        beats_per_step: (req.beats_per_step > 0).then_some(req.beats_per_step),
        seed: (!req.seed.is_empty()).then(|| req.seed.clone()),
    })
}

/// A rollout's status as the API reports it (`None`: there has been none).
pub fn status_to_proto(s: Option<RolloutStatus>) -> pb::RolloutStatus {
    let Some(s) = s else {
        return pb::RolloutStatus::default();
    };
    let (c, st) = s.analysis.deny_rates();
    pb::RolloutStatus {
        present: true,
        state: s.state.as_str().into(),
        steps: s.plan.steps.iter().map(|p| p.as_f64()).collect(),
        step: s.step as u32,
        percent: if s.state.ended() && s.state != crate::model::RolloutState::Promoted {
            0.0
        } else {
            s.share().map_or(0.0, |p| p.as_f64())
        },
        beats_per_step: s.plan.beats_per_step,
        beats_observed: s.analysis.observed,
        beats_met: s.analysis.met,
        slo_threshold: s.plan.slo_threshold,
        candidate_deny_rate: c,
        stable_deny_rate: st,
        stable_generation: s.stable_generation,
        candidate_generation: s.candidate_generation,
        candidate_digest: s.candidate_digest.clone(),
        feature_flags: s.flags.iter().map(|f| f.as_str().to_owned()).collect(),
        candidate_workloads: s.workloads.0 as u32,
        workloads: s.workloads.1 as u32,
        reason: s.reason.clone().unwrap_or_default(),
        seed: s.plan.seed.clone(),
        beats: s.beats,
        gate_failed_at_beat: s.gate_failed_at_beat,
        zeroed_at_beat: s.zeroed_at_beat,
        auto_rollback: s.plan.auto_rollback,
    }
}

#[tonic::async_trait]
impl pb::rollout_service_server::RolloutService for RolloutApi {
    async fn start_rollout(
        &self,
        req: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let req = request_from_proto(req.get_ref(), &self.0)
            .map_err(|e| Status::invalid_argument(e.join("\n")))?;
        let s = self.0.start_rollout(req).await.map_err(status_of_rollout)?;
        Ok(Response::new(status_to_proto(Some(s))))
    }

    async fn get_rollout(
        &self,
        _req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        Ok(Response::new(status_to_proto(self.0.rollout().await)))
    }

    async fn promote_rollout(
        &self,
        _req: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let s = self.0.promote_rollout().await.map_err(status_of_rollout)?;
        Ok(Response::new(status_to_proto(Some(s))))
    }

    async fn pause_rollout(
        &self,
        req: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let reason = reason_of(req.get_ref(), "paused by an operator")?;
        let s = self
            .0
            .pause_rollout(reason)
            .await
            .map_err(status_of_rollout)?;
        Ok(Response::new(status_to_proto(Some(s))))
    }

    async fn resume_rollout(
        &self,
        _req: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let s = self.0.resume_rollout().await.map_err(status_of_rollout)?;
        Ok(Response::new(status_to_proto(Some(s))))
    }

    async fn abort_rollout(
        &self,
        req: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let reason = reason_of(req.get_ref(), "aborted by an operator")?;
        let s = self
            .0
            .abort_rollout(reason)
            .await
            .map_err(status_of_rollout)?;
        Ok(Response::new(status_to_proto(Some(s))))
    }
}

fn reason_of(req: &pb::RolloutControlRequest, default: &str) -> Result<String, Status> {
    if req.reason.len() > 1024 {
        return Err(Status::invalid_argument(format!(
            "reason: {} bytes is longer than 1024",
            req.reason.len()
        )));
    }
    Ok(if req.reason.is_empty() {
        default.to_owned()
    } else {
        req.reason.clone()
    })
}
