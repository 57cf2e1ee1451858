"""Exit codes of the training entry points (pretrain, finetune), read by slurm/pretrain.sbatch.

    0   DONE       train.steps reached (or train.exit_after_steps, as asked); nothing to resume
    1   FAILED     an error during the run (traceback above it)
    2   INVALID    bad configuration or input, refused before any training
    3   DIVERGED   halted after train.max_skipped_steps consecutive skipped updates
    75  REQUEUE    stopped early with a checkpoint (a signal, or train.exit_duration_minutes):
                   start the same command again to continue (EX_TEMPFAIL of sysexits.h)
"""

DONE = 0
FAILED = 1
INVALID = 2
DIVERGED = 3
REQUEUE = 75
