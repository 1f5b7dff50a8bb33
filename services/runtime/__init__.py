"""What every service shares: settings, errors, jobs, checkpoints, datasets, models, server."""
