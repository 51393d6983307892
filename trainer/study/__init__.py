"""`mdt-study`: variants of one launch config trained under one budget and compared. The study file
and its plan (`spec`), budgets in steps (`budget`), launching and resuming the runs as processes
(`runner`), the post-hoc judgement of each run (`posthoc`), the numbers as pure functions
(`summary`) and study.md / .png / .json (`report`). Above the metric library, sampling and the
checkpoints; launches training runs as processes and imports nothing of the training run."""
