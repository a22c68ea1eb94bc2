//! Phase four: the run's state written every `train.checkpoint_every` steps and at the end
//! (`train::checkpoint` is the format on disk and its atomic write), by rank 0 of a
//! data-parallel job.

use anyhow::Result;

use super::super::checkpoint;
use super::prepare::Run;

impl Run<'_> {
    /// Writes a checkpoint when one is due: every `train.checkpoint_every` steps, at the last
    /// step, or when a callback stops the run. A skipped step writes none, so the last
    /// checkpoint stays the last good state.
    pub fn checkpoint_due(&mut self, skipped: bool) -> Result<()> {
        let t = &self.recipe.train;
        let due = t.checkpoint_every > 0 && self.st.step.is_multiple_of(t.checkpoint_every);
        if !(due || self.st.step == self.steps || self.ctl.stop) || skipped {
            return Ok(());
        }
        self.st.adam_t = self.opt.t;
        self.st.control = self.ctl.clone();
        self.st.elapsed_s = self.elapsed();
        self.st.callbacks = self
            .callbacks
            .iter()
            .map(|c| (c.name().to_string(), c.state()))
            .collect();
        // Every rank holds the same state; rank 0 writes it, and the others hear if it failed.
        crate::dist::on_rank0(self.comm.as_ref(), || {
            checkpoint::save(
                &t.out.join("checkpoints"),
                &self.st,
                &self.params,
                &self.opt,
                t.keep_checkpoints,
            )
        })?;
        Ok(())
    }
}
