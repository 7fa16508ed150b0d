"""The one error type the trainer reports as a single clear line (bad config, data, paths)."""

from __future__ import annotations

from loracore.artifact import ArtifactError


class TrainerError(Exception):
    """A problem with the user's input or run, stated in one line: the CLI prints it and exits non-zero."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at ``checkpoint`` and nothing was published."""

    def __init__(self, signal_name: str, checkpoint: str | None):
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        where = f"checkpoint at {checkpoint}; resume with --resume" if checkpoint else "no checkpoint written"
        super().__init__(f"interrupted by {signal_name}: {where}")


# What the CLI prints as one line and the progress stream reports as the message: the user's input
# or run was wrong (an adapter folder that fails ``loracore.artifact.verify`` included).
USER_ERRORS: tuple[type[Exception], ...] = (TrainerError, ArtifactError)
