"""Task-specific losses and metrics (``densediff.tasks.segmentation``)."""
