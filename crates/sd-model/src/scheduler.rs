//! The flow-matching Euler scheduler of SD3, reproducing diffusers'
//! `FlowMatchEulerDiscreteScheduler` bit for bit (including where it computes in f32 and
//! where in f64, and its double application of the shift to `sigma_min`).

use crate::config::SchedulerConfig;
use crate::error::{ModelError, Result};

/// The sigmas (`steps + 1` values, ending in 0) and the timesteps (`steps` values, the
/// transformer's `timestep` input: sigma * num_train_timesteps).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

impl Schedule {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }
    /// `sigma[i+1] - sigma[i]`, computed in f32 as diffusers does.
    pub fn dt(&self, step: usize) -> f32 {
        self.sigmas[step + 1] - self.sigmas[step]
    }
}

#[derive(Clone, Debug)]
pub struct FlowMatchEulerScheduler {
    pub config: SchedulerConfig,
}

impl FlowMatchEulerScheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self { config }
    }

    /// The schedule for `steps` denoising steps; `shift` overrides the configured shift
    /// (as constructing the scheduler with that shift would).
    pub fn schedule(&self, steps: usize, shift: Option<f64>) -> Result<Schedule> {
        if steps == 0 {
            return Err(ModelError::input("the number of steps must be at least 1"));
        }
        let shift = shift.unwrap_or(self.config.shift);
        if !(shift.is_finite() && shift > 0.0) {
            return Err(ModelError::input(format!(
                "scheduler shift must be positive and finite, got {shift}"
            )));
        }
        let n_train = self.config.num_train_timesteps as f64;
        // __init__: float32 tensors. The smallest training sigma, shifted in f32.
        let s_last = 1.0f32 / self.config.num_train_timesteps as f32;
        let shift32 = shift as f32;
        let sigma_min = (shift32 * s_last / (1.0f32 + (shift - 1.0) as f32 * s_last)) as f64;
        let sigma_max = 1.0f64; // shift * 1 / (1 + (shift - 1)) == 1 exactly
        // set_timesteps: numpy float64 linspace, then the shift again, then float32.
        let start = sigma_max * n_train;
        let stop = sigma_min * n_train;
        let mut sigmas = Vec::with_capacity(steps + 1);
        let mut timesteps = Vec::with_capacity(steps);
        for i in 0..steps {
            let t = linspace_at(start, stop, steps, i);
            let s = t / n_train;
            let shifted = shift * s / (1.0 + (shift - 1.0) * s);
            let s32 = shifted as f32;
            sigmas.push(s32);
            timesteps.push(s32 * self.config.num_train_timesteps as f32);
        }
        sigmas.push(0.0);
        Ok(Schedule { sigmas, timesteps })
    }
}

/// Element `i` of `numpy.linspace(start, stop, num)` (endpoint included).
fn linspace_at(start: f64, stop: f64, num: usize, i: usize) -> f64 {
    if num == 1 {
        return start;
    }
    if i == num - 1 {
        return stop;
    }
    let step = (stop - start) / (num - 1) as f64;
    i as f64 * step + start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(shift: f64) -> FlowMatchEulerScheduler {
        FlowMatchEulerScheduler::new(SchedulerConfig {
            shift,
            ..Default::default()
        })
    }

    #[test]
    fn schedule_starts_at_one_and_ends_at_zero() {
        let s = sched(3.0).schedule(28, None).unwrap();
        assert_eq!(s.sigmas.len(), 29);
        assert_eq!(s.sigmas[0], 1.0);
        assert_eq!(s.timesteps[0], 1000.0);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn shift_one_is_linear() {
        let s = sched(1.0).schedule(3, None).unwrap();
        // linspace(1000, 1, 3) / 1000
        assert_eq!(s.sigmas, vec![1.0, 0.5005, 0.001, 0.0]);
    }

    #[test]
    fn zero_steps_and_bad_shift_are_refused() {
        assert!(sched(3.0).schedule(0, None).is_err());
        assert!(sched(3.0).schedule(4, Some(f64::NAN)).is_err());
        assert!(sched(3.0).schedule(4, Some(-1.0)).is_err());
    }
}
